#!/usr/bin/env python3
# ===- python_overhead.py - flexmoe.MoELayer's time against moe-run's -----=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Times flexmoe.MoELayer (issue 12: the Python layer's overhead over the
# runtime) forward and forward+backward on one GPU, and the same plan through
# `moe-run PLAN --device cuda --train --json` when --moe-run is given:
#
# - flexmoe: CUDA events around each call, the GPU idle before each (a
#   synchronize), so the time includes what Python does before the first
#   kernel; warm-up calls first, then the median of --iters. The forward runs
#   the training plan (x requires grad), as moe-run --train does; forward+
#   backward is the forward and torch.autograd.backward of (y, l_aux), the
#   gradients set to None before each (optimizer.zero_grad's default), so
#   autograd keeps Flex's gradient tensors instead of adding them into the
#   last step's (on C1 that add moves 1.6 GB that moe-run does not: 9% of
#   forward+backward in Run 21); that is done outside the timed call (the
#   optimizer's work, with nothing like it in moe-run: 20-30 us on the CPU
#   here for x's and the layer's gradients, module.zero_grad walking its
#   parameters), the back-to-back run keeps it in. Also the host time of a
#   call (enqueue only: no synchronize after it).
# - moe-run: the plan flexmoe compiled for the call (its JSON written out),
#   with flexmoe's own inputs (x, wg, w1, w2, grad_out as .npy, bf16 as raw
#   bits), so both route the same tokens; its forward and backward medians
#   (the runtime's events around each pass, with per-step timing on). Its
#   output is compared with flexmoe's.
# - --peers torch,tutel: the plain PyTorch grouped-GEMM layer
#   (bench/torch_moe_layer.py's moe_layer) and Tutel's moe_layer
#   (bench/tutel_layer.py) on flexmoe's inputs and weights, in the same
#   process, timed by the same time_calls (forward in training mode,
#   forward+backward with their gradients set to None before each), their
#   outputs compared with flexmoe's; one table with flexmoe's and moe-run's
#   rows. A peer that fails or cannot load is reported and skipped.
#
#   python3 bench/python_overhead.py [--moe-run build/bin/moe-run]
#       [--configs c1,c2,c3] [--iters 20] [--warmup 5] [--json out.json]
#       [--peers torch,tutel [--tutel-path DIR]]
#   python3 bench/python_overhead.py --device cpu --tokens 256 --model-dim 64
#       --hidden 128 --moe-run build/bin/moe-run     # a smoke test on a CPU
#
# ===----------------------------------------------------------------------=== #

import argparse
import ast
import ctypes
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import flexmoe
except ImportError:  # run from the repository, flexmoe not installed
    sys.path.insert(0, str(ROOT / "python"))
    import flexmoe
from flexmoe import _compiler  # noqa: E402

import torch_moe_layer  # noqa: E402  (bench/, beside this file)
import tutel_layer  # noqa: E402

# PERF.md's layers: d, h per expert, E, k (T = 16384, bf16, capacity 1.0).
CONFIGS = {
    "c1": dict(model_dim=4096, hidden=4096, experts=8, top_k=2),
    "c2": dict(model_dim=4096, hidden=14336, experts=8, top_k=2),
    "c3": dict(model_dim=2048, hidden=1408, experts=64, top_k=6),
}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}
NPY_DESCR = {torch.bfloat16: "<u2", torch.float16: "<f2",
             torch.float32: "<f4"}


# -- .npy without NumPy (moe-run reads bf16 as raw '<u2' bits) --------------


def write_npy(path, tensor):
    t = tensor.detach().contiguous().cpu()
    shape = tuple(t.shape) if t.dim() else (1,)
    header = (f"{{'descr': '{NPY_DESCR[t.dtype]}', 'fortran_order': False, "
              f"'shape': {shape}, }}")
    header += " " * (-(10 + len(header) + 1) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)))
        f.write(header.encode("latin1"))
        f.write(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))


def read_npy_f32(path):
    data = Path(path).read_bytes()
    major = data[6]
    size = struct.unpack("<H" if major == 1 else "<I",
                         data[8:10 if major == 1 else 12])[0]
    start = 10 if major == 1 else 12
    header = ast.literal_eval(data[start:start + size].decode("latin1"))
    if header["descr"] != "<f4":
        raise ValueError(f"{path}: {header['descr']}, expected <f4")
    flat = torch.frombuffer(bytearray(data[start + size:]),
                            dtype=torch.float32)
    return flat.view(header["shape"])


# -- timing -----------------------------------------------------------------


def time_calls(fn, device, warmup, iters, before=None):
    """Median device time (us) of fn over iters calls, each starting on an
    idle device, and the median host time of a call (us, enqueue only).
    before(), if given, runs before each call, untimed."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    device_us, host_us = [], []
    for _ in range(iters):
        if before:
            before()
        if device.type == "cuda":
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True)
                          for _ in range(2))
            start.record()
            t0 = time.perf_counter()
            fn()
            host_us.append((time.perf_counter() - t0) * 1e6)
            end.record()
            end.synchronize()
            device_us.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            host_us.append((time.perf_counter() - t0) * 1e6)
            device_us.append(host_us[-1])
    return statistics.median(device_us), statistics.median(host_us)


def make_layer(args, cfg, device, dtype):
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(cfg["model_dim"], cfg["hidden"], cfg["experts"],
                             top_k=cfg["top_k"],
                             capacity_factor=args.capacity_factor,
                             dtype=dtype, device=device)
    x = torch.randn(args.tokens, cfg["model_dim"], device=device,
                    dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    return layer, x, grad_out


def back_to_back(fn, device, iters):
    """Mean device time (us) of fn over iters calls enqueued one after the
    other (no synchronization between them, as in training), and the
    caching allocator's device allocations (cudaMalloc) during them: with
    per-call synchronization (time_calls) the host's work before a call's
    first launch is inside its time; here it overlaps the previous call."""
    if device.type != "cuda":
        return None, None
    fn()
    torch.cuda.synchronize()
    allocs = torch.cuda.memory_stats().get("num_device_alloc", 0)
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    allocs = torch.cuda.memory_stats().get("num_device_alloc", 0) - allocs
    return start.elapsed_time(end) * 1e3 / iters, allocs


def time_layer(call, zero_grad, x, grad_out, device, args):
    """call() -> (y, l_aux) timed forward and forward+backward, as
    time_calls measures them: ((us, host us), (us, host us))."""
    one = torch.ones((), device=device)
    state = {}

    def forward():
        state["y"], state["l_aux"] = call()

    def set_grads_to_none():
        x.grad = None
        zero_grad()

    def forward_backward():
        y, l_aux = call()
        torch.autograd.backward([y, l_aux], [grad_out, one])

    def step():  # back to back, as a training step does it
        set_grads_to_none()
        forward_backward()

    forward()  # flexmoe: compiles the training plan; Tutel: its kernels
    fwd = time_calls(forward, device, args.warmup, args.iters)
    state["back_to_back"] = back_to_back(forward, device, args.iters)
    state.pop("y", None)
    state.pop("l_aux", None)
    both = time_calls(forward_backward, device, args.warmup, args.iters,
                      before=set_grads_to_none)
    back_to_back_results.append(
        (state["back_to_back"], back_to_back(step, device, args.iters)))
    return fwd, both


def prologue_split(layer, x, device, iters):
    """Where a synchronized forward's time goes: (median us from the call to
    the C API's forward call, its GPU side being idle; median us from there
    to the end of the forward's work), by wrapping Executable.run with an
    event before the C call."""
    if device.type != "cuda":
        return None, None
    from flexmoe import _runtime
    original = _runtime.Executable.run
    marks = {}

    def run(self, forward, *args):
        if forward:
            marks["c"] = torch.cuda.Event(enable_timing=True)
            marks["c"].record()
        return original(self, forward, *args)

    _runtime.Executable.run = run
    try:
        python_us, rest_us = [], []
        for _ in range(iters):
            torch.cuda.synchronize()
            start, end = (torch.cuda.Event(enable_timing=True)
                          for _ in range(2))
            start.record()
            layer(x)
            end.record()
            end.synchronize()
            python_us.append(start.elapsed_time(marks["c"]) * 1e3)
            rest_us.append(marks["c"].elapsed_time(end) * 1e3)
    finally:
        _runtime.Executable.run = original
    return statistics.median(python_us), statistics.median(rest_us)


def host_breakdown(layer, x, grad_out, rounds, iters):
    """--breakdown (CPU): where flexmoe's forward and backward time goes,
    measured in this process with the three kinds of call interleaved (one
    of each in turn, rounds * iters times), so that a loaded machine's
    drift hits each alike: {name: (forward us, backward us)}, medians.

    - library: flexExecutableForward and flexExecutableBackward on buffers
      made once (moe-run's work, without its process);
    - torch floor: the smallest autograd.Function around the same two calls:
      new out, l_aux, workspace and gradients (torch.empty_like), no checks,
      a binding array made once; Function.apply, torch.autograd.backward,
      the engine and AccumulateGrad are torch's;
    - flexmoe: the layer's forward and torch.autograd.backward of (y,
      l_aux), as time_layer times them.
    Each starts with the gradients set to None, untimed."""
    from flexmoe import _capi, _runtime
    lib = _capi.library()
    if not lib.per_call_state:
        raise RuntimeError("--breakdown needs a libflex.so with per-call "
                           "state (FlexRunOptions.workspace)")
    plan = _compiler.plans.memory.get(layer.spec(x.shape[0], True))
    exe = _runtime.Executable(_runtime.context("cpu"), plan)
    names = [n for n in ("wg", "w1", "w2", "w3", "b1", "b2")
             if getattr(layer, n, None) is not None]
    params = [getattr(layer, n) for n in names]
    inputs = ["x"] + names

    def array(entries):
        a = (_capi.Binding * len(entries))()
        for entry, name in zip(a, entries):
            entry.name = name.encode()
        return a

    forward_array = array(inputs + ["out", "l_aux"])
    backward_array = array(inputs + ["grad_out", "grad_l_aux"] +
                           ["grad_" + n for n in inputs])
    options = _capi.RunOptions(ctypes.sizeof(_capi.RunOptions))
    options.flags = _capi.RUN_NO_TIMING
    options.workspace_bytes = plan.workspace_bytes
    align = plan.workspace_alignment
    size = plan.workspace_bytes + align

    def run(entry, bindings, tensors, workspace):
        for b, t in zip(bindings, tensors):
            b.data, b.bytes = t.data_ptr(), t.numel() * t.element_size()
        options.workspace = (workspace.data_ptr() + align - 1) // align * \
            align
        exe.check(entry(exe.handle, bindings, len(tensors),
                        ctypes.byref(options)), "the library's call")

    class Minimal(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, *weights):
            out = torch.empty_like(x)
            l_aux = torch.empty((), dtype=torch.float32)
            workspace = torch.empty(size, dtype=torch.uint8)
            run(lib.lib.flexExecutableForward, forward_array,
                (x, *weights, out, l_aux), workspace)
            ctx.save_for_backward(x, *weights, workspace)
            return out, l_aux

        @staticmethod
        def backward(ctx, grad_y, grad_l_aux):
            *tensors, workspace = ctx.saved_tensors
            grads = [torch.empty_like(t) for t in tensors]
            run(lib.lib.flexExecutableBackward, backward_array,
                (*tensors, grad_y.contiguous(), grad_l_aux, *grads),
                workspace)
            return tuple(grads)

    # The library's own calls: every buffer made once, as moe-run's.
    fixed = [x.detach()] + [p.detach() for p in params]
    fixed_forward = fixed + [torch.empty_like(x), torch.empty(())]
    fixed_backward = fixed + [grad_out, torch.ones(())] + [
        torch.empty_like(t) for t in fixed]
    fixed_workspace = torch.empty(size, dtype=torch.uint8)
    one = torch.ones(())

    def library():
        t0 = time.perf_counter()
        run(lib.lib.flexExecutableForward, forward_array, fixed_forward,
            fixed_workspace)
        t1 = time.perf_counter()
        run(lib.lib.flexExecutableBackward, backward_array, fixed_backward,
            fixed_workspace)
        return t1 - t0, time.perf_counter() - t1

    def autograd(call):
        def timed():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            y, l_aux = call()
            t1 = time.perf_counter()
            torch.autograd.backward([y, l_aux], [grad_out, one])
            return t1 - t0, time.perf_counter() - t1
        return timed

    cases = {"library": library,
             "torch floor": autograd(lambda: Minimal.apply(x, *params)),
             "flexmoe": autograd(lambda: layer(x))}
    times = {name: ([], []) for name in cases}
    for name, case in cases.items():  # warm-up
        for _ in range(5):
            case()
    for _ in range(rounds * iters):
        for name, case in cases.items():
            f, b = case()
            times[name][0].append(f * 1e6)
            times[name][1].append(b * 1e6)
    return {name: (statistics.median(f), statistics.median(b))
            for name, (f, b) in times.items()}


def print_breakdown(split, calls):
    print(f"  host breakdown (this process, interleaved, median of {calls} "
          f"calls each, us):")
    print(f"  {'':34s} {'forward':>9s} {'backward':>9s} {'fwd+bwd':>9s}")
    last = None
    notes = {"library": "moe-run's work",
             "torch floor": "+ torch's own: Function, autograd.backward, "
                            "engine, AccumulateGrad, new tensors",
             "flexmoe": "+ Flex's own: the layer, key, checks, bindings"}
    for name, (f, b) in split.items():
        row = f"  {name + ' (' + notes[name].split(':')[0] + ')':34s} " \
              f"{f:9.1f} {b:9.1f} {f + b:9.1f}"
        if last:
            row += (f"   {f - last[0]:+7.1f} {b - last[1]:+7.1f} "
                    f"{f + b - sum(last):+7.1f}")
        print(row)
        last = (f, b)
    print("  (" + "; ".join(f"{k}: {v}" for k, v in notes.items()) + ")")


# time_layer's back-to-back figures, latest last: ((fwd us, allocations),
# (fwd+bwd us, allocations)).
back_to_back_results = []


def time_flexmoe(layer, x, grad_out, device, args):
    return time_layer(lambda: layer(x),
                      lambda: layer.zero_grad(set_to_none=True), x,
                      grad_out, device, args)


def run_moe_run(args, layer, x, grad_out, device, workdir):
    """moe-run on the plan flexmoe ran, with its inputs: (forward us,
    backward us, relative L2 of moe-run's output against flexmoe's)."""
    spec = layer.spec(x.shape[0], True)
    plan = _compiler.plans.memory.get(spec)
    if plan is None:
        raise RuntimeError("the plan of the timed calls is not in flexmoe's "
                           "cache (spec mismatch)")
    plan_path = workdir / "plan.json"
    plan_path.write_text(plan.text)
    inputs, outputs = workdir / "inputs", workdir / "outputs"
    inputs.mkdir(exist_ok=True)
    for name, t in (("x", x), ("wg", layer.wg), ("w1", layer.w1),
                    ("w2", layer.w2), ("grad_out", grad_out)):
        write_npy(inputs / f"{name}.npy", t)
    command = [args.moe_run, str(plan_path), "--device", device.type,
               "--train", "--json", "--iters", str(args.iters), "--warmup",
               str(args.warmup), "--inputs", str(inputs), "--outputs",
               str(outputs)]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({run.returncode}):"
                           f"\n{run.stderr[-2000:]}")
    report = json.loads(run.stdout)
    with torch.no_grad():
        y, _ = layer(x)
    theirs = read_npy_f32(outputs / "out.npy")
    ours = y.float().cpu()
    diff = float((ours - theirs).norm() / theirs.norm().clamp(min=1e-30))
    # call_median_us: the whole call as the caller times it (the host's work
    # before the pass's first marker included), the figure comparable to
    # flexmoe's synchronized calls; older moe-runs lack it.
    calls = (report["forward"].get("call_median_us"),
             report["backward"].get("call_median_us"))
    return (report["forward"]["median_us"], report["backward"]["median_us"],
            diff, calls)


# -- peers: the plain PyTorch layer and Tutel's, on flexmoe's weights --------

PEER_NAMES = {"torch": "PyTorch grouped-GEMM", "tutel": "Tutel moe_layer"}


def load_peers(args):
    """{peer: its module, or why it cannot run} for --peers."""
    peers = {}
    for name in filter(None, args.peers.split(",")):
        if name == "torch":
            peers[name] = torch_moe_layer
        elif name == "tutel":
            try:
                peers[name] = tutel_layer.load(args.tutel_path, args.device)
            except Exception as error:  # report it, time the others
                peers[name] = f"not available: {type(error).__name__}: " \
                              f"{error}"
                print(f"tutel: {peers[name]}; its rows are skipped")
        else:
            raise SystemExit(f"python_overhead.py: unknown peer {name!r} "
                             f"(know {', '.join(PEER_NAMES)})")
    return peers


def peer_call(name, module, layer, x, device):
    """(call, zero_grad, notes) of a peer on flexmoe `layer`'s weights:
    call() -> (y, l_aux). The PyTorch layer takes flexmoe's parameters
    themselves (their gradients set to None before each step, as flexmoe's
    are); Tutel's holds copies in its own layout."""
    if name == "torch":
        if layer.capacity_factor < 0 or layer.gated or layer.bias or \
                layer.activation != "relu":
            raise ValueError("the PyTorch layer is relu FFN, fixed capacity "
                             "or dropless")
        capacity = module.capacity_of(x.shape[0], layer.num_experts,
                                      layer.top_k, layer.capacity_factor)
        return (lambda: module.moe_layer(
            x, layer.wg, layer.w1, layer.w2, layer.top_k, capacity,
            normalize=layer.normalize)[:2],
            lambda: layer.zero_grad(set_to_none=True), {})
    peer = tutel_layer.make(module, layer, device)
    notes = {"importer_exact": tutel_layer.importer_exact(peer, layer)}
    return (lambda: tutel_layer.call(peer, x),
            lambda: peer.zero_grad(set_to_none=True), notes)


def bench_peer(name, module, layer, x, grad_out, ref, device, args):
    """A peer's output against flexmoe's `ref` (y, l_aux) and its times,
    measured as flexmoe's are."""
    call, zero_grad, result = peer_call(name, module, layer, x, device)
    with torch.no_grad():
        y, l_aux = call()  # Tutel: compiles its kernels here
    result.update(tutel_layer.compare(y, l_aux, *ref))
    del y, l_aux
    (fwd, fwd_host), (both, both_host) = time_layer(call, zero_grad, x,
                                                    grad_out, device, args)
    result.update(forward_us=fwd, fwd_bwd_us=both, forward_host_us=fwd_host,
                  fwd_bwd_host_us=both_host)
    return result


def bench_peers(peers, layer, x, grad_out, device, args):
    with torch.no_grad():
        ref = layer(x)
    results = {}
    for name, module in peers.items():
        if isinstance(module, str):
            results[name] = {"error": module}
            continue
        try:
            results[name] = bench_peer(name, module, layer, x, grad_out, ref,
                                       device, args)
        except Exception as error:  # report it, go on
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def side_row(name, fwd, both, base, note=""):
    ratio = [f"{t / b:6.2f}x" if b else "" for t, b in zip((fwd, both), base)]
    return (f"  {name:22s} {fwd:10.1f} {ratio[0]:>7s} {both:10.1f} "
            f"{ratio[1]:>7s}  {note}")


def print_side_by_side(result):
    """flexmoe, moe-run and the peers in one table; x = time / flexmoe's."""
    base = (result["flexmoe_forward_us"], result["flexmoe_fwd_bwd_us"])
    print("  side by side, same inputs and weights (us; x = time over "
          "flexmoe's):")
    print(f"  {'':22s} {'forward':>10s} {'':>7s} {'fwd+bwd':>10s} {'':>7s}"
          f"  output vs flexmoe's")
    print(side_row("flexmoe", *base, base))
    if "moe_run_forward_us" in result:
        print(side_row("moe-run", result["moe_run_forward_us"],
                       result["moe_run_fwd_bwd_us"], base,
                       f"rel L2 {result['output_rel_l2']:.1e}"))
    for name, peer in result.get("peers", {}).items():
        if "error" in peer:
            print(f"  {PEER_NAMES[name]:22s} FAILED: {peer['error']}")
            continue
        note = (f"rel L2 {peer['output_rel_l2']:.1e}, max abs "
                f"{peer['output_max_abs']:.1e} (of "
                f"{peer['output_ref_max_abs']:.1e}), l_aux "
                f"{peer['l_aux_abs_diff']:.1e}")
        if "importer_exact" in peer:
            note += (", importer exact" if peer["importer_exact"] else
                     ", IMPORTER MISMATCH")
        print(side_row(PEER_NAMES[name], peer["forward_us"],
                       peer["fwd_bwd_us"], base, note))
        loud = tutel_layer.mismatch(peer)
        if loud:
            print(f"  {loud} ({PEER_NAMES[name]})")


def row(name, ours, theirs):
    if theirs is None:
        return f"  {name:18s} {ours:12.1f} {'-':>12s} {'-':>14s} {'-':>10s}"
    over = ours - theirs
    return (f"  {name:18s} {ours:12.1f} {theirs:12.1f} {over:14.1f} "
            f"{100 * over / theirs:9.2f}%")


def bench(args, name, cfg, device, dtype, workdir, peers):
    layer, x, grad_out = make_layer(args, cfg, device, dtype)
    # moe-run before and after flexmoe: the card's drift between processes
    # shows in their difference.
    ref_before = None
    if args.moe_run:
        layer(x)  # compiles the plan moe-run runs
        ref_before = run_moe_run(args, layer, x, grad_out, device, workdir)
    (fwd, fwd_host), (both, both_host) = time_flexmoe(layer, x, grad_out,
                                                      device, args)
    (b2b_fwd, allocs_fwd), (b2b_both, allocs_both) = back_to_back_results[-1]
    python_prologue, after_python = prologue_split(layer, x, device,
                                                   args.iters)
    result = {"config": name, **cfg, "tokens": args.tokens,
              "dtype": args.dtype, "capacity_factor": args.capacity_factor,
              "flexmoe_forward_us": fwd, "flexmoe_fwd_bwd_us": both,
              "flexmoe_forward_host_us": fwd_host,
              "flexmoe_fwd_bwd_host_us": both_host,
              "flexmoe_forward_back_to_back_us": b2b_fwd,
              "flexmoe_fwd_bwd_back_to_back_us": b2b_both,
              "device_allocations_back_to_back": [allocs_fwd, allocs_both],
              "forward_python_prologue_us": python_prologue,
              "forward_from_c_call_us": after_python}
    ref_fwd = ref_both = None
    if args.moe_run:
        after = run_moe_run(args, layer, x, grad_out, device, workdir)
        # The mean of the runs before and after flexmoe's.
        ref_fwd = (ref_before[0] + after[0]) / 2
        ref_bwd = (ref_before[1] + after[1]) / 2
        diff = after[2]
        ref_both = ref_fwd + ref_bwd
        if None not in after[3] + ref_before[3]:
            call_fwd = (ref_before[3][0] + after[3][0]) / 2
            call_both = call_fwd + (ref_before[3][1] + after[3][1]) / 2
            result.update(moe_run_call_forward_us=call_fwd,
                          moe_run_call_fwd_bwd_us=call_both,
                          overhead_call_forward_pct=100 * (fwd - call_fwd) /
                          call_fwd,
                          overhead_call_fwd_bwd_pct=100 * (both - call_both) /
                          call_both)
        result.update(moe_run_before_us=[ref_before[0],
                                         ref_before[0] + ref_before[1]],
                      moe_run_after_us=[after[0], after[0] + after[1]])
        result.update(moe_run_forward_us=ref_fwd, moe_run_backward_us=ref_bwd,
                      moe_run_fwd_bwd_us=ref_both, output_rel_l2=diff,
                      overhead_forward_us=fwd - ref_fwd,
                      overhead_fwd_bwd_us=both - ref_both,
                      overhead_forward_pct=100 * (fwd - ref_fwd) / ref_fwd,
                      overhead_fwd_bwd_pct=100 * (both - ref_both) / ref_both)
    if args.breakdown:
        if device.type != "cpu":
            print("  --breakdown: CPU only (on a GPU the host's work overlaps "
                  "the device's), skipped")
        else:
            split = host_breakdown(layer, x, grad_out, args.breakdown,
                                   args.iters)
            result["host_breakdown_us"] = split
    if peers:
        result["peers"] = bench_peers(peers, layer, x, grad_out, device, args)
    print(f"{name}: T {args.tokens}, d {cfg['model_dim']}, h {cfg['hidden']},"
          f" E {cfg['experts']}, top-{cfg['top_k']}, {args.dtype}, capacity "
          f"{args.capacity_factor} (median of {args.iters}, us)")
    print(f"  {'':18s} {'flexmoe':>12s} {'moe-run':>12s} {'overhead us':>14s}"
          f" {'overhead':>10s}")
    print(row("forward", fwd, ref_fwd))
    print(row("forward+backward", both, ref_both))
    print(f"  host time per call (enqueue): forward {fwd_host:.1f} us, "
          f"forward+backward {both_host:.1f} us")
    if b2b_fwd is not None:
        print(f"  back to back (no sync between calls): forward "
              f"{b2b_fwd:.1f} us, forward+backward {b2b_both:.1f} us; "
              f"device allocations in them: {allocs_fwd}, {allocs_both}")
    if python_prologue is not None:
        print(f"  synchronized forward split: {python_prologue:.1f} us of "
              f"Python before the C API call (the GPU idle), "
              f"{after_python:.1f} us from that call to the end")
    if "moe_run_call_forward_us" in result:
        print(f"  against moe-run's whole calls (its host work before the "
              f"pass included, as flexmoe's): forward "
              f"{result['moe_run_call_forward_us']:.1f} us "
              f"({result['overhead_call_forward_pct']:+.2f}%), "
              f"forward+backward {result['moe_run_call_fwd_bwd_us']:.1f} us "
              f"({result['overhead_call_fwd_bwd_pct']:+.2f}%)")
    if args.moe_run:
        print(f"  moe-run before / after flexmoe: forward "
              f"{result['moe_run_before_us'][0]:.1f} / "
              f"{result['moe_run_after_us'][0]:.1f} us, forward+backward "
              f"{result['moe_run_before_us'][1]:.1f} / "
              f"{result['moe_run_after_us'][1]:.1f} us")
    if args.moe_run:
        print(f"  moe-run's output vs flexmoe's: relative L2 "
              f"{result['output_rel_l2']:.1e} (same plan, same inputs)")
    if "host_breakdown_us" in result:
        print_breakdown(result["host_breakdown_us"],
                        args.breakdown * args.iters)
    if peers:
        print_side_by_side(result)
    del layer, x, grad_out
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="flexmoe.MoELayer's time against moe-run's on the same "
        "plan and inputs")
    p.add_argument("--moe-run", help="path of moe-run (built with CUDA); "
                   "without it only flexmoe is timed")
    p.add_argument("--configs", default="c1",
                   help="comma-separated PERF.md layers: c1, c2, c3")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--capacity-factor", type=float, default=1.0)
    p.add_argument("--model-dim", type=int, help="a layer of its own "
                   "(with --hidden, --experts, --top-k) instead of --configs")
    p.add_argument("--hidden", type=int)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--peers", default="", help="comma-separated layers to "
                   "time beside flexmoe on its inputs and weights: torch "
                   "(bench/torch_moe_layer.py), tutel (Tutel's moe_layer)")
    p.add_argument("--breakdown", type=int, default=0, metavar="ROUNDS",
                   help="CPU: also time, in this process and interleaved "
                   "(ROUNDS x --iters calls each), the library's calls "
                   "on buffers made once (moe-run's work), the smallest "
                   "autograd.Function around them (torch's floor) and "
                   "flexmoe: where the overhead goes")
    p.add_argument("--tutel-path", help="Tutel built in place (setup.py "
                   "build_ext --inplace: tutel/ and its extension); default "
                   "TUTEL_PATH, else an installed Tutel")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("python_overhead.py: no CUDA device (use --device cpu for a "
              "smoke test)", file=sys.stderr)
        return 2
    if args.model_dim:
        configs = {"custom": dict(model_dim=args.model_dim,
                                  hidden=args.hidden or 4 * args.model_dim,
                                  experts=args.experts, top_k=args.top_k)}
    else:
        configs = {c: CONFIGS[c] for c in args.configs.split(",")}
    info = flexmoe.library_info()
    gpu = (torch.cuda.get_device_name() if device.type == "cuda" else
           "cpu")
    print(f"python_overhead.py: {gpu}, torch {torch.__version__}, "
          f"{info['library']}")
    peers = load_peers(args)
    results = []
    with tempfile.TemporaryDirectory(prefix="flexmoe-overhead-") as tmp:
        for name, cfg in configs.items():
            workdir = Path(tmp) / name
            workdir.mkdir()
            try:
                results.append(bench(args, name, cfg, device,
                                     DTYPES[args.dtype], workdir,
                                     peers))
            except Exception as error:  # report, go on with the others
                print(f"{name}: FAILED: {type(error).__name__}: {error}")
                results.append({"config": name, "error": str(error)})
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"device": gpu, "torch": torch.__version__, "library": info,
             "results": results}, indent=2))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
