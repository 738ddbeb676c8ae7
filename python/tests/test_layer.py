# ===- test_layer.py - MoELayer against the fp64 reference ---------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Outputs, l_aux and every gradient of flexmoe.MoELayer against the plain
# PyTorch fp64 reference (reference.py) on fresh random inputs, with the
# library's outputs poisoned first (conftest.py); [num-1] tolerances.
#
# ===----------------------------------------------------------------------=== #

import pytest
import torch

import flexmoe
from flexmoe import _capi, _runtime
from reference import reference_moe, rel_l2

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# (name, layer arguments, tokens)
CONFIGS = [
    ("f32-relu-k2-fixed", dict(top_k=2, capacity_factor=1.0), 40),
    ("f32-gelu-k1-drop-bias",
     dict(top_k=1, capacity_factor=0.5, activation="gelu", bias=True,
          normalize=False), 36),
    ("f32-silu-k3-dropless-bp",
     dict(top_k=3, capacity_factor=0.0, activation="silu",
          batch_prioritized=True), 33),
    ("f32-gated-k2-bounded",
     dict(top_k=2, capacity_factor=-0.75, gated=True, activation="silu"), 40),
    ("f32-relu-k2-bp-bias-plain",
     dict(top_k=2, capacity_factor=1.25, bias=True, normalize=False,
          batch_prioritized=True, fp32_router=False), 29),
    ("bf16-relu-k2", dict(top_k=2, dtype=torch.bfloat16), 40),
    ("f16-gelu-k2-router16",
     dict(top_k=2, activation="gelu", dtype=torch.float16,
          fp32_router=False), 32),
    ("bf16-gated-dropless",
     dict(top_k=2, capacity_factor=0.0, gated=True, activation="silu",
          dtype=torch.bfloat16), 24),
]


def make_layer(E=5, d=16, h=24, **kw):
    layer = flexmoe.MoELayer(d, h, E, **kw)
    with torch.no_grad():  # larger gate weights: fewer near-ties in routing
        layer.wg.mul_(4.0)
    return layer


def reference_of(layer, x, grad_out, grad_l_aux, seed=0, noise=0.0):
    """out, l_aux and the gradients of (out . grad_out + grad_l_aux * l_aux)
    of the reference on the layer's (rounded) values, in fp64."""
    names = ["x"] + [n for n in ("wg", "w1", "w2", "w3", "b1", "b2")
                     if getattr(layer, n) is not None]
    leaves = {"x": x.detach().double().requires_grad_()}
    for n in names[1:]:
        leaves[n] = getattr(layer, n).detach().double().requires_grad_()
    f = layer.capacity_factor
    mode = "fixed" if f > 0 else "dropless" if f == 0 else "bounded"
    out, l_aux = reference_moe(
        leaves["x"], leaves["wg"], leaves["w1"], leaves["w2"],
        leaves.get("w3"), leaves.get("b1"), leaves.get("b2"),
        top_k=layer.top_k, capacity_mode=mode, capacity_factor=f,
        activation=layer.activation, normalize=layer.normalize,
        batch_prioritized=layer.batch_prioritized, gate_noise=noise,
        seed=seed)
    loss = (out * grad_out.double()).sum() + grad_l_aux * l_aux
    grads = torch.autograd.grad(loss, [leaves[n] for n in names])
    return out, l_aux, dict(zip(names, grads))


def run_flex(layer, x, grad_out, grad_l_aux):
    x = x.detach().requires_grad_()
    y = layer(x)  # (y, l_aux), or Tutel's y with y.l_aux
    y, l_aux = y if isinstance(y, tuple) else (y, y.l_aux)
    loss = (y.float() * grad_out).sum() + grad_l_aux * l_aux
    params = [getattr(layer, n) for n in ("wg", "w1", "w2", "w3", "b1", "b2")
              if getattr(layer, n) is not None]
    grads = torch.autograd.grad(loss, [x] + params)
    names = ["x"] + [n for n in ("wg", "w1", "w2", "w3", "b1", "b2")
                     if getattr(layer, n) is not None]
    return y, l_aux, dict(zip(names, grads))


def check_against_reference(layer, x, dtype, seed=0, noise=0.0,
                            grad_out=None):
    if grad_out is None:
        grad_out = torch.randn(x.shape).to(dtype).float()
    grad_l_aux = 0.7
    y, l_aux, grads = run_flex(layer, x, grad_out, grad_l_aux)
    ref_y, ref_l, ref_grads = reference_of(layer, x, grad_out, grad_l_aux,
                                           seed, noise)
    tol = TOLERANCE[dtype]
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_l2(y, ref_y) <= tol, f"out: {rel_l2(y, ref_y)}"
    assert abs(float(l_aux) - float(ref_l)) <= tol * abs(float(ref_l)) + 1e-7
    for name, g in grads.items():
        err = rel_l2(g, ref_grads[name])
        assert err <= tol, f"grad_{name}: relative L2 {err} > {tol}"
    return y


@pytest.mark.parametrize("name,kw,tokens", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_matches_reference(name, kw, tokens):
    dtype = kw.get("dtype", torch.float32)
    layer = make_layer(**kw)
    x = torch.randn(tokens, 16).to(dtype)
    check_against_reference(layer, x, dtype)


def test_capacity_drops_tokens():
    # A fixed capacity below the load drops slots: their tokens get zeros.
    layer = make_layer(E=4, top_k=1, capacity_factor=0.25)
    x = torch.randn(64, 16)
    y = check_against_reference(layer, x, torch.float32)
    assert (y.abs().sum(dim=1) == 0).sum() >= 64 - 4 * 4


def test_leading_dims_and_eval():
    layer = make_layer(top_k=2).eval()
    x = torch.randn(2, 3, 7, 16)
    with torch.no_grad():  # an inference plan: no backward steps
        y, l_aux = layer(x)
    assert y.shape == x.shape and l_aux.shape == ()
    ref, ref_l, _ = reference_of(layer, x.reshape(-1, 16),
                                 torch.zeros(42, 16), 0.0)
    assert rel_l2(y.reshape(-1, 16), ref) <= 1e-5
    assert layer.l_aux is l_aux


def test_gate_noise_seed_per_call():
    if not _capi.library().per_call_state:
        pytest.skip("this libflex.so has no per-call seed (FLEX_RUN_SEED)")
    layer = make_layer(top_k=2, gate_noise=1.0).train()
    x, grad_out = torch.randn(40, 16), torch.randn(40, 16)
    torch.manual_seed(7)  # the layer draws each call's seed from torch
    seed = int(torch.randint(0, 2**62, (1,)))
    torch.manual_seed(7)
    check_against_reference(layer, x, torch.float32, seed=seed, noise=1.0,
                            grad_out=grad_out)
    # Another step draws another seed: other noise, another routing.
    y1, _ = layer(x)
    y2, _ = layer(x)
    assert not torch.equal(y1, y2)
    torch.manual_seed(9)
    y3, _ = layer(x)
    torch.manual_seed(9)
    y4, _ = layer(x)
    assert torch.equal(y3, y4)  # torch.manual_seed reproduces a run
    layer.eval()  # no noise in eval mode
    with torch.no_grad():
        assert torch.equal(layer(x)[0], layer(x)[0])


@pytest.fixture(params=["per-call-state", "executable-per-forward"])
def state_mode(request):
    lib = _capi.library()
    saved = lib.per_call_state
    if request.param == "per-call-state" and not saved:
        pytest.skip("this libflex.so has no per-call workspace")
    lib.per_call_state = request.param == "per-call-state"
    _runtime.clear_runners()
    yield request.param
    lib.per_call_state = saved
    _runtime.clear_runners()


def test_forwards_in_flight(state_mode):
    # Activation checkpointing / micro-batches: several forwards, then the
    # backwards in another order; each gets its own forward's gradients.
    layer = make_layer(top_k=2, capacity_factor=0.0, bias=True)
    runs = []
    for i in range(3):
        x = torch.randn(30, 16).requires_grad_()
        y, l_aux = layer(x)
        runs.append((x, y, l_aux, torch.randn(30, 16)))
    for x, y, l_aux, grad_out in reversed(runs):
        params = [layer.wg, layer.w1, layer.w2, layer.b1, layer.b2]
        grads = torch.autograd.grad((y * grad_out).sum() + 0.5 * l_aux,
                                    [x] + params)
        _, _, ref = reference_of(layer, x, grad_out, 0.5)
        for name, g in zip(["x", "wg", "w1", "w2", "b1", "b2"], grads):
            assert rel_l2(g, ref[name]) <= 1e-5, name
    # A second backward of one forward is refused, with the library's word.
    x = torch.randn(30, 16).requires_grad_()
    y, l_aux = layer(x)
    y.sum().backward(retain_graph=True)
    with pytest.raises(flexmoe.FlexError, match="FAILED_PRECONDITION"):
        y.sum().backward()


def test_errors_are_exceptions():
    layer = make_layer(top_k=2)
    with pytest.raises(TypeError, match="cast it"):
        layer(torch.randn(8, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\)"):
        layer(torch.randn(8, 15))
    # The compiler's own message: [cap-1] 0 slots in Flex's strict layer.
    strict = make_layer(E=8, top_k=1, capacity_factor=0.1)
    with pytest.raises(flexmoe.FlexError, match=r"cap-1"):
        strict(torch.randn(8, 16))
    with pytest.raises(ValueError, match="bias is for FFN"):
        flexmoe.MoELayer(16, 24, 4, gated=True, bias=True,
                         activation="silu")
    with pytest.raises(ValueError, match="multiple of the world size"):
        flexmoe.MoELayer(16, 24, 6, world_size=4)


def test_parameter_layout_and_state_dict():
    layer = flexmoe.MoELayer(16, 24, 4, gated=True, activation="silu",
                             dtype=torch.bfloat16)
    shapes = {n: tuple(p.shape) for n, p in layer.named_parameters()}
    assert shapes == {"wg": (16, 4), "w1": (4, 16, 24), "w2": (4, 24, 16),
                      "w3": (4, 16, 24)}
    assert layer.wg.dtype == torch.float32 and layer.w1.dtype == torch.bfloat16
    state = layer.state_dict()
    assert state["_extra_state"]["num_experts"] == 4
    other = flexmoe.MoELayer(16, 24, 4, gated=True, activation="silu",
                             dtype=torch.bfloat16)
    other.load_state_dict(state)
    assert torch.equal(other.w3, layer.w3)
    wrong = flexmoe.MoELayer(16, 24, 8, gated=True, activation="silu",
                             dtype=torch.bfloat16)
    with pytest.raises((ValueError, RuntimeError)):
        wrong.load_state_dict(state)


def test_mlir_text():
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, capacity_factor=-1.5,
                             bias=True, activation="gelu")
    text = layer.mlir(32)
    assert "moe.layer ffn<gelu> %x, %wg, %w1, %w2 bias(%b1, %b2)" in text
    assert "#moe.capacity<bounded 1.5000000000000000e+00>" in text
    assert "tensor<32x16xf32>" in text and "normalize" in text


def test_dtype_conversion_follows_the_experts():
    layer = make_layer(top_k=2)
    x = torch.randn(20, 16)
    with torch.no_grad():
        layer(x)
        layer.bfloat16()  # a new plan in bf16; the router stays f32
        assert layer.dtype == torch.bfloat16
        assert layer.wg.dtype == torch.float32
        y, _ = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    check_against_reference(layer, x.bfloat16(), torch.bfloat16)
    with pytest.raises(TypeError, match="flexmoe layers run in"):
        layer.double()
