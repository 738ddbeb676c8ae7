# ===- test_ops.py - The custom ops under opcheck and torch.compile ------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# torch.library.opcheck on flexmoe::moe_forward (schema, fake kernel,
# registered autograd, AOT dispatch), torch.compile(fullgraph=True) of a
# module holding MoELayer, and the no-copy binding of the caller's tensors.
#
# ===----------------------------------------------------------------------=== #

import pytest
import torch

import flexmoe
from flexmoe import _ops
from reference import rel_l2


def _op_args(layer, tokens, requires_grad):
    x = torch.randn(tokens, layer.model_dim, requires_grad=requires_grad)
    key = _ops.call_key(layer._static_key, "", tokens, requires_grad,
                        layer.top_k, layer.capacity_factor, 0.0)
    params = [getattr(layer, n) for n in ("wg", "w1", "w2", "w3", "b1", "b2")]
    if not requires_grad:  # an inference plan: nothing may ask a gradient
        params = [p.detach() if p is not None else None for p in params]
    return (key, x, *params, torch.zeros(1, dtype=torch.int64), "")


@pytest.mark.parametrize("kw", [
    dict(top_k=2),
    dict(top_k=1, bias=True, capacity_factor=0.0, activation="gelu"),
    dict(top_k=2, gated=True, activation="silu", capacity_factor=-1.0),
], ids=["ffn", "bias-dropless", "gated-bounded"])
def test_opcheck_forward(kw):
    layer = flexmoe.MoELayer(16, 24, 4, **kw)
    for requires_grad in (True, False):
        args = _op_args(layer, 20, requires_grad)
        torch.library.opcheck(torch.ops.flexmoe.moe_forward.default, args)


@pytest.mark.parametrize("kw", [
    dict(top_k=2, bias=True),
    dict(top_k=2, gated=True, activation="silu", capacity_factor=0.0),
], ids=["ffn-bias", "gated-dropless"])
def test_eager_path_equals_the_custom_op(kw):
    """Eager calls take _ops.moe's autograd Function, torch.compile the
    custom op: the same outputs and gradients, bit for bit."""
    layer = flexmoe.MoELayer(16, 24, 4, **kw)
    results = []
    for forward in (_ops.moe, _ops.moe_forward):
        layer.zero_grad()
        args = list(_op_args(layer, 20, True))
        torch.manual_seed(5)
        args[1] = torch.randn(20, 16, requires_grad=True)
        y, l_aux, _ = forward(*args)
        (y.square().sum() + 3 * l_aux).backward()
        results.append([y.detach(), l_aux.detach(), args[1].grad] +
                       [p.grad.clone() for p in layer.parameters()])
    for eager, op in zip(*results):
        assert torch.equal(eager, op)


def _model(layer):

    class Block(torch.nn.Module):

        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(16)
            self.moe = layer

        def forward(self, x):
            y, l_aux = self.moe(self.norm(x))
            return x + y, l_aux

    return Block()


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, bias=True)
    model = _model(layer)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(2, 10, 16)
    grad = torch.randn(2, 10, 16)
    ys, grads = [], []
    for fn in (model, compiled):
        xi = x.clone().requires_grad_()
        y, l_aux = fn(xi)
        ((y * grad).sum() + 0.3 * l_aux).backward()
        ys.append((y.detach(), l_aux.detach()))
        grads.append([xi.grad] + [p.grad.clone() for p in model.parameters()])
        model.zero_grad()
    assert rel_l2(ys[1][0], ys[0][0]) <= 1e-6
    assert torch.allclose(ys[1][1], ys[0][1])
    for a, b in zip(grads[1], grads[0]):
        assert rel_l2(a, b) <= 1e-5
    # Inference under the compiled module: another plan, no recompile error.
    with torch.no_grad():
        y, _ = compiled(x)
    assert rel_l2(y, ys[0][0]) <= 1e-6


def test_binds_the_callers_tensors():
    # No copies: the op reads x and the parameters at their own addresses.
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    seen = []
    real = _ops._bind

    def spy(plan, bindings, tensors):
        addresses, sizes = real(plan, bindings, tensors)
        seen.extend(zip(bindings.names, addresses))
        return addresses, sizes

    _ops._bind = spy
    try:
        x = torch.randn(12, 16)
        with torch.no_grad():
            layer(x)
    finally:
        _ops._bind = real
    addresses = dict(seen)
    assert addresses["x"] == x.data_ptr()
    assert addresses["w1"] == layer.w1.data_ptr()
    assert addresses["wg"] == layer.wg.data_ptr()


def test_nan_input_is_refused_with_the_runtime_check(monkeypatch):
    """FLEX_CHECK_NAN=1 (the runtime's check_nonfinite, read when an
    executable is made) refuses a NaN input by name before anything runs;
    off by default, as the check reads every input and output back."""
    monkeypatch.setenv("FLEX_CHECK_NAN", "1")
    layer = flexmoe.MoELayer(12, 20, 3, top_k=1)  # a plan no test made yet
    x = torch.randn(7, 12)
    y, _ = layer(x)
    assert torch.isfinite(y).all()
    x[3, 5] = float("nan")
    with pytest.raises(flexmoe.FlexError, match="'x' has NaN or Inf at "
                       r"element 41 \(index \[3, 5\]\)"):
        layer(x)


def test_non_contiguous_input_warns():
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    x = torch.randn(16, 12).t()  # [12, 16], not contiguous
    with pytest.warns(UserWarning, match="not contiguous"):
        y, _ = layer(x)
    with pytest.raises(ValueError, match="contiguous"):
        _ops.moe_forward(*_op_args(layer, 12, False)[:1], x, layer.wg,
                         layer.w1, layer.w2, None, None, None,
                         torch.zeros(1, dtype=torch.int64), "")


def test_checks_stay_strict_after_warm_calls():
    """What a call caches (_ops._call, the plan's argument table) never
    skips a check: a parameter replaced after warm calls is refused as on
    the first call."""
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    x = torch.randn(12, 16)
    with torch.no_grad():
        for _ in range(3):
            y, _ = layer(x)
    w1 = layer.w1.data
    cases = [
        (torch.empty(4, 16, 25), r"'w1' must be torch.float32 of shape "
         r"\[4, 16, 24\].*got torch.float32 of shape \[4, 16, 25\]"),
        (w1.double(), "'w1' must be torch.float32.*got torch.float64"),
        (torch.empty(4, 24, 16).transpose(1, 2), "'w1' must be contiguous"),
    ]
    for data, message in cases:
        layer.w1.data = data
        with pytest.raises(ValueError, match=message):
            with torch.no_grad():
                layer(x)
    layer.w1.data = w1
    with torch.no_grad():
        assert torch.equal(layer(x)[0], y)
    with pytest.raises(ValueError, match="'x' must be"):
        _ops.moe(*_op_args(layer, 12, False)[:1], torch.randn(13, 16),
                 layer.wg, layer.w1, layer.w2, None, None, None,
                 torch.zeros(1, dtype=torch.int64), "")


def test_calls_without_autograd_match_the_function():
    """Under no_grad or inference_mode (or with nothing requiring a
    gradient) _ops.moe runs the forward's body without the autograd
    Function: the same outputs, bit for bit, and no graph."""
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, bias=True)
    x = torch.randn(20, 16, requires_grad=True)
    y, l_aux = layer(x)
    assert y.grad_fn is not None
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y2, l2 = layer(x)
        assert y2.grad_fn is None and l2.grad_fn is None
        assert torch.equal(y2, y.detach()) and torch.equal(l2, l_aux.detach())
    layer.requires_grad_(False)
    y3, l3 = layer(x.detach())  # an inference plan: nothing to record
    assert y3.grad_fn is None
    assert torch.equal(y3, y.detach()) and torch.equal(l3, l_aux.detach())


def test_a_first_call_under_fake_tensors_leaves_nothing_behind():
    """A call traced with fake tensors (make_fx, memory estimates) fails,
    and the real calls after it still run: nothing a call caches was made
    under its dispatch mode."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    x = torch.randn(8, 16)
    with pytest.raises(Exception):
        with FakeTensorMode(allow_non_fake_inputs=True):
            with torch.no_grad():
                layer(torch.randn(8, 16))
    with torch.no_grad():
        y, l_aux = layer(x)
    assert torch.isfinite(y).all() and torch.isfinite(l_aux)


def test_tensors_on_another_device_are_refused():
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    layer.wg = torch.nn.Parameter(layer.wg.detach().to("meta"))
    with pytest.raises(ValueError,
                       match="'wg' is on meta but x is on cpu"):
        with torch.no_grad():
            layer(torch.randn(8, 16))


def test_a_gradient_is_needed_when_a_tensor_of_the_op_needs_one():
    """A weight replaced by a plain tensor that requires a gradient (x and
    the parameters do not) trains; a submodule's parameter that requires
    one does not make the layer's call train."""
    torch.manual_seed(0)
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    w1 = layer.w1.detach().clone().requires_grad_()
    del layer.w1
    layer.requires_grad_(False)
    layer.w1 = w1 * 1.0
    x = torch.randn(12, 16)
    y, l_aux = layer(x)
    (y.sum() + l_aux).backward()
    assert w1.grad is not None and torch.isfinite(w1.grad).all()
    other = flexmoe.MoELayer(16, 24, 4, top_k=2)
    other.requires_grad_(False)
    other.extra = torch.nn.Linear(2, 2)  # requires a gradient
    y, _ = other(x)
    assert y.grad_fn is None  # nothing of the call needs one


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA device: the CUDA path runs on the GPU "
                    "machine (docs/Python.md)")
def test_cuda_matches_cpu():
    layer = flexmoe.MoELayer(64, 128, 8, top_k=2, dtype=torch.bfloat16)
    x = torch.randn(256, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        ref, ref_l = layer(x)
        layer.cuda()
        y, l_aux = layer(x.cuda())
    assert rel_l2(y.cpu(), ref) <= 2e-2
    assert abs(float(l_aux) - float(ref_l)) <= 1e-3


def test_the_gate_noise_seed_stays_on_the_host():
    """Under another default device the per-call seed is still a host
    tensor: the op reads it with .item(), which on a GPU tensor would
    synchronize every call."""
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, gate_noise=0.1)
    torch.set_default_device("meta")
    try:
        seeds = [layer._seed(0.1, False), layer._seed(0.0, True),
                 layer._seed(0.0, False)]
    finally:
        torch.set_default_device("cpu")
    assert all(s.device.type == "cpu" for s in seeds)


def test_a_copied_saved_state_is_refused_saying_why():
    """A saved-tensor hook that copies what autograd saves (offloading)
    hands the backward other memory than its forward wrote: refused, naming
    the hook and the ways out."""
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2)
    x = torch.randn(20, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(),
                                                  lambda t: t):
        y, l_aux = layer(x)
    with pytest.raises(RuntimeError, match="saved-tensor hook copied it"):
        (y.sum() + l_aux).backward()
    y, l_aux = layer(x)  # without the hook: trains
    (y.sum() + l_aux).backward()
    assert torch.isfinite(x.grad).all()


def test_each_variant_gets_its_own_workspace():
    """A call naming a variant allocates that variant's workspace_bytes
    (docs/Runtime.md, "Workspaces per variant"), auto the largest; each
    computes the same layer, backward included, on its own workspace."""
    layer = flexmoe.MoELayer(16, 24, 4, top_k=2, gated=True,
                             activation="silu", capacity_factor=0.0,
                             dtype=torch.bfloat16)
    args = list(_op_args(layer, 20, True))
    torch.manual_seed(7)
    args[1] = torch.randn(20, 16, dtype=torch.bfloat16, requires_grad=True)
    call = _ops._call(args[0], args[1].device)
    plan = call.plan
    assert len(plan.variants) > 1, plan.variants
    # The gather-fused variants need no dispatched copy of x.
    assert min(plan.variant_workspace_bytes.values()) < plan.workspace_bytes
    results = {}
    for name in [""] + plan.variants:
        args[-1] = name
        args[1].grad = None
        y, l_aux, state = _ops.moe_forward(*args)
        want = (plan.workspace_bytes if not name else
                plan.variant_workspace_bytes[name])
        assert want <= plan.workspace_bytes
        assert state.untyped_storage().nbytes() == want + call.align, name
        (y.float().square().sum() + 3 * l_aux).backward()
        results[name] = (y.detach().float(), args[1].grad.float())
    y0, g0 = results[""]
    for name, (y, g) in results.items():
        assert rel_l2(y, y0) < 2e-2, name
        assert rel_l2(g, g0) < 5e-2, name
