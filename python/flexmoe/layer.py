# ===- layer.py - flexmoe.MoELayer, the Flex MoE layer as an nn.Module ---=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file defines MoELayer: its parameters are nn.Parameters in the plan's
# layout (docs/PlanFormat.md, "Arguments": wg [d, E], w1 [L, d, h], w2
# [L, h, d], w3 [L, d, h], b1 [L, h], b2 [L, d], L = E / W experts on this
# rank), and its forward compiles the layer for the call's token count on
# first use (a plan per T, cached) and runs it through the flexmoe custom
# ops. docs/Python.md describes the API.
#
# ===----------------------------------------------------------------------=== #

import warnings

import torch

from . import _compiler, _ops
from ._compiler import LayerSpec, capacity_mode

_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# The seed tensor of calls without gate noise (never read).
_NO_SEED = torch.zeros(1, dtype=torch.int64, device="cpu")
ACTIVATIONS = ("relu", "gelu", "silu")

# What get_extra_state writes: checkpoint conversion (W -> W') reads it.
STATE_FORMAT = "flexmoe.MoELayer"
STATE_VERSION = 1


def shard_layout(num_experts, hidden_size, world_size, rank):
    """This rank's experts: (first expert, experts held L, shard q, shards
    s). E >= W: L = E / W whole experts; E < W: one expert's shard q of s =
    W / E (its h / s hidden columns), PlanFormat.md "Many ranks"."""
    E, W = num_experts, world_size
    if E >= W:
        if E % W:
            raise ValueError(f"num_experts {E} must be a multiple of the "
                             f"world size {W} (each rank holds E / W)")
        L = E // W
        return rank * L, L, 0, 1
    if W % E:
        raise ValueError(f"with fewer experts ({E}) than ranks ({W}) the "
                         f"ranks must be a multiple of the experts")
    s = W // E
    if hidden_size % s:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of "
                         f"the {s} shards of each expert (W / E)")
    return rank // s, 1, rank % s, s


def extra_state(num_experts, model_dim, hidden_size, gated, bias,
                world_size, rank):
    """The `_extra_state` entry of a layer's checkpoint: its shape and which
    slice of the experts the rank holds (flexmoe.checkpoint re-cuts it)."""
    first, local, shard, shards = shard_layout(num_experts, hidden_size,
                                               world_size, rank)
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "num_experts": int(num_experts),
        "model_dim": int(model_dim),
        "hidden_size": int(hidden_size),
        "gated": bool(gated),
        "bias": bool(bias),
        "world_size": int(world_size),
        "rank": int(rank),
        "first_expert": first,
        "local_experts": local,
        "shard": shard,
        "shards": shards,
    }


def check_extra_state(state, mine, key="_extra_state"):
    """Raises ValueError, naming `key`, when a checkpoint's entry `state`
    does not describe the layer whose entry is `mine`."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else \
            type(state).__name__
        raise ValueError(f"{key}: not a {STATE_FORMAT} checkpoint entry "
                         f"(format {found!r})")
    version = state.get("version")
    if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        raise ValueError(f"{key}: checkpoint format version {version!r}; "
                         f"this flexmoe reads versions 1 to {STATE_VERSION} "
                         f"(a newer flexmoe wrote it?)")
    for field in ("num_experts", "model_dim", "hidden_size", "gated",
                  "bias"):
        if state.get(field) != mine[field]:
            raise ValueError(f"{key}: checkpoint of a layer with {field} = "
                             f"{state.get(field)}, this layer has "
                             f"{mine[field]}")
    W, r = state.get("world_size"), state.get("rank")
    if W != mine["world_size"]:
        raise ValueError(
            f"{key}: checkpoint of rank {r} of {W} ranks, this layer runs on "
            f"{mine['world_size']}: convert it first with `python -m "
            f"flexmoe.checkpoint convert --world-size {mine['world_size']} "
            f"...` (docs/Python.md, Checkpoints)")
    if r != mine["rank"]:
        raise ValueError(f"{key}: checkpoint of rank {r}, this layer is rank "
                         f"{mine['rank']} of {W}: load each rank's own file")


def _world(group, world_size, rank):
    if world_size is not None:
        return int(world_size), int(rank or 0)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group), dist.get_rank(group)
    return 1, 0


class MoELayer(torch.nn.Module):
    """A Mixture-of-Experts layer run by Flex.

    forward(x) returns (y, l_aux): y has x's shape, l_aux is the GShard
    auxiliary loss ([loss-1]) as a 0-dim f32 tensor (also kept as
    self.l_aux). x is (..., model_dim) of the layer's dtype.

    capacity_factor follows Tutel: f > 0 keeps k * int(f * ceil(T / E))
    slots per expert, 0 is dropless, f < 0 is dropless bounded by |f|.
    On one rank, a bf16/f16 dropless or bounded layer compiles with a
    gather-fused variant beside the plain one (the expert GEMMs read x
    through a row map instead of a dispatched copy); the runtime picks one
    per call by its cost model and measured times. fuse_dispatch=False
    compiles the plain one only, whose kernels (and so bits) never change
    between calls. fuse_glu=True adds, for gated (SwiGLU) bf16/f16 layers,
    variants computing the two up-projections and the glu in one step
    (--moert-fuse-glu); fuse_glu=False leaves them out.
    fuse_activation_backward=True adds, for bf16/f16 training plans,
    variants computing fc2's input gradient and the activation's (or the
    GLU's) backward in one step (--moert-fuse-activation-backward; off by
    default for now). fuse_combine=True adds, for bf16/f16 layers, variants
    computing fc2 and the combine in one step, the combine summed in the
    GEMM's store (--moert-fuse-combine; off by default for now).
    Many ranks: experts are sharded [E / W, ...] over the process group
    (flexmoe.distributed: NCCL on GPUs, the group's own collectives, e.g.
    gloo, on CPUs).
    """

    def __init__(self, model_dim, hidden_size, num_experts, top_k=2,
                 capacity_factor=1.0, activation="relu", gated=False,
                 bias=False, fp32_router=True, normalize=True,
                 batch_prioritized=False, gate_noise=0.0,
                 dtype=torch.float32, device=None, group=None,
                 world_size=None, rank=None, variants=None, seed=0,
                 a2a_ffn_overlap_degree=1, adaptive_r=None,
                 ranks_per_node=None, fuse_dispatch=True, fuse_glu=True,
                 fuse_activation_backward=False, fuse_combine=False):
        super().__init__()
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got "
                             f"{dtype}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got "
                             f"{activation!r}")
        if gated and bias:
            raise ValueError("bias is for FFN experts only; gated (SwiGLU) "
                             "experts have none ([expert-1])")
        if gated and activation != "silu":
            raise ValueError("gated experts are SwiGLU: activation must be "
                             "'silu'")
        for name, value in (("model_dim", model_dim),
                            ("hidden_size", hidden_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.model_dim, self.hidden_size = int(model_dim), int(hidden_size)
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.capacity_factor = float(capacity_factor)
        capacity_mode(self.capacity_factor)  # rejects NaN / inf now
        self.activation, self.gated, self.bias = activation, gated, bias
        self.fp32_router, self.normalize = fp32_router, normalize
        self.batch_prioritized = batch_prioritized
        self.gate_noise, self.dtype, self.seed = float(gate_noise), dtype, seed
        self.group = group
        self.world_size, self.rank = _world(group, world_size, rank)
        (self.first_expert, self.local_experts, self.shard,
         self.shards) = shard_layout(self.num_experts, self.hidden_size,
                                     self.world_size, self.rank)
        self.a2a_ffn_overlap_degree = int(a2a_ffn_overlap_degree)
        self.adaptive_r = adaptive_r
        # The hierarchical (2DH) exchange over nodes of this many ranks; one
        # node (or none given) keeps the flat one.
        self.ranks_per_node = int(ranks_per_node or 0)
        if self.ranks_per_node < 0 or (
                self.ranks_per_node and self.world_size % self.ranks_per_node):
            raise ValueError(f"ranks_per_node {self.ranks_per_node} must "
                             f"divide the world size {self.world_size}")
        if self.ranks_per_node >= self.world_size:
            self.ranks_per_node = 0
        self.variants = tuple(variants or self._default_variants())
        # The gather-fused plan variants (one rank, ragged, bf16/f16): the
        # automatic choice picks between them per call; False leaves them
        # out (one variant: the same kernels, so the same bits, every call).
        self.fuse_dispatch = bool(fuse_dispatch)
        # The glu-fused plan variants (gated bf16/f16 layers): picked per
        # call likewise; False leaves them out.
        self.fuse_glu = bool(fuse_glu)
        # The backward-fused plan variants (FFN training plans): picked per
        # call likewise; True adds them.
        self.fuse_activation_backward = bool(fuse_activation_backward)
        # The combine-fused plan variants: picked per call likewise; True
        # adds them.
        self.fuse_combine = bool(fuse_combine)
        self.group_name = ""
        self.l_aux = None
        self._call_keys = {}  # _call_key's keys by their arguments
        self._make_parameters(device)
        # The configuration is fixed from here on: the op key's static part.
        self._static_key = _ops.static_key(self.spec(1, True))

    def _default_variants(self):
        if self.world_size == 1:
            return ()
        D = max(1, self.a2a_ffn_overlap_degree)
        names = [f"r{self.shards}d1", "r0d1"]
        if D > 1:
            names.insert(0, f"r{self.shards}d{D}")
        if self.adaptive_r not in (None, 0, self.shards):
            names.insert(0, f"r{self.adaptive_r}d{D}")
        return names

    def _make_parameters(self, device):
        d, L = self.model_dim, self.local_experts
        h = self.hidden_size // self.shards
        router = torch.float32 if self.fp32_router else self.dtype
        kw = dict(device=device)
        P = torch.nn.Parameter
        self.wg = P(torch.empty(d, self.num_experts, dtype=router, **kw))
        self.w1 = P(torch.empty(L, d, h, dtype=self.dtype, **kw))
        self.w2 = P(torch.empty(L, h, d, dtype=self.dtype, **kw))
        self.w3 = (P(torch.empty(L, d, h, dtype=self.dtype, **kw))
                   if self.gated else None)
        self.b1 = (P(torch.empty(L, h, dtype=self.dtype, **kw))
                   if self.bias else None)
        self.b2 = (P(torch.empty(L, d, dtype=self.dtype, **kw))
                   if self.bias else None)
        for p in self.expert_parameters():
            p._flexmoe_expert = True
        self.reset_parameters()

    def _apply(self, fn, *args, **kwargs):
        """.to(dtype), .half(), .bfloat16(), .cuda(): the layer's dtype
        follows its experts' (a new plan); with fp32_router, wg stays f32."""
        out = super()._apply(fn, *args, **kwargs)
        dtype = self.w1.dtype
        if dtype not in _DTYPES:
            raise TypeError(f"flexmoe layers run in {list(_DTYPES)}, not "
                            f"{dtype}")
        if self.fp32_router and self.wg.dtype != torch.float32:
            self.wg.data = self.wg.data.float()
        elif not self.fp32_router and self.wg.dtype != dtype:
            self.wg.data = self.wg.data.to(dtype)
        if dtype != self.dtype:
            self.dtype = dtype
            self._static_key = _ops.static_key(self.spec(1, True))
        # A communicator is for one kind of device (NCCL: GPUs; the group's
        # collectives: CPUs): a layer moved between them takes the other
        # one at its next forward.
        if self.__dict__.get("group_name") and \
                self.__dict__.get("_group_device") != self.w1.device.type:
            self.group_name = ""
        return out

    def expert_parameters(self):
        """The parameters sharded over ranks (all but wg, which is
        replicated and data parallel: all-reduce its gradient)."""
        return [p for p in (self.w1, self.w2, self.w3, self.b1, self.b2)
                if p is not None]

    @torch.no_grad()
    def reset_parameters(self):
        """nn.Linear's initialization: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        d, h = self.model_dim, self.hidden_size
        self.wg.uniform_(-d**-0.5, d**-0.5)
        for p, fan_in in ((self.w1, d), (self.w3, d), (self.b1, d),
                          (self.w2, h), (self.b2, h)):
            if p is not None:
                p.uniform_(-fan_in**-0.5, fan_in**-0.5)

    def extra_repr(self):
        return (f"model_dim={self.model_dim}, hidden_size={self.hidden_size}"
                f", num_experts={self.num_experts}, top_k={self.top_k}, "
                f"capacity_factor={self.capacity_factor}, "
                f"{'gated' if self.gated else 'ffn<' + self.activation + '>'}"
                f", dtype={_DTYPES[self.dtype]}, world_size={self.world_size}")

    # -- checkpoints --------------------------------------------------------

    def get_extra_state(self):
        """What a checkpoint needs to be re-cut for another world size:
        docs/Python.md, "Checkpoints"."""
        return extra_state(self.num_experts, self.model_dim,
                           self.hidden_size, self.gated, self.bias,
                           self.world_size, self.rank)

    def set_extra_state(self, state):
        check_extra_state(state, self.get_extra_state())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The layer's description is checked before any tensor is copied, so
        # a checkpoint of another world size fails with its reason (not a
        # list of size mismatches) and leaves the layer as it was.
        key = prefix + "_extra_state"
        if key in state_dict:
            check_extra_state(state_dict[key], self.get_extra_state(), key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- running ------------------------------------------------------------

    def spec(self, tokens, training, top_k=None, capacity_factor=None):
        """The LayerSpec of a call with `tokens` tokens on this rank."""
        mode, factor = capacity_mode(
            self.capacity_factor if capacity_factor is None else
            capacity_factor)
        return LayerSpec(
            tokens=int(tokens), model_dim=self.model_dim,
            hidden_dim=self.hidden_size, experts=self.num_experts,
            top_k=int(top_k or self.top_k), capacity_mode=mode,
            capacity_factor=factor, gated=self.gated,
            activation=self.activation, bias=self.bias,
            dtype=_DTYPES[self.dtype], router_fp32=self.fp32_router,
            batch_prioritized=self.batch_prioritized,
            normalize_gate=self.normalize,
            gate_noise=self.gate_noise if self.training else 0.0,
            seed=int(self.seed), training=bool(training),
            world_size=self.world_size, variants=self.variants,
            ranks_per_node=self.ranks_per_node,
            fuse_dispatch=self.fuse_dispatch, fuse_glu=self.fuse_glu,
            fuse_activation_backward=self.fuse_activation_backward,
            fuse_combine=self.fuse_combine)

    def mlir(self, tokens, training=True):
        """The `moe.layer` IR this layer compiles for `tokens` tokens."""
        return _compiler.emit_mlir(self.spec(tokens, training))

    def variant_name(self, adaptive_r=None, a2a_ffn_overlap_degree=None):
        """The plan variant of a call: r<R>d<D> on many ranks, "" (the plan's
        choice) on one or when neither is given."""
        r = adaptive_r if adaptive_r is not None else self.adaptive_r
        D = a2a_ffn_overlap_degree
        if self.world_size == 1 or (r is None and D is None):
            return ""
        r = self.shards if r is None else int(r)
        D = self.a2a_ffn_overlap_degree if D is None else int(D)
        name = f"r{r}d{D if r else 1}"
        if r != 0 and (r < 0 or self.shards % r):
            raise ValueError(f"adaptive_r {r} must be 0 or divide the "
                             f"{self.shards} shards of each expert")
        if name not in self.variants:
            # A new variant is a new plan holding it beside the others (its
            # D joins the capacity's alignment, as Tutel aligns C to D).
            self.variants = self.variants + (name,)
            self._static_key = _ops.static_key(self.spec(1, True))
        return name

    def _seed(self, noise, compiling):
        """The gate noise's seed of this call, from torch's generator (so
        torch.manual_seed reproduces a run). Without noise the op never
        reads it: eager calls share one tensor."""
        if noise == 0.0:
            if compiling:
                return torch.zeros(1, dtype=torch.int64, device="cpu")
            return _NO_SEED
        # On the host whatever torch's default device is: the op reads it
        # there (a device tensor would cost a synchronization per call).
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device="cpu")

    def _call_key(self, tokens, needs_grad, top_k, capacity_factor, noise,
                  compiling):
        """_ops.call_key, kept per layer for its arguments in eager calls
        (torch.compile traces the formatting itself, a constant)."""
        fields = (self._static_key, self.group_name, tokens, needs_grad,
                  top_k, capacity_factor, noise)
        # Only plain numbers are kept: a tensor or NaN would add an entry per
        # call.
        if (compiling or type(top_k) is not int or
                type(capacity_factor) not in (int, float) or
                type(noise) is not float or
                capacity_factor != capacity_factor or noise != noise):
            return _ops.call_key(*fields)
        keys = self.__dict__.get("_call_keys")
        if keys is None:  # a layer unpickled from an older flexmoe
            keys = self.__dict__["_call_keys"] = {}
        key = keys.get(fields)
        if key is None:
            key = keys[fields] = _ops.call_key(*fields)
        return key

    def run_flat(self, x, top_k=None, capacity_factor=None, variant=""):
        """x [T, d] (contiguous, the layer's dtype) -> (y [T, d], l_aux)."""
        if self.world_size > 1 and not self.group_name:
            # The communicator is made at the first forward, so a layer for
            # W ranks can be built anywhere (checkpoint tools, tests).
            from . import distributed
            self.group_name = distributed.group_name(self.group,
                                                     self.world_size,
                                                     x.device)
            self._group_device = x.device.type
        noise = self.gate_noise if self.training else 0.0
        # Asked once a call: the key, the seed and the op's dispatch
        # (_ops.moe) depend on it.
        compiling = torch.compiler.is_compiling()
        tensors = (x, self.wg, self.w1, self.w2, self.w3, self.b1, self.b2)
        # A gradient is needed when one of the op's own tensors requires one
        # (what autograd records the call for; a submodule's parameter does
        # not make the layer train).
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in tensors)
        key = self._call_key(
            int(x.shape[0]), needs_grad, top_k or self.top_k,
            self.capacity_factor if capacity_factor is None else
            capacity_factor, noise, compiling)
        # Whether autograd records the call (_ops.moe's question, answered
        # here without its loop when a gradient is needed).
        records = (None if compiling or torch.jit.is_tracing() else
                   needs_grad or _ops._records_graph(tensors))
        y, l_aux, _ = _ops.moe(key, *tensors, self._seed(noise, compiling),
                               variant, records)
        return y, l_aux

    def forward(self, x, adaptive_r=None, a2a_ffn_overlap_degree=None):
        if x.shape[-1] != self.model_dim:
            raise ValueError(f"x must be (..., {self.model_dim}), got "
                             f"{tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise TypeError(f"x is {x.dtype} but the layer is {self.dtype}: "
                            f"cast it (x.to({self.dtype})) or build the "
                            f"layer with dtype={x.dtype}")
        if not x.is_contiguous():
            warnings.warn("flexmoe: x is not contiguous; it is copied "
                          "(.contiguous()) before the layer reads it")
            flat = x.reshape(-1, self.model_dim).contiguous()
        elif x.dim() == 2:
            flat = x  # already [T, d]: no view (and no view's backward)
        else:
            flat = x.reshape(-1, self.model_dim)
        if self.world_size == 1:
            variant = ""  # variant_name's for one rank
        else:
            variant = self.variant_name(adaptive_r, a2a_ffn_overlap_degree)
        y, l_aux = self.run_flat(flat, variant=variant)
        if "l_aux" in self.__dict__:
            self.__dict__["l_aux"] = l_aux  # nn.Module's __setattr__ is slow
        else:
            self.l_aux = l_aux
        return (y if flat is x else y.view(x.shape)), l_aux
