# ===- _ops.py - The layer's forward and backward as torch.library ops ---=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file defines flexmoe::moe_forward and flexmoe::moe_backward
# (torch.library.custom_op) with fake kernels and registered autograd, so
# torch.compile(fullgraph=True) traces the layer and opcheck passes.
#
# - Tensors are bound by data_ptr: the caller's contiguous tensors are read
#   in place, never copied; outputs, gradients and the workspace come from
#   torch.empty on the inputs' device (torch's caching allocator on CUDA).
# - The forward's workspace (the plan's bytes plus room to align them) holds
#   its saved state. The forward returns a zero-element view of it; autograd
#   saves the view (keeping the memory alive) and the backward hands it
#   back, so each forward's state travels with its own graph and several
#   forwards may be in flight. The backward writes scratch past the view's
#   (empty) extent, where nothing else reads, so both ops are declared
#   functional (docs/Python.md, "Forwards in flight").
# - CUDA: the pass is queued on torch.cuda.current_stream() with timing off
#   (no synchronization per call).
# - The op's first argument is the layer key: the JSON of the LayerSpec and
#   the communicator's name. It is a constant to torch.compile, so a new
#   token count traces (and compiles) a new plan.
# - Per call, the host work is kept small (small layers, decode): what a
#   (key, device) fixes (plan, runner, sizes, the C API's binding arrays
#   with what to check of each entry) is made once (_call), a call checks
#   the caller's tensors against it and writes only their addresses, the
#   outputs and gradients it makes (torch.empty_like) need no check, and a
#   call autograd records nothing of skips the autograd Function
#   (docs/Python.md, "The Python layer's overhead").
#
# ===----------------------------------------------------------------------=== #

import functools
import json
from typing import List, Optional, Tuple

import torch

from . import _compiler, _runtime
from ._compiler import LayerSpec, capacity_mode

# Tests set this: outputs and gradients are filled with NaN before the run,
# so an element the library does not write cannot pass.
POISON_OUTPUTS = False

TORCH_DTYPES = {
    "f32": torch.float32,
    "bf16": torch.bfloat16,
    "f16": torch.float16,
    "i32": torch.int32
}

# Communicators by name (the layer's process group), set by
# flexmoe.distributed; "" is one rank.
communicators = {}


# The fields of a LayerSpec a call chooses; the others are the layer's.
CALL_FIELDS = ("tokens", "training", "top_k", "capacity_factor",
               "gate_noise")


def static_key(spec):
    """The part of a layer key fixed at construction: JSON of the spec's
    other fields."""
    fields = json.loads(spec.key())
    for name in CALL_FIELDS + ("capacity_mode",):
        fields.pop(name)
    return json.dumps(fields, sort_keys=True)


def call_key(static, group, tokens, training, top_k, capacity_factor,
             gate_noise):
    """The op's key: plain string formatting, which torch.compile traces as
    a constant. `capacity_factor` is Tutel's (0 dropless, < 0 bounded)."""
    return (f"{static}|{group}|{tokens}|{int(training)}|{top_k}|"
            f"{float(capacity_factor)}|{float(gate_noise)}")


def make_key(spec, group=""):
    factor = {"fixed": spec.capacity_factor, "dropless": 0.0,
              "bounded": -spec.capacity_factor}[spec.capacity_mode]
    return call_key(static_key(spec), group, spec.tokens, spec.training,
                    spec.top_k, factor, spec.gate_noise)


@functools.lru_cache(maxsize=None)
def _parse_key(key):
    static, group, tokens, training, top_k, factor, noise = key.split("|")
    fields = json.loads(static)
    fields["variants"] = tuple(fields["variants"])
    mode, factor = capacity_mode(float(factor))
    spec = LayerSpec(tokens=int(tokens), training=training == "1",
                     top_k=int(top_k), capacity_mode=mode,
                     capacity_factor=factor, gate_noise=float(noise),
                     **fields)
    return spec, group


def _device_key(device):
    if device.type == "cpu":
        return "cpu"
    if device.type == "cuda":
        return ("cuda", device.index if device.index is not None else
                torch.cuda.current_device())
    raise ValueError(f"flexmoe runs on cpu and cuda tensors, got {device}")


def _aligned(workspace, plan):
    """The forward's workspace in `workspace`'s memory: its storage's first
    address aligned to the plan's alignment (the same for the forward's
    tensor and the zero-element view of it the backward gets), and the
    bytes from there (the runtime checks they hold the forward's variant)."""
    storage = workspace.untyped_storage()
    address = storage.data_ptr()
    align = plan.workspace_alignment
    aligned = (address + align - 1) // align * align
    nbytes = storage.nbytes() - (aligned - address)
    if nbytes <= 0:
        raise RuntimeError(
            f"flexmoe: the saved state holds {storage.nbytes()} bytes, no "
            f"workspace; pass the third output of the forward op to the "
            f"backward op unchanged")
    return aligned, nbytes


def _stream(device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


def _poison(tensors):
    """POISON_OUTPUTS: NaN in every element of new outputs and gradients."""
    for t in tensors:
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))


def _check_arg(plan, name, tensor):
    arg = plan.arguments.get(name)
    if arg is None:
        raise ValueError(f"flexmoe: the layer's plan has no argument "
                         f"'{name}', but a tensor was given for it")
    shape = list(tensor.shape) if tensor.dim() else [1]
    dtype = TORCH_DTYPES[arg["dtype"]]
    if shape != arg["shape"] or tensor.dtype != dtype:
        raise ValueError(
            f"flexmoe: '{name}' must be {dtype} of shape {arg['shape']} "
            f"(docs/PlanFormat.md, Arguments), got {tensor.dtype} of shape "
            f"{list(tensor.shape)}")
    if not tensor.is_contiguous():
        raise ValueError(f"flexmoe: '{name}' must be contiguous; call "
                         f".contiguous() first (flexmoe binds tensors "
                         f"in place, without copies)")


def _check_devices(device, tensors, names):
    """Every tensor on x's device: the library gets their addresses, which
    mean nothing on another device."""
    for tensor, name in zip(tensors, names):
        if tensor is not None and tensor.device != device:
            raise ValueError(
                f"flexmoe: '{name}' is on {tensor.device} but x is on "
                f"{device}: the layer's tensors must be on one device "
                f"(move the layer with .to({str(device)!r}))")


def _expected(plan):
    """(shape tuple, torch dtype, bytes) of each of the plan's arguments by
    name, made once per plan; None for a dtype torch has not."""
    table = plan.__dict__.get("_flexmoe_expected")
    if table is None:
        table = {}
        for name, arg in plan.arguments.items():
            dtype = TORCH_DTYPES.get(arg["dtype"])
            nbytes = dtype.itemsize if dtype is not None else 0
            for n in arg["shape"]:
                nbytes *= n
            table[name] = (tuple(arg["shape"]), dtype, nbytes)
        plan._flexmoe_expected = table
    return table


# The op's tensor arguments, in the order of its schema (and of the
# bindings): the forward binds those given and then out and l_aux; the
# backward those given, grad_out, grad_l_aux, and the gradients of those
# given, in the same order.
_INPUTS = ("x", "wg", "w1", "w2", "w3", "b1", "b2")
_GRAD_NAMES = {n: "grad_" + n for n in _INPUTS}
_BACKWARD = 8  # _Call.bindings: the key bit of the backward's


def _make_bindings(plan, kind):
    """The Bindings of a forward (kind < _BACKWARD) or backward (kind |
    _BACKWARD) whose optional inputs w3, b1, b2 are given as kind's bits 0,
    1, 2 say, with what _bind checks of each entry in `checks`: (name,
    shape, dtype, check). Every tensor the caller gives is checked; those
    the call makes (out like x, l_aux a new 0-dim f32 tensor, each gradient
    like its input: torch.empty_like, contiguous) have the plan's shape and
    dtype when what they are made like does and the plan gives both the
    same, so they are checked only where it does not."""
    expected = _expected(plan)
    given = [n for i, n in enumerate(_INPUTS) if i < 4 or kind >> (i - 4) & 1]
    if kind & _BACKWARD:
        names = (given + ["grad_out", "grad_l_aux"] +
                 [_GRAD_NAMES[n] for n in given])
        like = {_GRAD_NAMES[n]: expected.get(n) for n in given}
    else:
        names = given + ["out", "l_aux"]
        like = {"out": expected.get("x"), "l_aux": ((1, ), torch.float32)}
    checks, sizes = [], []
    for name in names:
        shape, dtype, nbytes = expected.get(name, ((), None, 0))
        made = like.get(name)
        check = (dtype is None or made is None or
                 tuple(made[:2]) != (shape, dtype))
        checks.append((name, shape, dtype, check))
        sizes.append(nbytes)
    bindings = _runtime.Bindings(names, sizes)
    bindings.checks = tuple(checks)
    return bindings


def _bind(plan, bindings, tensors):
    """The addresses of `tensors` for `bindings`' entries, each checked
    against the plan (_check_arg's test, inlined: a 0-dim tensor binds shape
    [1]), and their sizes: None for the plan's."""
    addresses = []
    for (_, shape, dtype, check), tensor in zip(bindings.checks, tensors):
        if check:
            got = tensor.shape
            if (dtype is None or (got != shape if got else shape != (1, ))
                    or tensor.dtype != dtype or not tensor.is_contiguous()):
                return _bind_checked(plan, bindings, tensors)
        addresses.append(tensor.data_ptr())
    return addresses, None


def _bind_checked(plan, bindings, tensors):
    """_bind for tensors of which one differs from the plan: each through
    _check_arg (raising, saying why), with the sizes of their own."""
    for name, tensor in zip(bindings.names, tensors):
        _check_arg(plan, name, tensor)
    return ([t.data_ptr() for t in tensors],
            [t.numel() * t.element_size() for t in tensors])


def _runner(key, device):
    spec, group = _parse_key(key)
    plan = _compiler.plans.get(spec)
    comm = communicators.get(group) if group else None
    if group and comm is None:
        raise RuntimeError(f"flexmoe: no communicator for process group "
                           f"'{group}' in this process")
    return plan, _runtime.runner(plan, _device_key(device), comm)


class _Call:
    """What every call of one key on one device looks up (_runner): found
    once, then kept in _calls (docs/Python.md, "The Python layer's
    overhead")."""

    __slots__ = ("plan", "runner", "group", "comm", "align", "training",
                 "noise", "cuda", "bindings")

    def __init__(self, key, device):
        self.plan, self.runner = _runner(key, device)
        self.group = _parse_key(key)[1]
        self.comm = communicators.get(self.group) if self.group else None
        self.align = self.plan.workspace_alignment
        self.training = self.plan.spec.training
        self.noise = self.plan.spec.gate_noise != 0.0
        self.cuda = device.type == "cuda"
        self.bindings = {}  # _make_bindings' by kind

    def bindings_of(self, kind):
        bindings = self.bindings.get(kind)
        if bindings is None:
            bindings = self.bindings[kind] = _make_bindings(self.plan, kind)
        return bindings


# _Call by (key, device), valid for the generations of the plan cache and
# the runners it was made in (flexmoe.clear_cache empties both).
_calls = {}
_calls_generation = (-1, -1)


def _call(key, device):
    global _calls_generation
    generation = (_compiler.plans.generation, _runtime.generation)
    if generation != _calls_generation:
        _calls.clear()
        _calls_generation = generation
    call = _calls.get((key, device))
    if call is None or (call.group and
                        communicators.get(call.group) is not call.comm):
        call = _calls[(key, device)] = _Call(key, device)
    else:
        _compiler.plans.count_memory_hit()  # as plans.get counts it
    return call


def _optional_bits(w3, b1, b2):
    """_make_bindings' kind of the optional inputs given."""
    return ((w3 is not None) | (b1 is not None) << 1 | (b2 is not None) << 2)


def _forward_impl(key, x, wg, w1, w2, w3, b1, b2, seed, variant):
    """moe_forward's body (the custom op and calls without autograd): out,
    l_aux and the zero-element view of the workspace."""
    out, l_aux, workspace = _forward_run(key, x, wg, w1, w2, w3, b1, b2, seed,
                                         variant)
    return out, l_aux, workspace[:0]


def _forward_run(key, x, wg, w1, w2, w3, b1, b2, seed, variant):
    """The forward's run: out, l_aux and the workspace holding its saved
    state (_forward_impl's and the eager Function's)."""
    device = x.device
    _check_devices(device, (wg, w1, w2, w3, b1, b2), ("wg", "w1", "w2", "w3",
                                                      "b1", "b2"))
    call = _call(key, device)
    plan = call.plan
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    # Made from x, never from a tensor kept across calls: a kept one made
    # under a dispatch mode (fake tensors) or a CUDA graph's private pool
    # would carry that mode or pool into every later call.
    l_aux = x.new_empty((), dtype=torch.float32)
    # The variant's workspace (each variant needs only its own part, asked
    # once per variant), with room to align: torch's CPU allocator aligns
    # to 64 bytes, plans ask for up to 256.
    nbytes = call.runner.workspace_bytes(variant)
    workspace = x.new_empty(nbytes + call.align, dtype=torch.uint8)
    if POISON_OUTPUTS:
        _poison((out, l_aux))
    kind = _optional_bits(w3, b1, b2)
    bindings = call.bindings.get(kind) or call.bindings_of(kind)
    addresses, sizes = _bind(plan, bindings, (
        x, wg, w1, w2, out, l_aux) if not kind else [
            t for t in (x, wg, w1, w2, w3, b1, b2, out, l_aux)
            if t is not None
        ])
    seed_value = int(seed.item()) if call.noise else None
    # A new workspace starts its storage: _aligned's address, unchecked.
    align = call.align
    address = (workspace.data_ptr() + align - 1) // align * align
    if call.cuda:
        with torch.cuda.device(device):
            call.runner.forward(bindings, addresses, sizes, address, nbytes,
                                _stream(device), seed_value, variant,
                                call.training)
    else:
        call.runner.forward(bindings, addresses, sizes, address, nbytes, None,
                            seed_value, variant, call.training)
    return out, l_aux, workspace


@torch.library.custom_op("flexmoe::moe_forward", mutates_args=())
def moe_forward(key: str, x: torch.Tensor, wg: torch.Tensor,
                w1: torch.Tensor, w2: torch.Tensor,
                w3: Optional[torch.Tensor], b1: Optional[torch.Tensor],
                b2: Optional[torch.Tensor], seed: torch.Tensor,
                variant: str) -> Tuple[torch.Tensor, torch.Tensor,
                                       torch.Tensor]:
    """out [T, d], l_aux [] f32 and the forward's saved state: a
    zero-element uint8 view of its workspace. Autograd keeps the view, and
    so the workspace's memory, until the backward; being empty, it compares
    equal in opcheck and costs nothing to save."""
    return _forward_impl(key, x, wg, w1, w2, w3, b1, b2, seed, variant)


@moe_forward.register_fake
def _(key, x, wg, w1, w2, w3, b1, b2, seed, variant):
    spec, _ = _parse_key(key)
    _compiler.plans.get(spec)  # a layer that does not compile fails tracing
    out = x.new_empty(x.shape)
    l_aux = x.new_empty((), dtype=torch.float32)
    return out, l_aux, x.new_empty(0, dtype=torch.uint8)


def _backward_impl(key, grad_out, grad_l_aux, x, wg, w1, w2, w3, b1, b2,
                   workspace, variant):
    """moe_backward's body (the custom op and the eager path share it)."""
    device = x.device
    _check_devices(device, (grad_out, grad_l_aux, wg, w1, w2, w3, b1, b2),
                   ("grad_out", "grad_l_aux", "wg", "w1", "w2", "w3", "b1",
                    "b2"))
    call = _call(key, device)
    plan = call.plan
    if not call.training:
        raise RuntimeError("flexmoe: this forward ran an inference plan "
                           "(no gradient was required); run it with "
                           "torch.enable_grad() to train")
    kind = _optional_bits(w3, b1, b2)
    inputs = (x, wg, w1, w2) if not kind else [
        t for t in (x, wg, w1, w2, w3, b1, b2) if t is not None
    ]
    grads = [
        torch.empty_like(t, memory_format=torch.contiguous_format)
        for t in inputs
    ]
    if POISON_OUTPUTS:
        _poison(grads)
    if grad_l_aux.dim():  # a 0-dim tensor binds shape [1] as it is
        grad_l_aux = grad_l_aux.reshape(1)
    bindings = (call.bindings.get(kind | _BACKWARD) or
                call.bindings_of(kind | _BACKWARD))
    addresses, sizes = _bind(plan, bindings,
                             (*inputs, grad_out, grad_l_aux, *grads))
    if call.cuda:
        workspace.record_stream(torch.cuda.current_stream(workspace.device))
        with torch.cuda.device(device):
            call.runner.backward(bindings, addresses, sizes,
                                 *_aligned(workspace, plan), _stream(device),
                                 variant)
    else:
        call.runner.backward(bindings, addresses, sizes,
                             *_aligned(workspace, plan), None, variant)
    return grads


@torch.library.custom_op("flexmoe::moe_backward", mutates_args=())
def moe_backward(key: str, grad_out: torch.Tensor, grad_l_aux: torch.Tensor,
                 x: torch.Tensor, wg: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, w3: Optional[torch.Tensor],
                 b1: Optional[torch.Tensor], b2: Optional[torch.Tensor],
                 workspace: torch.Tensor, variant: str) -> List[torch.Tensor]:
    """The gradients of x, wg, w1, w2 and (when the layer has them) w3, b1,
    b2, in that order, of the forward whose saved state (`workspace`, the
    forward's third output) is given."""
    return _backward_impl(key, grad_out, grad_l_aux, x, wg, w1, w2, w3, b1,
                          b2, workspace, variant)


@moe_backward.register_fake
def _(key, grad_out, grad_l_aux, x, wg, w1, w2, w3, b1, b2, workspace,
      variant):
    return [
        t.new_empty(t.shape) for t in (x, wg, w1, w2, w3, b1, b2)
        if t is not None
    ]


def _setup_context(ctx, inputs, output):
    key, x, wg, w1, w2, w3, b1, b2, seed, variant = inputs
    _, _, workspace = output
    ctx.key, ctx.variant = key, variant
    ctx.save_for_backward(x, wg, w1, w2, w3, b1, b2, workspace)


def _check_saved_state(ctx, workspace):
    """The backward reads what its forward left in the workspace, where it
    left it: a saved-tensor hook that copies it (offloading to the host,
    compression) hands back other memory, which the library would refuse
    without saying why. The eager Function's check (the custom op's context
    is set up on fake tensors when compiled, which have no address)."""
    if workspace.data_ptr() != ctx.workspace_address:
        raise RuntimeError(
            "flexmoe: the forward's saved state came back at another address: "
            "a saved-tensor hook copied it (torch.autograd.graph.save_on_cpu, "
            "activation offloading, a pack hook). Its backward must read the "
            "memory its forward wrote: run the layer outside such hooks "
            "(torch.autograd.graph.disable_saved_tensors_hooks), or recompute "
            "it (torch.utils.checkpoint)")


def _backward(ctx, grad_out, grad_l_aux, grad_workspace):
    x, wg, w1, w2, w3, b1, b2, workspace = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(x)
    if grad_l_aux is None:
        grad_l_aux = torch.zeros((), dtype=torch.float32, device=x.device)
    grads = moe_backward(ctx.key, grad_out.contiguous(),
                         grad_l_aux.contiguous(), x, wg, w1, w2, w3, b1, b2,
                         workspace, ctx.variant)
    return (None, ) + _input_grads(grads, w3, b1, b2) + (None, None)


def _input_grads(grads, w3, b1, b2):
    """The gradients of x, wg, w1, w2, w3, b1, b2 (None for those not
    given) from the backward's list of those given."""
    if len(grads) == 4:
        return (grads[0], grads[1], grads[2], grads[3], None, None, None)
    rest = iter(grads[4:])
    return (grads[0], grads[1], grads[2], grads[3],
            next(rest) if w3 is not None else None,
            next(rest) if b1 is not None else None,
            next(rest) if b2 is not None else None)


moe_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerMoE(torch.autograd.Function):
    """The same forward and backward without torch's custom-op dispatch
    (filling the schema's defaults, the autograd wrapper, redispatch: about
    half of an eager call's Python time, docs/Python.md). torch.compile and
    tracing take the custom op (moe), which they can see through."""

    @staticmethod
    def forward(ctx, key, x, wg, w1, w2, w3, b1, b2, seed, variant):
        out, l_aux, workspace = _forward_run(key, x, wg, w1, w2, w3, b1, b2,
                                             seed, variant)
        ctx.key, ctx.variant = key, variant
        ctx.workspace_address = workspace.data_ptr()
        # The workspace itself, not an output (the custom op's zero-element
        # view, marked non-differentiable, is for torch.compile): saved, so
        # released after the backward as the op's view is.
        ctx.save_for_backward(x, wg, w1, w2, w3, b1, b2, workspace)
        return out, l_aux

    @staticmethod
    def backward(ctx, grad_out, grad_l_aux):
        # _backward's, calling the backward's body without the custom op.
        x, wg, w1, w2, w3, b1, b2, workspace = ctx.saved_tensors
        _check_saved_state(ctx, workspace)
        if grad_out is None:
            grad_out = torch.zeros_like(x)
        if grad_l_aux is None:
            grad_l_aux = torch.zeros((), dtype=torch.float32, device=x.device)
        grads = _backward_impl(ctx.key, grad_out.contiguous(),
                               grad_l_aux.contiguous(), x, wg, w1, w2, w3, b1,
                               b2, workspace, ctx.variant)
        return (None, ) + _input_grads(grads, w3, b1, b2) + (None, None)


def _records_graph(tensors):
    """Whether autograd would record a call on these tensors: grad mode on
    and one requires a gradient, or forward-mode AD active."""
    if _forward_ad._current_level >= 0:
        return True
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


_forward_ad = torch.autograd.forward_ad


def moe(key, x, wg, w1, w2, w3, b1, b2, seed, variant, records=None):
    """The layer's forward, (out, l_aux, state): the custom op under
    torch.compile or tracing, the eager autograd Function otherwise (same
    kernels, same results; its graph keeps the state, so state is None),
    or, when autograd records nothing (no_grad, inference), the forward's
    body alone: the Function would only cost its set-up. `records`, from a
    caller that knows the call is neither compiled nor traced: whether
    autograd records it (_records_graph's answer, or True where a gradient
    is needed)."""
    if records is None:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return moe_forward(key, x, wg, w1, w2, w3, b1, b2, seed,
                               variant)
        records = _records_graph((x, wg, w1, w2, w3, b1, b2))
    if records:
        out, l_aux = _EagerMoE.apply(key, x, wg, w1, w2, w3, b1, b2, seed,
                                     variant)
        return out, l_aux, None
    return _forward_impl(key, x, wg, w1, w2, w3, b1, b2, seed, variant)
