#!/usr/bin/env python3
# ===- tutel_layer.py - Tutel's moe_layer on flexmoe's weights ------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Tutel's tutel.moe.moe_layer as a peer row of bench/python_overhead.py
# (issue 12): built from Tutel's own source (bench/gpu_python.sh --prepare
# unpacks it, the "tutel" step builds its extension in place), given the
# flexmoe layer's weights, so both run the same function on the same inputs:
#
# - gate: Tutel's 'top' gate with fp32_gate (flexmoe's fp32 router), its
#   [E, d] weight = flexmoe's wg transposed; gate noise 0; GShard l_aux;
#   normalized gates as flexmoe's layer says;
# - experts: Tutel's 'ffn' without biases, the layer's activation,
#   batched_fc1_w = w1 transposed ([E, h, d]), batched_fc2_w = w2 ([E, h, d]),
#   in the layer's dtype;
# - capacity_factor: the same Tutel semantics (> 0 fixed, 0 dropless, < 0
#   bounded); one GPU, no process group, parallel_type default.
#
# Tutel dispatches and combines in f32 when the router is f32 (its
# fast_encode/fast_decode run in the logits' dtype); that is its design, and
# is what its row times. The checkpoint importer is checked on the way:
# flexmoe.checkpoint.from_tutel of this layer's state_dict must give back
# flexmoe's wg, w1, w2 exactly.
#
# ===----------------------------------------------------------------------=== #

import ctypes
import glob
import os
import re
import sys

import torch
import torch.nn.functional as F

ACTIVATIONS = {"relu": torch.relu, "gelu": F.gelu, "silu": F.silu}
# The output against flexmoe's above this relative L2 is not bf16 rounding
# or a few near-tie routings: it is printed as a mismatch.
MISMATCH_REL_L2 = 0.1


def _preload(error):
    """Loads, globally, a shared library the extension needs and the loader
    did not find (libnvrtc of the CUDA toolkit, say), from the toolkit or
    the nvidia wheels torch uses; True when one was loaded."""
    match = re.search(r"(lib[\w.+-]+\.so[\w.]*): cannot open", str(error))
    if not match:
        return False
    from torch.utils.cpp_extension import CUDA_HOME
    dirs = [os.path.join(CUDA_HOME, d) for d in ("lib64", "lib")
            ] if CUDA_HOME else []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "lib"))
    for directory in dirs:
        path = os.path.join(directory, match.group(1))
        if os.path.exists(path):
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
    return False


def load(path=None, device="cuda"):
    """tutel.moe from `path` (a tree built with setup.py build_ext --inplace:
    tutel/ and tutel_custom_kernel*.so), else TUTEL_PATH, else an installed
    Tutel. Raises ImportError saying why it cannot be used."""
    path = path or os.environ.get("TUTEL_PATH")
    if path:
        sys.path.insert(0, os.path.abspath(path))
    # The extension first: Tutel's own import only logs its failure.
    for _ in range(4):
        try:
            import tutel_custom_kernel
            break
        except ImportError as error:
            if not _preload(error):
                raise ImportError(f"tutel_custom_kernel: {error}") from None
    else:
        raise ImportError("tutel_custom_kernel: its libraries do not load")
    if device == "cuda" and not hasattr(tutel_custom_kernel, "inject_source"):
        raise ImportError("Tutel's extension was built without CUDA (see "
                          "the build log: its CUDA build failed)")
    from tutel import moe
    return moe


def make(moe, flex, device):
    """Tutel's moe_layer holding flexmoe layer `flex`'s weights."""
    if flex.gated or flex.bias or flex.batch_prioritized:
        raise ValueError("only FFN experts without biases and plain routing "
                         "are compared with Tutel's 'ffn' layer")
    gate = {"type": "top", "k": flex.top_k, "fp32_gate": True,
            "capacity_factor": flex.capacity_factor, "gate_noise": 0.0}
    experts = {"type": "ffn", "count_per_node": flex.num_experts,
               "hidden_size_per_expert": flex.hidden_size,
               "activation_fn": ACTIVATIONS[flex.activation],
               "has_fc1_bias": False, "has_fc2_bias": False}
    # Built on the device: Tutel initializes every expert through an
    # nn.Linear, slow on the CPU for C2's 8 x 4096 x 14336.
    with torch.device(device):
        layer = moe.moe_layer(gate_type=gate, model_dim=flex.model_dim,
                              experts=experts,
                              normalize_gate=flex.normalize,
                              is_gshard_loss=True)
    layer.experts.to(flex.dtype)  # the gate stays f32 (fp32_gate)
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(flex.wg.t())
        layer.experts.batched_fc1_w.copy_(flex.w1.transpose(1, 2))
        layer.experts.batched_fc2_w.copy_(flex.w2)
    return layer.train()


def call(layer, x):
    """(y, l_aux) as flexmoe's layer returns them."""
    y = layer(x)
    return y, y.l_aux


def importer_exact(layer, flex):
    """Whether flexmoe.checkpoint.from_tutel of this Tutel layer gives back
    flexmoe's wg, w1 and w2 exactly."""
    from flexmoe import checkpoint
    state = {k: v.detach() for k, v in layer.state_dict().items()}
    ours = checkpoint.from_tutel([state])[0]
    return all(torch.equal(ours[name].to(p.device), p.detach())
               for name, p in (("wg", flex.wg), ("w1", flex.w1),
                               ("w2", flex.w2)))


def compare(y, l_aux, ref_y, ref_aux):
    """A peer's output against flexmoe's on the same inputs."""
    a, b = y.detach().float(), ref_y.detach().float()
    diff = (a - b).abs()
    return {"output_max_abs": float(diff.max()),
            "output_rel_l2": float((a - b).norm() / b.norm().clamp(
                min=1e-30)),
            "output_ref_max_abs": float(b.abs().max()),
            "l_aux_abs_diff": float((l_aux.detach().float() -
                                     ref_aux.detach().float()).abs())}


def mismatch(result):
    """A loud line when a peer's output is clearly not flexmoe's function
    (non-finite, or far past rounding and near-tie routings); else None."""
    rel = result["output_rel_l2"]
    if rel == rel and rel <= MISMATCH_REL_L2:  # rel == rel: not NaN
        return None
    return (f"!!! NUMERICS MISMATCH: relative L2 {rel:.3g} against flexmoe "
            f"(> {MISMATCH_REL_L2}); its times are not of the same function")
