#!/usr/bin/env python3
# ===- make_fuzz_seeds.py - Seeds of the plan loader's fuzz tests ---------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Writes unittests/Runtime/plans/fuzz/: three small layers shaped like
# examples/ (small_ffn: FFN gelu with biases, fixed capacity 1.25,
# batch-prioritized, f32, training; small_swiglu_bf16: gated SwiGLU, bf16
# with an fp32 router, dropless, training; c1_ffn_relu: FFN relu, bf16,
# fixed 1.0, inference) compiled by moe-opt | moe-translate at sizes the
# CPU runs in milliseconds, and the four corrupted plans of issue 10 made
# from them (mut_*.json), which the loader must reject. Committed so the
# tests run without the compiler; rerun after compiler changes that alter
# the plans. Usage, from the repository root:
#   python3 unittests/Runtime/plans/make_fuzz_seeds.py [build dir] [out dir]
#
# ===----------------------------------------------------------------------=== #
import copy
import json
import os
import subprocess
import sys

LAYERS = {
    # name: (T, d, h, E, dtype, router dtype, layer, attributes, training)
    "small_ffn": (16, 8, 12, 4, "f32", "f32", "ffn<gelu>", True,
                  "top_k = 2, capacity = #moe.capacity<fixed 1.25>, "
                  "normalize, batch_prioritized", True),
    "small_swiglu_bf16": (12, 8, 8, 4, "bf16", "f32", "gated", False,
                          "top_k = 2, capacity = #moe.capacity<dropless>, "
                          "normalize", True),
    "c1_ffn_relu": (10, 8, 8, 3, "bf16", "f32", "ffn<relu>", False,
                    "top_k = 2, capacity = #moe.capacity<fixed 1.0>",
                    False),
}


def layer_mlir(name, T, d, h, E, dt, rt, kind, bias, attrs):
    t = lambda *dims: "tensor<%sx%s>" % ("x".join(map(str, dims)), dt)
    gated = kind == "gated"
    args = [("x", t(T, d)), ("wg", "tensor<%dx%dx%s>" % (d, E, rt)),
            ("w1", t(E, d, h)), ("w2", t(E, h, d))]
    if bias:
        args += [("b1", t(E, h)), ("b2", t(E, d))]
    if gated:
        args += [("w3", t(E, d, h))]
    extra = (" bias(%b1, %b2)" if bias else "") + (" up(%w3)" if gated else "")
    results = "(%s, tensor<f32>)" % t(T, d)
    return ("func.func @%s(%s)\n    -> %s {\n"
            "  %%out, %%aux = moe.layer %s %%x, %%wg, %%w1, %%w2%s\n"
            "      {%s}\n      : (%s)\n      -> %s\n"
            "  return %%out, %%aux : %s, tensor<f32>\n}\n") % (
        name, ", ".join("%%%s: %s" % a for a in args), results, kind, extra,
        attrs, ", ".join(a[1] for a in args), results, t(T, d))


def compile_layer(bindir, name, spec):
    T, d, h, E, dt, rt, kind, bias, attrs, training = spec
    mlir = layer_mlir(name, T, d, h, E, dt, rt, kind, bias, attrs)
    lowered = subprocess.run(
        [os.path.join(bindir, "moe-opt"), "-",
         "--moe-lower-to-plan=training=%s" % ("true" if training else "false")],
        input=mlir, capture_output=True, text=True, check=True).stdout
    return json.loads(subprocess.run(
        [os.path.join(bindir, "moe-translate"), "--moert-to-plan"],
        input=lowered, capture_output=True, text=True, check=True).stdout)


def live_overlap(plan):
    """logits and scores are both live at the gate; put them on one byte."""
    plan = copy.deepcopy(plan)
    buffers = {b["name"]: b for b in plan["workspace"]["buffers"]}
    buffers["scores"]["offset"] = buffers["logits"]["offset"]
    return plan


def gemm_without_attrs(plan):
    plan = copy.deepcopy(plan)
    step = next(s for s in plan["variants"][0]["forward"]
                if s["op"] == "grouped_gemm")
    del step["attrs"]
    return plan


def backward_step_repeated(plan):
    plan = copy.deepcopy(plan)
    backward = plan["variants"][0]["backward"]
    i = next(i for i, s in enumerate(backward) if s["op"] == "grouped_gemm")
    backward.insert(i + 1, copy.deepcopy(backward[i]))
    return plan


def capacity_factor_disagrees(plan):
    plan = copy.deepcopy(plan)
    plan["layer"]["capacity_factor"] = plan["layer"]["capacity_factor"] * 2
    return plan


def main():
    bindir = os.path.join(sys.argv[1] if len(sys.argv) > 1 else "build", "bin")
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "fuzz")
    os.makedirs(out, exist_ok=True)
    plans = {name: compile_layer(bindir, name, spec)
             for name, spec in LAYERS.items()}
    seeds = dict(plans)
    seeds["mut_live_overlap"] = live_overlap(plans["small_ffn"])
    seeds["mut_gemm_without_attrs"] = gemm_without_attrs(plans["c1_ffn_relu"])
    seeds["mut_backward_step_repeated"] = backward_step_repeated(
        plans["small_swiglu_bf16"])
    seeds["mut_capacity_factor_disagrees"] = capacity_factor_disagrees(
        plans["small_ffn"])
    for name, plan in seeds.items():
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump(plan, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
