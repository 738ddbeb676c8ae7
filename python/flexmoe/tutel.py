# ===- tutel.py - flexmoe.moe_layer: Tutel's arguments, Flex's layer -----=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file defines moe_layer, which takes the constructor and forward
# arguments of Tutel's tutel.moe.moe_layer and returns what it returns (the
# output, with l_aux as an attribute), so a training script swaps the
# import. Where Tutel is lenient and Flex's IR is strict, moe_layer does
# what Tutel does, with a warning, before emitting IR:
#
#   - top_k above the number of experts: clamped to E;
#   - a capacity factor that gives 0 slots (k * int(|f| * ceil(T / E)) = 0):
#     Tutel drops every token; so does moe_layer (output zeros, l_aux
#     computed), without compiling a plan Flex would reject;
#   - capacity_factor 0 is dropless, negative is dropless bounded by |f|.
#
# Arguments Flex cannot honour (a custom expert or gate, a non-GShard loss,
# pre-scoring) are errors naming them. docs/Python.md lists each argument.
#
# ===----------------------------------------------------------------------=== #

import os
import re
import warnings

import torch
import torch.nn.functional as F

from .layer import MoELayer

_GATE_KEYS = ("type", "k", "capacity_factor", "gate_noise", "fp32_gate")
_FFN_KEYS = ("type", "count_per_node", "num_experts_per_device",
             "hidden_size_per_expert", "activation_fn", "has_fc1_bias",
             "has_fc2_bias", "output_dim")


def _unsupported(what, why):
    raise NotImplementedError(f"flexmoe.moe_layer: {what} is not supported: "
                              f"{why}")


def activation_name(fn, what="experts.activation_fn"):
    """relu, gelu or silu: the function `fn` computes, found by evaluating
    it (a lambda over F.relu is relu too). Anything else is an error."""
    if fn is None:
        return "relu"
    t = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    try:
        y = fn(t.clone())
    except Exception as error:
        raise NotImplementedError(
            f"flexmoe.moe_layer: {what} failed on a test tensor ({error}); "
            f"Flex's experts take relu, gelu (exact erf form) or silu")
    for name, ref in (("relu", F.relu(t)), ("gelu", F.gelu(t)),
                      ("silu", F.silu(t))):
        if (isinstance(y, torch.Tensor) and y.shape == t.shape and
                torch.allclose(y.double(), ref, rtol=1e-6, atol=1e-9)):
            return name
    raise NotImplementedError(
        f"flexmoe.moe_layer: {what} computes none of relu, gelu (exact erf "
        f"form) and silu; a custom expert function is not supported (Flex "
        f"compiles the expert, [expert-1])")


def global_experts(local, world_size):
    """Tutel's count_per_node: > 0 experts per rank; < 0 ranks sharing one
    expert (-1 is one expert per rank); fractions as Tutel reads them."""
    if not isinstance(local, int):
        local = -int(1 / (local + 1e-5))
    if local == -1:
        local = 1
    if local == 0:
        raise ValueError("experts.count_per_node must not be 0")
    if local > 0:
        return local * world_size
    if world_size % -local:
        raise ValueError(f"count_per_node {local}: {-local} ranks share an "
                         f"expert, which must divide the world size "
                         f"{world_size}")
    return world_size // -local


def _parse_gate(gate_type):
    if isinstance(gate_type, str):
        match = re.match(r"^Top([0-9]+)Gate$", gate_type)
        if not match:
            raise ValueError(f"gate_type {gate_type!r} is not recognized")
        gate_type = {"type": "top", "k": int(match.group(1))}
    if isinstance(gate_type, (list, tuple)):
        if len(gate_type) != 1:
            _unsupported("several gates (a gate_type list, gate_index)",
                         "a Flex layer has one gate")
        gate_type = gate_type[0]
    gate = dict(gate_type)
    kind = gate.get("type")
    if kind != "top":
        _unsupported(f"gate_type type {kind!r}",
                     "Flex's gate is the linear top-k gate ('top'); "
                     "'cosine_top' and custom gate modules are not")
    extra = sorted(set(gate) - set(_GATE_KEYS))
    if extra:
        raise ValueError(f"flexmoe.moe_layer: unrecognized gate_type "
                         f"argument(s) {extra}; accepted: {_GATE_KEYS}")
    return gate


def _parse_experts(experts):
    if experts is None:
        raise ValueError("flexmoe.moe_layer: experts={...} is required")
    experts = dict(experts)
    kind = experts.get("type")
    if kind not in ("ffn", "llama_ffn"):
        _unsupported(f"experts type {kind!r}",
                     "Flex compiles its experts: 'ffn' (relu, gelu, silu, "
                     "optional biases) and 'llama_ffn' (SwiGLU); custom "
                     "expert modules are not supported")
    for key in ("fused_custom_fn", "implicit_dropout_p",
                "activation_fn_with_self"):
        if key in experts:
            _unsupported(f"experts.{key}",
                         "Flex compiles the expert function")
    extra = sorted(set(experts) - set(_FFN_KEYS))
    if extra:
        raise ValueError(f"flexmoe.moe_layer: unrecognized experts "
                         f"argument(s) {extra}; accepted: {_FFN_KEYS}")
    if "hidden_size_per_expert" not in experts:
        raise ValueError("flexmoe.moe_layer: experts.hidden_size_per_expert "
                         "is required")
    return experts


class moe_layer(MoELayer):
    """Tutel's tutel.moe.moe_layer, run by Flex.

    Takes Tutel's arguments (docs/Python.md, "Tutel-compatible API") and,
    like Tutel, returns the output with the auxiliary loss as `y.l_aux`
    (also `self.l_aux`). Parameters are Flex's (wg [d, E], w1 [L, d, h],
    w2 [L, h, d], ...), not Tutel's names; load_state_dict also reads a
    Tutel moe_layer's checkpoint of the same world size (experts not
    sharded), and flexmoe.checkpoint converts any (docs/Python.md,
    "Checkpoints").
    """

    def __init__(self, gate_type, model_dim, experts=None,
                 scan_expert_func=None, result_func=None, group=None,
                 seeds=None, a2a_ffn_overlap_degree=1, is_postscore=True,
                 batch_prioritized_routing=False, normalize_gate=True,
                 is_gshard_loss=True, parallel_type="adaptive:1",
                 use_2dh=False, dtype=torch.float32, device=None,
                 world_size=None, rank=None, **kwargs):
        if "pad_samples" in kwargs:
            warnings.warn("flexmoe.moe_layer: pad_samples is deprecated in "
                          "Tutel and ignored")
            kwargs.pop("pad_samples")
        if kwargs:
            raise ValueError(f"flexmoe.moe_layer: unrecognized argument(s) "
                             f"{sorted(kwargs)}")
        if not is_postscore:
            _unsupported("is_postscore=False", "Flex applies the gate "
                         "weights when combining ([combine-1])")
        if not is_gshard_loss:
            _unsupported("is_gshard_loss=False (the load-importance loss)",
                         "Flex computes the GShard loss ([loss-1])")
        gate = _parse_gate(gate_type)
        ffn = _parse_experts(experts)
        from .layer import _world
        W, r = _world(group, world_size, rank)
        local = ffn.get("count_per_node", ffn.get("num_experts_per_device",
                                                  1))
        E = global_experts(local, W)
        k = int(gate.get("k", 1))
        if k > E:
            warnings.warn(f"flexmoe.moe_layer: top_k {k} is above the "
                          f"{E} experts; clamped to {E}, as Tutel does")
            k = E
        factor = gate.get("capacity_factor",
                          float(os.environ.get("CAP_FACTOR", 1.0)))
        gated = ffn["type"] == "llama_ffn"
        activation = activation_name(
            ffn.get("activation_fn", F.silu if gated else None))
        if gated and activation != "silu":
            _unsupported(f"llama_ffn with activation {activation}",
                         "Flex's gated experts are SwiGLU (silu)")
        if ffn.get("output_dim", model_dim) != model_dim:
            _unsupported("experts.output_dim other than model_dim",
                         "the layer's output has the model dimension")
        fc1, fc2 = ffn.get("has_fc1_bias", True), ffn.get("has_fc2_bias",
                                                         True)
        if gated:
            fc1 = fc2 = False
        if fc1 != fc2:
            _unsupported(f"has_fc1_bias={fc1} with has_fc2_bias={fc2}",
                         "Flex's FFN experts have both biases or neither")
        adaptive_r = self._parallel_type(parallel_type, E, W)
        ranks_per_node = 0
        if use_2dh:
            # Tutel's 2DH groups the ranks of a node: torchrun's local world
            # size, else this host's GPUs.
            local = int(os.environ.get("LOCAL_WORLD_SIZE", 0) or 0) or (
                torch.cuda.device_count() if torch.cuda.is_available() else 0)
            if 0 < local < W and W % local == 0:
                ranks_per_node = local
            else:
                warnings.warn(f"flexmoe.moe_layer: use_2dh on {W} rank(s) "
                              f"with {local or 'unknown'} per node: one node "
                              f"(or nodes of unequal size), the flat "
                              f"all-to-all runs (same results)")
        if int(os.environ.get("BATCH_PRIO", 0)) != 0:
            batch_prioritized_routing = True
        if seeds is not None and seeds[0] is not None:
            torch.manual_seed(seeds[0])
        super().__init__(
            model_dim, ffn["hidden_size_per_expert"], E, top_k=k,
            capacity_factor=factor, activation=activation, gated=gated,
            bias=bool(fc1), fp32_router=bool(gate.get("fp32_gate", False)),
            normalize=normalize_gate,
            batch_prioritized=batch_prioritized_routing,
            gate_noise=float(gate.get("gate_noise", 0.0)), dtype=dtype,
            device=device, group=group, world_size=W, rank=r,
            a2a_ffn_overlap_degree=a2a_ffn_overlap_degree,
            adaptive_r=adaptive_r, ranks_per_node=ranks_per_node)
        if seeds is not None and len(seeds) > 1 and seeds[1] is not None:
            torch.manual_seed(seeds[1])
            self._reset_experts()
        if seeds is not None and len(seeds) > 2 and seeds[2] is not None:
            torch.manual_seed(seeds[2])
        self.result_func = result_func
        self.use_2dh = use_2dh
        self.num_global_experts = E
        for p in self.expert_parameters():
            p._tutel_expert = True
        if scan_expert_func is not None:
            for name in ("w1", "w2", "w3", "b1", "b2"):
                p = getattr(self, name)
                if p is not None:
                    scan_expert_func(name, p)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A Tutel moe_layer's own checkpoint at this module's path is read
        # in Flex's layout (docs/Python.md, "Checkpoints").
        if prefix + "gates.0.wg.weight" in state_dict:
            from .checkpoint import tutel_local_state
            tutel_local_state(state_dict, prefix, self)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def _parallel_type(parallel_type, E, W):
        """Tutel's adaptive degree r: 'adaptive:R' (R clamped to [0, s]),
        'data' (0... as Tutel: 1) and 'model' (s) for sharded experts."""
        s = W // E if E < W else 1
        valid = [0] + [i for i in range(1, s + 1) if s % i == 0]
        if parallel_type.startswith("adaptive:"):
            r = min(max(int(parallel_type.split(":", 1)[1]), 0), s)
            if r not in valid:
                raise ValueError(f"parallel_type {parallel_type}: adaptive "
                                 f"degree {r} is not one of {valid}")
            return r
        if s == 1 or parallel_type == "auto":
            return None
        if parallel_type in ("data", "model"):
            return 1 if parallel_type == "data" else s
        raise ValueError(f"unrecognized parallel_type {parallel_type!r}")

    @torch.no_grad()
    def _reset_experts(self):
        wg = self.wg.detach().clone()
        self.reset_parameters()
        self.wg.copy_(wg)

    def _zero_capacity(self, x, top_k, factor):
        """Tutel with 0 slots per expert: every token dropped, the output is
        zeros; l_aux is the GShard loss of the (noisy) scores."""
        wg = self.wg
        logits = x.to(wg.dtype) @ wg
        if self.training and self.gate_noise > 0:
            logits = logits + self.gate_noise * torch.randn_like(
                logits) / self.num_experts
        scores = F.softmax(logits.float(), dim=1)
        first = scores.argmax(dim=1)
        frac = torch.zeros_like(scores).scatter_(1, first[:, None], 1.0)
        l_aux = (scores.mean(0) * frac.mean(0)).sum() * self.num_experts
        # Zeros that depend on the gate, as Tutel's empty dispatch gives.
        return torch.zeros_like(x) + logits.sum().mul(0).to(x.dtype), l_aux

    def forward(self, input, gate_index=0, capacity_factor=None, top_k=None,
                a2a_ffn_overlap_degree=None, reserve_dims=1,
                inequivalent_tokens=False, adaptive_r=None,
                megablocks_size=0):
        if gate_index != 0:
            _unsupported(f"gate_index {gate_index}", "the layer has one gate")
        if inequivalent_tokens and self.world_size > 1:
            _unsupported("inequivalent_tokens=True", "every rank of a Flex "
                         "plan has the same token count T")
        shape, dtype = input.shape, input.dtype
        x = input.reshape(-1, shape[-reserve_dims:].numel())
        if x.shape[1] != self.model_dim:
            raise ValueError(f"input's last {reserve_dims} dim(s) hold "
                             f"{x.shape[1]} values, model_dim is "
                             f"{self.model_dim}")
        x = x.to(self.dtype).contiguous()
        if a2a_ffn_overlap_degree is not None:  # kept, as Tutel does
            self.a2a_ffn_overlap_degree = int(a2a_ffn_overlap_degree)
        if adaptive_r is not None:
            self.adaptive_r = int(adaptive_r)
        k = top_k or self.top_k
        if k > self.num_experts:
            warnings.warn(f"flexmoe.moe_layer: top_k {k} is above the "
                          f"{self.num_experts} experts; clamped, as Tutel "
                          f"does")
            k = self.num_experts
        factor = capacity_factor or self.capacity_factor
        T, E = x.shape[0], self.num_experts
        if factor != 0 and int(abs(factor) * ((T + E - 1) // E)) == 0:
            warnings.warn(
                f"flexmoe.moe_layer: capacity_factor {factor} gives 0 slots "
                f"per expert at {T} tokens (k * int(|f| * ceil(T / E)) = 0): "
                f"every token is dropped and the output is zero, as in "
                f"Tutel")
            y, l_aux = self._zero_capacity(x, k, factor)
        else:
            variant = self.variant_name(
                self.adaptive_r if self.world_size > 1 else None,
                self.a2a_ffn_overlap_degree if self.world_size > 1 else None)
            y, l_aux = self.run_flat(x, k, factor, variant)
        y = y.view(shape).to(dtype)
        self.l_aux = y.l_aux = l_aux
        return self.result_func(y) if self.result_func is not None else y
