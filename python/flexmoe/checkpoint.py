# ===- checkpoint.py - flexmoe checkpoints across world sizes, from Tutel -=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file converts model checkpoints holding flexmoe layers between world
# sizes and imports Tutel moe_layer checkpoints, as functions and as the
# command line `python -m flexmoe.checkpoint` (docs/Python.md, "Checkpoints").
#
# A checkpoint is a model's state_dict per rank. A flexmoe layer at prefix P
# holds P+"wg" (replicated) and its rank's slice of P+"w1", "w2", "w3", "b1",
# "b2", described by P+"_extra_state" (layer.extra_state). Converting W ranks
# to W' gathers each layer's experts (E >= W: [E / W, ...] slices in rank
# order; E < W: each expert's s = W / E shards along h) into the one-rank
# layout, then cuts it for W'. Entries that are not a flexmoe layer's are
# the same on every rank (data parallel) and are taken from rank 0.
#
# Tutel's layer (tutel/impls/moe_layer.py, experts/ffn.py, llama_ffn.py,
# gates/top.py) stores, at prefix P: "_num_global_experts", the gate
# "gates.0.wg.weight" [E, d] (logits = x @ weight.T) and its experts:
# ffn "experts.batched_fc1_w" [L, h/s, d] (fc1 = x @ w.T), "batched_fc2_w"
# [L, h/s, d] (fc2 = y @ w), "batched_fc1_bias" [L, h/s] and
# "batched_fc2_bias" [L, ceil(d/s)] (on E < W ranks, a shard rank's slice
# of the d outputs); llama_ffn "experts.W_fc1", "W_fc2" ([L, d, h]) and
# "W_fc3" ([L, h, d]), each flattened and cut into s equal flat pieces.
# Shard q of expert e is on rank e * s + q, as in Flex.
#
# ===----------------------------------------------------------------------=== #

import argparse
import collections
import sys
import warnings
from pathlib import Path

import torch

from .layer import (STATE_FORMAT, STATE_VERSION, check_extra_state,
                    extra_state)

EXTRA = "_extra_state"
EXPERT_NAMES = ("w1", "w2", "w3", "b1", "b2")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the key."""


# -- finding layers ---------------------------------------------------------


def flexmoe_layers(state):
    """{prefix: extra state} of the flexmoe layers in a state_dict."""
    layers = {}
    for key, value in state.items():
        ours = isinstance(value, dict) and value.get("format") == \
            STATE_FORMAT
        if ours and (key == EXTRA or key.endswith("." + EXTRA)):
            layers[key[:-len(EXTRA)]] = value
    return layers


def tutel_layers(state):
    """The prefixes of the Tutel moe_layers in a state_dict: those with a
    gate weight and fused experts."""
    prefixes = []
    for key in state:
        if key.endswith("gates.0.wg.weight"):
            prefix = key[:-len("gates.0.wg.weight")]
            if (prefix + "experts.batched_fc1_w" in state or
                    prefix + "experts.W_fc1" in state):
                prefixes.append(prefix)
    return prefixes


def _expert_names(extra):
    names = ["w1", "w2"]
    if extra["gated"]:
        names.append("w3")
    if extra["bias"]:
        names += ["b1", "b2"]
    return names


def _local_shapes(extra):
    """The shapes of a rank's tensors of the layer `extra` describes."""
    E, d, h = extra["num_experts"], extra["model_dim"], extra["hidden_size"]
    L, hs = extra["local_experts"], h // extra["shards"]
    return {"wg": [d, E], "w1": [L, d, hs], "w2": [L, hs, d],
            "w3": [L, d, hs], "b1": [L, hs], "b2": [L, d]}


def _new_state(like):
    out = collections.OrderedDict()
    metadata = getattr(like, "_metadata", None)
    if metadata is not None:
        out._metadata = metadata
    return out


# -- W ranks -> one ---------------------------------------------------------


def _check_ranks(states, prefix, world):
    """The layer's extra states of `states` (index = rank), checked to be
    one layer on `world` ranks."""
    key = prefix + EXTRA
    extras = []
    for r, state in enumerate(states):
        extra = state.get(key)
        if not isinstance(extra, dict) or extra.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{key}: missing from rank {r}'s "
                                  f"checkpoint (every rank holds the layer)")
        version = extra.get("version")
        if not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
            raise CheckpointError(
                f"{key}: rank {r}'s checkpoint has format version "
                f"{version!r}; this flexmoe reads versions 1 to "
                f"{STATE_VERSION}")
        if extra.get("world_size") != world or extra.get("rank") != r:
            raise CheckpointError(
                f"{key}: the file given as rank {r} of {world} holds rank "
                f"{extra.get('rank')} of {extra.get('world_size')} ranks: "
                f"give every rank's file once, in rank order")
        for field in ("num_experts", "model_dim", "hidden_size", "gated",
                      "bias"):
            if extras and extra.get(field) != extras[0][field]:
                raise CheckpointError(
                    f"{key}: rank {r} has {field} = {extra.get(field)}, rank "
                    f"0 has {extras[0][field]}")
        try:
            expected = extra_state(extra["num_experts"], extra["model_dim"],
                                   extra["hidden_size"], extra["gated"],
                                   extra["bias"], world, r)
        except (KeyError, ValueError) as error:
            raise CheckpointError(f"{key}: rank {r}: {error}") from None
        if any(extra.get(f) != v for f, v in expected.items()
               if f != "version"):
            raise CheckpointError(f"{key}: rank {r}'s expert slice "
                                  f"{extra} is not the layout of "
                                  f"{expected}")
        for name, shape in _local_shapes(extra).items():
            if name != "wg" and name not in _expert_names(extra):
                continue
            tensor = state.get(prefix + name)
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{prefix}{name}: missing from rank "
                                      f"{r}'s checkpoint")
            if list(tensor.shape) != shape:
                raise CheckpointError(
                    f"{prefix}{name}: rank {r} holds shape "
                    f"{list(tensor.shape)}, its layer "
                    f"(E={extra['num_experts']}, d={extra['model_dim']}, "
                    f"h={extra['hidden_size']}, {world} ranks) needs {shape}")
        extras.append(extra)
    return extras


def _replicated_b2(parts, key):
    """b2 of one expert from its s shard ranks: each adds b2 / s of its own
    copy (fc2's bias_scale), so the mean is the layer's bias; the copies are
    equal unless something updated them apart."""
    if all(torch.equal(p, parts[0]) for p in parts[1:]):
        return parts[0]
    warnings.warn(f"{key}: the shard ranks' copies differ; their mean (what "
                  f"the layer adds) is kept")
    return torch.stack([p.double() for p in parts]).mean(0).to(parts[0].dtype)


def _gather_layer(states, prefix, extras):
    """The layer's expert tensors for one rank holding every expert."""
    first = extras[0]
    E, W = first["num_experts"], len(states)
    full = {}
    for name in _expert_names(first):
        parts = [state[prefix + name] for state in states]
        if E >= W:
            full[name] = torch.cat(parts, 0)
            continue
        s = W // E
        experts = []
        for e in range(E):
            group = parts[e * s:(e + 1) * s]
            if name == "b2":
                experts.append(_replicated_b2(group, prefix + name))
            else:  # w1, w3 [1, d, h/s]; w2 [1, h/s, d]; b1 [1, h/s]
                experts.append(torch.cat(group, 2 if name in ("w1", "w3")
                                         else 1))
        full[name] = torch.cat(experts, 0)
    wg = states[0][prefix + "wg"]
    for r, state in enumerate(states[1:], 1):
        if not torch.equal(state[prefix + "wg"], wg):
            warnings.warn(f"{prefix}wg: rank {r}'s gate differs from rank "
                          f"0's (a replicated weight); rank 0's is kept")
            break
    full["wg"] = wg
    return full


def _check_others(states, layer_keys):
    """The entries that are not a flexmoe layer's: the same keys on every
    rank (their values are rank 0's)."""
    keys0 = [k for k in states[0] if k not in layer_keys]
    for r, state in enumerate(states[1:], 1):
        others = [k for k in state if k not in layer_keys]
        missing = sorted(set(keys0) - set(others))
        extra = sorted(set(others) - set(keys0))
        if missing or extra:
            key = (missing or extra)[0]
            raise CheckpointError(
                f"{key}: in rank {0 if missing else r}'s checkpoint but not "
                f"in rank {r if missing else 0}'s (the ranks' files must "
                f"hold the same model)")
    return keys0


def _layer_keys(state, prefixes):
    return {key for key in state for prefix in prefixes
            if key.startswith(prefix) and
            key[len(prefix):] in ("wg", EXTRA) + EXPERT_NAMES}


def gather(states):
    """W per-rank state_dicts (index = rank) -> the one-rank state_dict:
    every flexmoe layer's experts whole, other entries from rank 0."""
    if not states:
        raise CheckpointError("no checkpoint given")
    states = list(states)
    layers = flexmoe_layers(states[0])
    if not layers:
        raise CheckpointError("no flexmoe layer in the checkpoint (no "
                              f"'{EXTRA}' entry of format {STATE_FORMAT})")
    key = next(iter(layers)) + EXTRA
    W = layers[key[:-len(EXTRA)]].get("world_size")
    if W != len(states):
        raise CheckpointError(
            f"{key}: the checkpoint is of {W} ranks, {len(states)} file(s) "
            f"given: give every rank's file")
    # Each file says its rank: the order they are given in does not matter.
    ranks = [state.get(key, {}).get("rank") for state in states]
    missing = sorted(set(range(W)) - set(ranks))
    if missing:
        raise CheckpointError(f"{key}: no file holds rank(s) {missing} of "
                              f"{W} (the files hold ranks {ranks})")
    states = [states[ranks.index(r)] for r in range(W)]
    layer_keys = _layer_keys(states[0], layers)
    for state in states[1:]:
        layer_keys |= _layer_keys(state, layers)
    out = _new_state(states[0])
    gathered = {}
    for prefix in layers:
        extras = _check_ranks(states, prefix, W)
        gathered[prefix] = (_gather_layer(states, prefix, extras), extras[0])
    for key in _check_others(states, layer_keys):
        out[key] = states[0][key]
    for prefix, (full, first) in gathered.items():
        for name in ("wg",) + EXPERT_NAMES:
            if name in full:
                out[prefix + name] = full[name]
        out[prefix + EXTRA] = extra_state(
            first["num_experts"], first["model_dim"], first["hidden_size"],
            first["gated"], first["bias"], 1, 0)
    return out


# -- one rank -> W' ranks ---------------------------------------------------


def _cut(full, extra, name):
    """Rank `extra['rank']`'s slice of a whole expert tensor (a copy, so a
    saved file holds only the slice)."""
    e, L = extra["first_expert"], extra["local_experts"]
    q, s = extra["shard"], extra["shards"]
    t = full[e:e + L]
    if s > 1 and name != "b2":
        hs = extra["hidden_size"] // s
        axis = {"w1": 2, "w3": 2, "w2": 1, "b1": 1}[name]
        t = t.narrow(axis, q * hs, hs)
    return t.contiguous().clone()


def scatter(state, world_size):
    """A one-rank state_dict (gather's output, or a layer saved on one rank)
    -> world_size per-rank state_dicts."""
    layers = flexmoe_layers(state)
    if not layers:
        raise CheckpointError("no flexmoe layer in the checkpoint")
    for prefix, extra in layers.items():
        if extra.get("world_size") != 1:
            raise CheckpointError(f"{prefix}{EXTRA}: scatter takes a one-rank "
                                  f"checkpoint; gather the "
                                  f"{extra.get('world_size')} ranks first")
        _check_ranks([state], prefix, 1)
    W = int(world_size)
    if W < 1:
        raise CheckpointError(f"world size must be >= 1, got {W}")
    layer_keys = _layer_keys(state, layers)
    outs = []
    for r in range(W):
        out = _new_state(state)
        for key, value in state.items():
            if key not in layer_keys:
                out[key] = value
        for prefix, extra in layers.items():
            try:
                mine = extra_state(extra["num_experts"], extra["model_dim"],
                                   extra["hidden_size"], extra["gated"],
                                   extra["bias"], W, r)
            except ValueError as error:
                raise CheckpointError(f"{prefix}{EXTRA}: cannot cut the layer "
                                      f"for {W} ranks: {error}") from None
            out[prefix + "wg"] = state[prefix + "wg"]
            for name in _expert_names(extra):
                out[prefix + name] = _cut(state[prefix + name], mine, name)
            out[prefix + EXTRA] = mine
        outs.append(out)
    return outs


def convert(states, world_size):
    """W per-rank state_dicts -> world_size per-rank state_dicts."""
    return scatter(gather(states), world_size)


# -- Tutel ------------------------------------------------------------------


def _tutel_get(states, key, r):
    value = states[r].get(key)
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{key}: missing from Tutel rank {r}'s "
                              f"checkpoint")
    return value


def _tutel_shape(tensor, key, r, shape):
    if list(tensor.shape) != list(shape):
        raise CheckpointError(f"{key}: Tutel rank {r} holds shape "
                              f"{list(tensor.shape)}, expected {list(shape)}")


def _tutel_experts(states, prefix):
    """(E, d, L, s, the gate's weight) of a Tutel layer on len(states)
    ranks, checked."""
    W = len(states)
    gate_key = prefix + "gates.0.wg.weight"
    gate = _tutel_get(states, gate_key, 0)
    if gate.dim() != 2:
        raise CheckpointError(f"{gate_key}: expected [E, d], got "
                              f"{list(gate.shape)}")
    E, d = gate.shape
    count = states[0].get(prefix + "_num_global_experts")
    if count is not None and int(count) != E:
        raise CheckpointError(
            f"{prefix}_num_global_experts: {int(count)} experts, but "
            f"{gate_key} has {E} rows")
    for r in range(1, W):
        other = _tutel_get(states, gate_key, r)
        _tutel_shape(other, gate_key, r, [E, d])
        if not torch.equal(other, gate):
            warnings.warn(f"{gate_key}: Tutel rank {r}'s gate differs from "
                          f"rank 0's; rank 0's is kept")
    for key in states[0]:
        if key.startswith(prefix + "gates.") and key != gate_key:
            raise CheckpointError(f"{key}: several gates (or a gate other "
                                  f"than 'top') are not supported")
    if E >= W:
        if E % W:
            raise CheckpointError(f"{gate_key}: {E} experts on {W} ranks: "
                                  f"Tutel keeps E / W experts per rank")
        return E, d, E // W, 1, gate
    if W % E:
        raise CheckpointError(f"{gate_key}: {E} experts on {W} ranks: the "
                              f"ranks must be a multiple of the experts")
    return E, d, 1, W // E, gate


def _tutel_ffn(states, prefix, E, d, L, s):
    W, pre = len(states), prefix + "experts."
    fc1 = [_tutel_get(states, pre + "batched_fc1_w", r) for r in range(W)]
    if fc1[0].dim() != 3:
        raise CheckpointError(f"{pre}batched_fc1_w: expected [L, h/s, d], "
                              f"got {list(fc1[0].shape)}")
    hs = fc1[0].shape[1]
    has1 = pre + "batched_fc1_bias" in states[0]
    has2 = pre + "batched_fc2_bias" in states[0]
    if has1 != has2:
        raise CheckpointError(
            f"{pre}batched_fc{1 if has1 else 2}_bias: Flex's FFN experts "
            f"have both biases or neither")
    d2 = -(-d // s)  # Tutel's fc2 bias: a shard rank's slice of d
    shapes = {"batched_fc1_w": [L, hs, d], "batched_fc2_w": [L, hs, d],
              "batched_fc1_bias": [L, hs], "batched_fc2_bias": [L, d2]}
    parts = {}
    for name, shape in shapes.items():
        if name.endswith("bias") and not has1:
            continue
        parts[name] = [_tutel_get(states, pre + name, r) for r in range(W)]
        for r, t in enumerate(parts[name]):
            _tutel_shape(t, pre + name, r, shape)
    # Whole experts: E >= W ranks in order; E < W: shard q of expert e on
    # rank e * s + q, along h (the fc2 bias: along d, cut to d).
    whole = {}
    for name, tensors in parts.items():
        if s == 1:
            whole[name] = torch.cat(tensors, 0)
            continue
        axis = 1
        experts = [torch.cat(tensors[e * s:(e + 1) * s], axis)
                   for e in range(E)]
        whole[name] = torch.cat(experts, 0)
    full = {"w1": whole["batched_fc1_w"].transpose(1, 2).contiguous(),
            "w2": whole["batched_fc2_w"].contiguous()}
    if has1:
        full["b1"] = whole["batched_fc1_bias"].contiguous()
        full["b2"] = whole["batched_fc2_bias"][:, :d].contiguous()
    return full, hs * s, has1


def _tutel_llama(states, prefix, E, d, L, s, hidden_size):
    """llama_ffn: W_fc1 [L, d, h] -> w1, W_fc2 [L, d, h] -> w3 (the up
    projection), W_fc3 [L, h, d] -> w2; each rank holds 1/s of the
    flattened tensor (padded at the end)."""
    W, pre = len(states), prefix + "experts."
    flats = {}
    for name in ("W_fc1", "W_fc2", "W_fc3"):
        flats[name] = [_tutel_get(states, pre + name, r).reshape(-1)
                       for r in range(W)]
        for r, t in enumerate(flats[name]):
            if t.numel() != flats[name][0].numel():
                raise CheckpointError(f"{pre}{name}: Tutel rank {r} holds "
                                      f"{t.numel()} values, rank 0 "
                                      f"{flats[name][0].numel()}")
    piece = flats["W_fc1"][0].numel()
    h = hidden_size or (piece * s) // (L * d)
    if h < 1 or -(-(L * d * h) // s) != piece:
        raise CheckpointError(
            f"{pre}W_fc1: {piece} values per rank do not hold [{L}, {d}, h] "
            f"in {s} pieces for any hidden size; pass hidden_size")
    full = {}
    for name, flex, shape in (("W_fc1", "w1", [L, d, h]),
                              ("W_fc2", "w3", [L, d, h]),
                              ("W_fc3", "w2", [L, h, d])):
        if s == 1:
            tensors = [t.view(shape) for t in flats[name]]
            full[flex] = torch.cat(tensors, 0)
            continue
        experts = []
        for e in range(E):
            flat = torch.cat(flats[name][e * s:(e + 1) * s])
            if flat.numel() < L * d * h:
                raise CheckpointError(f"{pre}{name}: too few values for "
                                      f"[{L}, {d}, {h}]")
            experts.append(flat[:L * d * h].view(shape))
        full[flex] = torch.cat(experts, 0).contiguous()
    return full, h


def _tutel_expert_tensors(states, prefix, E, d, L, s, hidden_size):
    """(whole expert tensors in Flex's layout, h, gated, bias) of a Tutel
    layer's experts on len(states) ranks."""
    gated = prefix + "experts.W_fc1" in states[0]
    if gated:
        full, h = _tutel_llama(states, prefix, E, d, L, s, hidden_size)
        bias = False
    else:
        full, h, bias = _tutel_ffn(states, prefix, E, d, L, s)
    known = {"experts." + n for n in ("batched_fc1_w", "batched_fc2_w",
                                       "batched_fc1_bias", "batched_fc2_bias",
                                       "W_fc1", "W_fc2", "W_fc3")}
    for key in states[0]:
        if key.startswith(prefix + "experts.") and \
                key[len(prefix):] not in known:
            raise CheckpointError(f"{key}: not a parameter of Tutel's 'ffn' "
                                  f"or 'llama_ffn' experts (custom experts "
                                  f"are not supported)")
    return full, h, gated, bias


def _tutel_layer(states, prefix, hidden_size=None):
    """One Tutel moe_layer of W rank states -> its one-rank flexmoe
    entries."""
    E, d, L, s, gate = _tutel_experts(states, prefix)
    full, h, gated, bias = _tutel_expert_tensors(states, prefix, E, d, L, s,
                                                 hidden_size)
    out = {"wg": gate.t().contiguous()}
    out.update(full)
    out[EXTRA] = extra_state(E, d, h, gated, bias, 1, 0)
    return out


def _tutel_keys(state, prefix):
    return {key for key in state if key.startswith(prefix) and (
        key[len(prefix):] == "_num_global_experts" or
        key[len(prefix):].startswith(("gates.", "experts.")))}


def from_tutel(states, world_size=1, hidden_size=None):
    """Tutel moe_layer checkpoints of W ranks (state_dicts, index = rank)
    -> flexmoe state_dicts for world_size ranks: each Tutel layer's entries
    become flexmoe.moe_layer's (the same module path), the others are
    rank 0's. `hidden_size` is needed only when llama_ffn's flattened
    pieces leave it ambiguous."""
    states = list(states)
    if not states:
        raise CheckpointError("no checkpoint given")
    prefixes = tutel_layers(states[0])
    if not prefixes:
        raise CheckpointError("no Tutel moe_layer in the checkpoint (no "
                              "'gates.0.wg.weight' beside "
                              "'experts.batched_fc1_w' or 'experts.W_fc1')")
    layer_keys = set()
    for prefix in prefixes:
        for state in states:
            layer_keys |= _tutel_keys(state, prefix)
    out = _new_state(states[0])
    for key in _check_others(states, layer_keys):
        out[key] = states[0][key]
    for prefix in prefixes:
        for name, value in _tutel_layer(states, prefix, hidden_size).items():
            out[prefix + name] = value
    return scatter(out, world_size)


def tutel_local_state(state, prefix, layer):
    """Rewrites, in place, the Tutel moe_layer entries at `prefix` of one
    rank's state_dict as flexmoe `layer`'s (flexmoe.moe_layer's
    load_state_dict of a Tutel checkpoint of the same world size). A rank's
    Tutel tensors are its own Flex slice only when experts are not sharded
    (E >= W); sharded ones need every rank's file (import-tutel)."""
    gate_key = prefix + "gates.0.wg.weight"
    if layer.shards > 1:
        raise CheckpointError(
            f"{gate_key}: a Tutel checkpoint of experts sharded over ranks "
            f"(E < W) needs every rank's file: convert it with `python -m "
            f"flexmoe.checkpoint import-tutel`")
    keys = _tutel_keys(state, prefix)
    count = state.get(prefix + "_num_global_experts")
    gate = _tutel_get([state], gate_key, 0)
    E, d = layer.num_experts, layer.model_dim
    for key, experts in ((prefix + "_num_global_experts", count),
                         (gate_key, gate.shape[0] if gate.dim() == 2 else
                          None)):
        if experts is not None and int(experts) != E:
            raise CheckpointError(f"{key}: the checkpoint has {int(experts)} "
                                  f"experts, this layer {E}")
    _tutel_shape(gate, gate_key, 0, [E, d])
    for key in keys:
        if key.startswith(prefix + "gates.") and key != gate_key:
            raise CheckpointError(f"{key}: several gates (or a gate other "
                                  f"than 'top') are not supported")
    # This rank's L experts read as a one-rank layer of L experts.
    L = layer.local_experts
    full, h, gated, bias = _tutel_expert_tensors([state], prefix, L, d, L, 1,
                                                 layer.hidden_size)
    mine = extra_state(E, d, h, gated, bias, layer.world_size, layer.rank)
    check_extra_state(mine, layer.get_extra_state(), gate_key)
    for key in keys:
        del state[key]
    state[prefix + "wg"] = gate.t().contiguous()
    for name, value in full.items():
        state[prefix + name] = value
    state[prefix + EXTRA] = mine


# -- files and the command line ---------------------------------------------


def load(path, key=None):
    """The state_dict in a checkpoint file (`key`: the entry holding it,
    e.g. 'model')."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            found = (sorted(obj) if isinstance(obj, dict) else
                     type(obj).__name__)
            raise CheckpointError(f"{path}: no entry '{key}' (found: "
                                  f"{found})")
        obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a "
                              f"state_dict (use --key for a nested one)")
    return obj


def save(states, pattern, key=None):
    """Writes state i to `pattern` with {rank} replaced by i; returns the
    paths."""
    if len(states) > 1 and "{rank}" not in pattern:
        raise CheckpointError(f"output {pattern!r} needs '{{rank}}' for "
                              f"{len(states)} ranks")
    paths = []
    for r, state in enumerate(states):
        path = Path(pattern.format(rank=r))
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({key: state} if key else state, path)
        paths.append(path)
    return paths


def describe(state):
    """One line per flexmoe or Tutel layer of a state_dict."""
    lines = []
    name = lambda prefix: prefix[:-1] or "<root>"  # noqa: E731
    for prefix, e in flexmoe_layers(state).items():
        lines.append(
            f"{name(prefix)}: flexmoe v{e.get('version')}, E="
            f"{e.get('num_experts')} d={e.get('model_dim')} "
            f"h={e.get('hidden_size')}{' gated' if e.get('gated') else ''}"
            f"{' bias' if e.get('bias') else ''}, rank {e.get('rank')} of "
            f"{e.get('world_size')} (experts {e.get('first_expert')}.."
            f"{e.get('first_expert', 0) + e.get('local_experts', 1) - 1}, "
            f"shard {e.get('shard')} of {e.get('shards')})")
    for prefix in tutel_layers(state):
        gate = state[prefix + "gates.0.wg.weight"]
        kind = "llama_ffn" if prefix + "experts.W_fc1" in state else "ffn"
        lines.append(f"{name(prefix)}: Tutel moe_layer ({kind}), "
                     f"E={gate.shape[0]} d={gate.shape[1]}")
    return lines or ["no flexmoe or Tutel layer"]


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m flexmoe.checkpoint",
        description="Convert flexmoe checkpoints between world sizes, and "
        "import Tutel moe_layer checkpoints (docs/Python.md, Checkpoints).")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text, order in (
            ("convert", "W rank files (or one gathered file) -> "
             "--world-size per-rank files", "in any order (each file says "
             "its rank)"),
            ("import-tutel", "Tutel moe_layer rank files -> flexmoe "
             "per-rank files", "in rank order (Tutel's files do not say "
             "their rank)")):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("inputs", nargs="+", help="checkpoint files, " + order)
        p.add_argument("-o", "--output", required=True,
                       help="output path; '{rank}' is replaced by the rank "
                       "(required for more than one)")
        p.add_argument("-w", "--world-size", type=int, required=True,
                       help="ranks of the output")
        p.add_argument("--key", help="the entry of each file holding the "
                       "state_dict (e.g. 'model'); other entries are not "
                       "carried")
        if name == "import-tutel":
            p.add_argument("--hidden-size", type=int, help="llama_ffn's h "
                           "when its pieces leave it ambiguous")
    p = sub.add_parser("info", help="list the layers of checkpoint files")
    p.add_argument("inputs", nargs="+")
    p.add_argument("--key")
    args = parser.parse_args(argv)
    try:
        states = [load(path, args.key) for path in args.inputs]
        if args.command == "info":
            for path, state in zip(args.inputs, states):
                print(f"{path}:")
                for line in describe(state):
                    print(f"  {line}")
            return 0
        if args.command == "convert":
            outs = convert(states, args.world_size)
        else:
            outs = from_tutel(states, args.world_size, args.hidden_size)
        paths = save(outs, args.output, args.key)
    except (CheckpointError, OSError, RuntimeError) as error:
        print(f"flexmoe.checkpoint: error: {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
