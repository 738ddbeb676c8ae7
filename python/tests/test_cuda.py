# ===- test_cuda.py - flexmoe on a CUDA device ---------------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# The layer on CUDA tensors (skipped without a CUDA device; the lead runs
# them on the GPU machine, bench/gpu_python.sh): training steps against the
# fp64 CPU reference (outputs, l_aux, every gradient, [num-1]), forwards in
# flight before their backwards, the caller's tensors bound in place, no
# host synchronization, torch's current stream honoured (a side stream),
# the gate noise's seed per call, and the training example. Small shapes:
# the whole file takes seconds on an H100.
#
# ===----------------------------------------------------------------------=== #

import copy
import importlib.util
import time
from pathlib import Path

import pytest
import torch

import flexmoe
from flexmoe import _capi, _ops
from reference import rel_l2
from test_layer import TOLERANCE, make_layer, reference_of, run_flex

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device: the CUDA tests run on the GPU machine "
    "(bench/gpu_python.sh)")

REPO = Path(__file__).resolve().parents[2]
D = 64

CONFIGS = [
    ("bf16-relu-k2-fixed", dict(top_k=2, dtype=torch.bfloat16), 256),
    ("bf16-gelu-k1-drop-bias",
     dict(top_k=1, capacity_factor=0.5, activation="gelu", bias=True,
          dtype=torch.bfloat16), 200),
    ("bf16-gated-dropless",
     dict(top_k=2, capacity_factor=0.0, gated=True, activation="silu",
          dtype=torch.bfloat16), 192),
    ("f16-silu-k3-bounded-bp",
     dict(top_k=3, capacity_factor=-1.0, activation="silu",
          batch_prioritized=True, dtype=torch.float16), 160),
    ("f32-relu-k2-bias", dict(top_k=2, bias=True), 128),
]


def _layers(**kw):
    """A CUDA layer and a CPU copy of the same weights for the reference."""
    layer = make_layer(E=8, d=D, h=96, **kw)
    return layer.cuda(), copy.deepcopy(layer).cpu()


def _compare(layer, ref_layer, x, grad_out, grad_l_aux=0.7, seed=0,
             noise=0.0):
    """The CUDA layer's output, l_aux and gradients against the fp64
    reference of the same values (on the CPU)."""
    dtype = layer.dtype
    y, l_aux, grads = run_flex(layer, x.cuda(), grad_out.cuda(), grad_l_aux)
    with torch.no_grad():  # the reference reads the CUDA layer's weights
        for p, q in zip(ref_layer.parameters(), layer.parameters()):
            p.copy_(q)
    ref_y, ref_l, ref_grads = reference_of(ref_layer, x, grad_out,
                                           grad_l_aux, seed, noise)
    tol = TOLERANCE[dtype]
    assert y.is_cuda and y.dtype == dtype
    assert rel_l2(y.cpu(), ref_y) <= tol, f"out {rel_l2(y.cpu(), ref_y)}"
    l_aux, ref_l = float(l_aux.detach()), float(ref_l.detach())
    assert abs(l_aux - ref_l) <= tol * abs(ref_l) + 1e-6
    for name, g in grads.items():
        assert g.is_cuda
        err = rel_l2(g.cpu(), ref_grads[name])
        assert err <= tol, f"grad_{name}: {err} > {tol}"
    return y, grads


@pytest.mark.parametrize("name,kw,tokens", CONFIGS,
                         ids=[c[0] for c in CONFIGS])
def test_training_steps_match_reference(name, kw, tokens):
    # Three optimizer steps on CUDA; each step's outputs and gradients
    # against the fp64 reference of that step's weights.
    layer, ref_layer = _layers(**kw)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    for _ in range(3):
        x = torch.randn(tokens, D).to(layer.dtype)
        grad_out = torch.randn(tokens, D).to(layer.dtype).float()
        _, grads = _compare(layer, ref_layer, x, grad_out)
        for p, g in zip(layer.parameters(), list(grads.values())[1:]):
            p.grad = g.to(p.dtype)
        optimizer.step()


def test_forwards_in_flight():
    if not _capi.library().per_call_state:
        pytest.skip("this libflex.so has no per-call workspace")
    layer, ref_layer = _layers(top_k=2, capacity_factor=0.0, bias=True)
    runs = []
    for _ in range(3):  # three forwards, then the backwards, reversed
        x = torch.randn(120, D, device="cuda", requires_grad=True)
        y, l_aux = layer(x)
        runs.append((x, y, l_aux, torch.randn(120, D, device="cuda")))
    names = ["x", "wg", "w1", "w2", "b1", "b2"]
    for x, y, l_aux, grad_out in reversed(runs):
        grads = torch.autograd.grad((y * grad_out).sum() + 0.5 * l_aux,
                                    [x] + list(layer.parameters()))
        _, _, ref = reference_of(ref_layer, x.detach().cpu(), grad_out.cpu(),
                                 0.5)
        for name, g in zip(names, grads):
            assert rel_l2(g.cpu(), ref[name]) <= 1e-5, name


def test_binds_the_callers_tensors_without_copies():
    layer, _ = _layers(top_k=2)
    seen = []
    real = _ops._bind

    def spy(plan, bindings, tensors):
        addresses, sizes = real(plan, bindings, tensors)
        seen.extend(zip(bindings.names, addresses))
        return addresses, sizes

    _ops._bind = spy
    try:
        x = torch.randn(64, D, device="cuda", requires_grad=True)
        y, l_aux = layer(x)
        (y.sum() + l_aux).backward()
    finally:
        _ops._bind = real
    addresses = {}
    for name, address in seen:
        addresses.setdefault(name, set()).add(address)
    assert addresses["x"] == {x.data_ptr()}  # forward and backward
    assert addresses["w1"] == {layer.w1.data_ptr()}
    assert addresses["wg"] == {layer.wg.data_ptr()}
    assert addresses["out"] == {y.data_ptr()}


def _sleep_cycles(seconds):
    """GPU clock cycles that torch.cuda._sleep spins for about `seconds`."""
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    return int(10_000_000 * seconds * 1000 / max(start.elapsed_time(end),
                                                 1e-3))


def test_no_host_synchronization():
    # A fixed-capacity layer's forward and backward only queue work: behind
    # a 0.2 s GPU sleep, the host returns long before the GPU is done.
    layer, _ = _layers(top_k=2, dtype=torch.bfloat16)
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    y, l_aux = layer(x)  # compiles and warms the plan
    (y.float().sum() + l_aux).backward()
    cycles = _sleep_cycles(0.2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # torch-side syncs raise
    try:
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        y, l_aux = layer(x)
        (y.float().sum() + l_aux).backward()
        host = time.perf_counter() - start
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    assert host < 0.5 * total, f"host {host:.3f} s of {total:.3f} s"


def test_current_stream_is_honoured():
    # On a side stream held back by a GPU sleep, the input is overwritten
    # and then the layer runs: only a pass queued on that stream (after the
    # copy) sees the new values. The backward likewise, with its grad_out.
    layer, _ = _layers(top_k=2, bias=True)
    x = torch.randn(128, D, device="cuda")
    x_new, g_new = (torch.randn(128, D, device="cuda") for _ in range(2))
    g = torch.zeros(128, D, device="cuda")
    layer(x.detach().requires_grad_())  # compile outside the timing
    cycles = _sleep_cycles(0.05)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)
        x.copy_(x_new)
        xs = x.requires_grad_()
        y, l_aux = layer(xs)
        torch.cuda._sleep(cycles)
        g.copy_(g_new)
        torch.autograd.backward([y, l_aux],
                                [g, torch.ones((), device="cuda")])
    torch.cuda.synchronize()
    grad_x = xs.grad.clone()
    ref_x = x_new.clone().requires_grad_()
    ref_y, ref_l = layer(ref_x)  # on the default stream, after the sync
    torch.autograd.backward([ref_y, ref_l],
                            [g_new, torch.ones((), device="cuda")])
    assert rel_l2(y, ref_y) <= 1e-6
    assert rel_l2(grad_x, ref_x.grad) <= 1e-6


def test_gate_noise_seed_per_call():
    if not _capi.library().per_call_state:
        pytest.skip("this libflex.so has no per-call seed (FLEX_RUN_SEED)")
    layer, ref_layer = _layers(top_k=2, gate_noise=1.0)
    x, grad_out = torch.randn(96, D), torch.randn(96, D)
    torch.manual_seed(7)  # the layer draws each call's seed from torch
    seed = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(7)
    _compare(layer, ref_layer, x, grad_out, seed=seed, noise=1.0)
    xc = x.cuda()
    with torch.no_grad():
        y1, _ = layer(xc)
        y2, _ = layer(xc)
        assert not torch.equal(y1, y2)  # another call, other noise
        torch.manual_seed(9)
        y3, _ = layer(xc)
        torch.manual_seed(9)
        assert torch.equal(layer(xc)[0], y3)


def _example():
    path = REPO / "examples" / "python" / "train_lm.py"
    spec = importlib.util.spec_from_file_location("train_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_example_trains_on_cuda(dtype, capsys):
    code = _example().main(["--device", "cuda", "--dtype", dtype, "--steps",
                            "30", "--check", "--min-drop", "0.4"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "OK" in out


def test_dropless_decode_forward_records_in_a_cuda_graph():
    # Few tokens, dropless: the experts' GEMMs size themselves on the device
    # (grouped_gemm=auto takes the device-sized kernel up to 256 rows per
    # expert), so the forward has no host synchronization and records in a
    # torch CUDA graph; each replay routes the inputs it finds in place.
    layer, ref_layer = _layers(top_k=2, capacity_factor=0.0,
                               dtype=torch.bfloat16)
    tokens = 64
    static_x = torch.randn(tokens, D, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(2):  # compiles the plan, grows workspace and scratch
            layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_y, static_l_aux = layer(static_x)
    with torch.no_grad():
        for p, q in zip(ref_layer.parameters(), layer.parameters()):
            p.copy_(q)
    for _ in range(3):
        x = torch.randn(tokens, D).to(torch.bfloat16)
        static_x.copy_(x)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_y, ref_l, _ = reference_of(ref_layer, x, torch.zeros(tokens, D),
                                       0.0)
        tol = TOLERANCE[torch.bfloat16]
        assert rel_l2(static_y.float().cpu(), ref_y) <= tol
        assert abs(float(static_l_aux) - float(ref_l)) <= (
            tol * abs(float(ref_l)) + 1e-6)
