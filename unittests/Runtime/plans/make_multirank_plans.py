#!/usr/bin/env python3
# ===- make_multirank_plans.py - Multi-rank test plans -------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file writes the multi-rank test plans of unittests/Runtime/plans
# (docs/PlanFormat.md, "Many ranks"), by hand rather than by the compiler, so
# the runtime is tested against the format itself. Each plan has these
# variants over one parameter layout:
#   ep<D>  expert parallel, D chunks: router, gate, [sync_capacity],
#          dispatch, per chunk q: all_to_all(dispatch, q) -> recv,
#          uniform_segments(q), the expert GEMMs on recv, all_to_all(combine,
#          q) -> back; combine. Backward mirrors it, chunks in reverse, the
#          weight gradients summed over chunks (grouped_gemm_wgrad
#          accumulate).
#   ex<D>  ep<D> in the compiler's order: every chunk's all_to_all first,
#          then per chunk uniform_segments, the experts and the way back
#          (backward alike), so a device runtime overlaps them.
#   dp     data parallel: all_gather of every expert parameter into an
#          [E, ...] workspace buffer, then the one-rank steps; backward
#          reduce_scatters the full weight gradients into grad_w*.
# Every workspace buffer has bytes of its own (no sharing). Run it from this
# directory: python3 make_multirank_plans.py
#
# ===----------------------------------------------------------------------=== #

import json
import importlib.util
import os

HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "upgrade_plan", os.path.join(HERE, "..", "..", "..", "scripts",
                                 "upgrade-plan.py"))
upgrade_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(upgrade_plan)

DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4}


def ceil_div(a, b):
    return -(-a // b)


def static_capacity(layer):
    """[cap-1] staticCapacityBound of include/flex/Runtime/Core/Capacity.h."""
    t, e, k = layer["tokens"], layer["experts"], min(layer["top_k"], layer["experts"])
    fixed = k * int(layer.get("capacity_factor", 1.0) * ceil_div(t, e))
    mode = layer["capacity_mode"]
    if mode == "fixed":
        return fixed
    if mode == "dropless":
        return t
    return min(fixed, t)


class PlanBuilder:
    def __init__(self, layer, world, training, rows):
        self.layer = layer
        self.world = world
        self.training = training
        # Dispatch-shaped buffers serve every variant: E * the largest
        # aligned capacity bound.
        self.rows = rows
        self.buffers = {}
        self.offset = 0

    def buf(self, name, dtype, shape):
        """A workspace buffer, defined once; later uses must agree."""
        if name in self.buffers:
            assert self.buffers[name]["shape"] == shape, name
            return name
        size = DTYPE_BYTES[dtype]
        for dim in shape:
            size *= dim
        reserved = ceil_div(size, 64) * 64
        self.buffers[name] = {"name": name, "dtype": dtype, "shape": shape,
                              "offset": self.offset, "bytes": reserved}
        self.offset += reserved
        return name


def step(op, ins, outs, attrs=None):
    result = {"op": op, "in": ins, "out": outs}
    if attrs:
        result["attrs"] = attrs
    return result


def arguments(layer, world, training):
    t, d, h, e = (layer["tokens"], layer["model_dim"], layer["hidden_dim"],
                  layer["experts"])
    local = e // world
    dt = layer["dtype"]
    router = "f32" if layer["router_fp32"] else dt
    ffn = layer["expert_kind"] == "ffn"
    bias = ffn and layer["bias"]
    params = [("x", dt, [t, d], True), ("wg", router, [d, e], True),
              ("w1", dt, [local, d, h], True), ("b1", dt, [local, h], bias),
              ("w2", dt, [local, h, d], True), ("b2", dt, [local, d], bias),
              ("w3", dt, [local, d, h], not ffn)]
    args = [{"name": n, "dtype": ty, "shape": s, "role": "input"}
            for n, ty, s, present in params if present]
    args += [{"name": "out", "dtype": dt, "shape": [t, d], "role": "output"},
             {"name": "l_aux", "dtype": "f32", "shape": [1], "role": "output"}]
    if training:
        args += [{"name": "grad_out", "dtype": dt, "shape": [t, d],
                  "role": "grad_input"},
                 {"name": "grad_l_aux", "dtype": "f32", "shape": [1],
                  "role": "grad_input"}]
        args += [{"name": "grad_" + n, "dtype": ty, "shape": s,
                  "role": "grad_output"} for n, ty, s, present in params
                 if present]
    return args


def make_variant(b, kind, chunks):
    """One variant: kind 'ep' or 'ex' (chunks D) or 'dp'."""
    layer, world = b.layer, b.world
    t, d, h, e = (layer["tokens"], layer["model_dim"], layer["hidden_dim"],
                  layer["experts"])
    k = min(layer["top_k"], e)
    local = e // world
    dt = layer["dtype"]
    ffn = layer["expert_kind"] == "ffn"
    bias = ffn and layer["bias"]
    act = layer.get("activation", "relu")
    alignment = chunks
    rows = b.rows
    b.buf("logits", "f32", [t, e])
    routing = {
        "scores": b.buf("scores", "f32", [t, e]),
        "indices": b.buf("indices", "i32", [t, k]),
        "locations": b.buf("locations", "i32", [t, k]),
        "gates": b.buf("gates", "f32", [t, k]),
        "capacity": b.buf("capacity", "i32", [1]),
        "expert_offsets": b.buf("expert_offsets", "i32", [e + 1]),
        "expert_rows": b.buf("expert_rows", "i32", [e]),
    }
    route_in = {r: routing[r] for r in ("indices", "locations", "gates",
                                        "capacity", "expert_offsets")}
    gate_attrs = {"top_k": layer["top_k"],
                  "capacity_mode": layer["capacity_mode"],
                  "normalize": layer["normalize_gate"],
                  "batch_prioritized": layer["batch_prioritized"],
                  "noise": layer["gate_noise"], "seed": layer["seed"],
                  "layout": "padded"}
    if layer["capacity_mode"] != "dropless":
        gate_attrs["capacity_factor"] = layer["capacity_factor"]
    if alignment != 1:
        gate_attrs["capacity_alignment"] = alignment
    fwd, bwd = [], []

    # Parameters: the rank's own (ep) or all E gathered (dp).
    params = {"w1": "w1", "w2": "w2"}
    if bias:
        params.update({"b1": "b1", "b2": "b2"})
    if not ffn:
        params["w3"] = "w3"
    if kind == "dp":
        shapes = {"w1": [d, h], "w2": [h, d], "w3": [d, h], "b1": [h],
                  "b2": [d]}
        for name in list(params):
            full = b.buf(name + "_full", dt, [e] + shapes[name])
            fwd.append(step("all_gather", {"input": name}, {"output": full}))
            params[name] = full

    fwd.append(step("router", {"x": "x", "wg": "wg"}, {"logits": "logits"}))
    fwd.append(step("gate", {"logits": "logits"},
                    dict(routing, l_aux="l_aux"), gate_attrs))
    if kind in ("ep", "ex") and world > 1 and layer["capacity_mode"] != "fixed":
        fwd.append(step("sync_capacity", {},
                        {"capacity": routing["capacity"],
                         "expert_offsets": routing["expert_offsets"]}))
    disp = b.buf("disp", dt, [rows, d])
    fwd.append(step("dispatch", dict(route_in, x="x"), {"dispatched": disp}))

    def experts_forward(a, seg, tag):
        """The expert GEMMs on rows `a` with segments `seg`; returns y."""
        hid = b.buf("hid" + tag, dt, [rows, h])
        y = b.buf("y" + tag, dt, [rows, d])
        if ffn:
            ins = dict(seg, a=a, b=params["w1"])
            if bias:
                ins["bias"] = params["b1"]
            pre = b.buf("hid_pre" + tag, dt, [rows, h])
            fwd.append(step("grouped_gemm", ins, {"c": hid, "pre": pre},
                            {"trans_b": False, "epilogue": act}))
        else:
            g_in = b.buf("gate_in" + tag, dt, [rows, h])
            u_in = b.buf("up_in" + tag, dt, [rows, h])
            fwd.append(step("grouped_gemm", dict(seg, a=a, b=params["w1"]),
                            {"c": g_in}, {"trans_b": False,
                                          "epilogue": "none"}))
            fwd.append(step("grouped_gemm", dict(seg, a=a, b=params["w3"]),
                            {"c": u_in}, {"trans_b": False,
                                          "epilogue": "none"}))
            fwd.append(step("glu", dict(seg, gate_in=g_in, up_in=u_in),
                            {"c": hid}))
        ins = dict(seg, a=hid, b=params["w2"])
        if bias:
            ins["bias"] = params["b2"]
        fwd.append(step("grouped_gemm", ins, {"c": y},
                        {"trans_b": False, "epilogue": "none"}))
        return y

    def experts_backward(a, grad_y, seg, tag, accumulate):
        """Backward of experts_forward: weight gradients into `grads`,
        returns the gradient of `a`."""
        grads = {"w1": "grad_w1", "w2": "grad_w2", "w3": "grad_w3",
                 "b1": "grad_b1", "b2": "grad_b2"}
        if kind == "dp":
            shapes = {"w1": [d, h], "w2": [h, d], "w3": [d, h], "b1": [h],
                      "b2": [d]}
            grads = {n: b.buf("grad_" + n + "_full", dt, [e] + shapes[n])
                     for n in params}
        wgrad_attrs = {"accumulate": True} if accumulate else None
        hid = "hid" + tag
        outs = {"grad_b": grads["w2"]}
        if bias:
            outs["grad_bias"] = grads["b2"]
        bwd.append(step("grouped_gemm_wgrad", dict(seg, a=hid, grad_c=grad_y),
                        outs, wgrad_attrs))
        grad_hid = b.buf("grad_hid" + tag, dt, [rows, h])
        bwd.append(step("grouped_gemm", dict(seg, a=grad_y, b=params["w2"]),
                        {"c": grad_hid}, {"trans_b": True,
                                          "epilogue": "none"}))
        grad_a = b.buf("grad_a" + tag, dt, [rows, d])
        if ffn:
            grad_pre = b.buf("grad_hid_pre" + tag, dt, [rows, h])
            bwd.append(step("activation_backward",
                            dict(seg, pre="hid_pre" + tag, grad=grad_hid),
                            {"grad_pre": grad_pre}, {"activation": act}))
            outs = {"grad_b": grads["w1"]}
            if bias:
                outs["grad_bias"] = grads["b1"]
            bwd.append(step("grouped_gemm_wgrad",
                            dict(seg, a=a, grad_c=grad_pre), outs,
                            wgrad_attrs))
            bwd.append(step("grouped_gemm",
                            dict(seg, a=grad_pre, b=params["w1"]),
                            {"c": grad_a}, {"trans_b": True,
                                            "epilogue": "none"}))
        else:
            grad_g = b.buf("grad_gate_in" + tag, dt, [rows, h])
            grad_u = b.buf("grad_up_in" + tag, dt, [rows, h])
            bwd.append(step("glu_backward",
                            dict(seg, gate_in="gate_in" + tag,
                                 up_in="up_in" + tag, grad=grad_hid),
                            {"grad_gate_in": grad_g, "grad_up_in": grad_u}))
            bwd.append(step("grouped_gemm_wgrad", dict(seg, a=a,
                                                       grad_c=grad_g),
                            {"grad_b": grads["w1"]}, wgrad_attrs))
            bwd.append(step("grouped_gemm_wgrad", dict(seg, a=a,
                                                       grad_c=grad_u),
                            {"grad_b": grads["w3"]}, wgrad_attrs))
            bwd.append(step("grouped_gemm", dict(seg, a=grad_g,
                                                 b=params["w1"]),
                            {"c": grad_a}, {"trans_b": True,
                                            "epilogue": "none"}))
            bwd.append(step("grouped_gemm", dict(seg, a=grad_u,
                                                 b=params["w3"]),
                            {"c": grad_a}, {"trans_b": True,
                                            "epilogue": "none",
                                            "accumulate": True}))
        return grad_a

    if kind == "dp":
        seg = {"expert_offsets": routing["expert_offsets"],
               "expert_rows": routing["expert_rows"]}
        y = experts_forward(disp, seg, "")
        back = y
    else:
        recv = b.buf("recv", dt, [rows, d])
        back = b.buf("back", dt, [rows, d])
        seg = {"expert_offsets": b.buf("segment_offsets", "i32", [local + 1]),
               "expert_rows": b.buf("segment_rows", "i32", [local])}
        first = kind == "ex"
        if first:
            for q in range(chunks):
                a2a = {"chunks": chunks, "chunk": q}
                fwd.append(step("all_to_all",
                                {"input": disp,
                                 "capacity": routing["capacity"]},
                                {"output": recv},
                                dict(a2a, direction="dispatch")))
        for q in range(chunks):
            a2a = {"chunks": chunks, "chunk": q}
            if not first:
                fwd.append(step("all_to_all",
                                {"input": disp,
                                 "capacity": routing["capacity"]},
                                {"output": recv},
                                dict(a2a, direction="dispatch")))
            fwd.append(step("uniform_segments",
                            {"capacity": routing["capacity"]}, seg,
                            dict(a2a, groups=local, ranks=world)))
            y = experts_forward(recv, seg, "")
            fwd.append(step("all_to_all", {"input": y,
                                           "capacity": routing["capacity"]},
                            {"output": back}, dict(a2a, direction="combine")))
    fwd.append(step("combine", dict(route_in, expert_out=back),
                    {"out": "out"}))

    if b.training:
        grad_back = b.buf("grad_back", dt, [rows, d])
        bwd.append(step("combine_backward",
                        dict(route_in, grad_out="grad_out", expert_out=back),
                        {"grad_expert_out": grad_back,
                         "grad_gates": b.buf("grad_gates", "f32", [t, k])}))
        if kind == "dp":
            grad_disp = experts_backward(disp, grad_back, seg, "", False)
            for name in params:
                bwd.append(step("reduce_scatter",
                                {"input": "grad_" + name + "_full"},
                                {"output": "grad_" + name}))
        else:
            grad_y = b.buf("grad_y", dt, [rows, d])
            grad_disp = b.buf("grad_disp", dt, [rows, d])
            first = kind == "ex"
            if first:
                for q in reversed(range(chunks)):
                    a2a = {"chunks": chunks, "chunk": q}
                    bwd.append(step("all_to_all",
                                    {"input": grad_back,
                                     "capacity": routing["capacity"]},
                                    {"output": grad_y},
                                    dict(a2a, direction="dispatch")))
            for q in reversed(range(chunks)):
                a2a = {"chunks": chunks, "chunk": q}
                if not first:
                    bwd.append(step("all_to_all",
                                    {"input": grad_back,
                                     "capacity": routing["capacity"]},
                                    {"output": grad_y},
                                    dict(a2a, direction="dispatch")))
                bwd.append(step("uniform_segments",
                                {"capacity": routing["capacity"]}, seg,
                                dict(a2a, groups=local, ranks=world)))
                grad_recv = experts_backward("recv", grad_y, seg, "",
                                             q != chunks - 1)
                bwd.append(step("all_to_all",
                                {"input": grad_recv,
                                 "capacity": routing["capacity"]},
                                {"output": grad_disp},
                                dict(a2a, direction="combine")))
        bwd.append(step("dispatch_backward",
                        dict(route_in, grad_dispatched=grad_disp),
                        {"grad_x": "grad_x"}))
        bwd.append(step("gate_backward",
                        {"grad_gates": "grad_gates",
                         "grad_l_aux": "grad_l_aux",
                         "scores": routing["scores"],
                         "indices": routing["indices"]},
                        {"grad_logits": b.buf("grad_logits", "f32", [t, e])},
                        {"top_k": layer["top_k"],
                         "normalize": layer["normalize_gate"]}))
        bwd.append(step("router_backward",
                        {"x": "x", "wg": "wg", "grad_logits": "grad_logits"},
                        {"grad_x": "grad_x", "grad_wg": "grad_wg"}))

    name = kind if kind == "dp" else "%s%d" % (kind, chunks)
    parallel = {"r": 0 if kind == "dp" else 1, "pipeline": chunks,
                "world": world}
    return {"name": name, "parallel": parallel, "predicted_us": None,
            "measured_us": None, "forward": fwd, "backward": bwd}


def make_plan(layer, world, training, variants):
    bound = static_capacity(layer)
    rows = layer["experts"] * max(ceil_div(bound, c) * c for _, c in variants)
    b = PlanBuilder(layer, world, training, rows)
    built = [make_variant(b, kind, chunks) for kind, chunks in variants]
    return {
        "format": "flex-plan",
        "version": 1,  # upgraded to 2 on writing (scripts/upgrade-plan.py)
        "producer": "make_multirank_plans.py (hand-written test plan)",
        "layer": layer,
        "world": {"size": world},
        "training": training,
        "arguments": arguments(layer, world, training),
        "workspace": {"bytes": b.offset, "alignment": 64,
                      "buffers": list(b.buffers.values())},
        "variants": built,
        "default_variant": 0,
    }


def layer(tokens, d, h, e, k, mode, factor, kind="ffn", act="relu",
          bias=True, dtype="f32", seed=11, batch_prioritized=False):
    result = {"tokens": tokens, "model_dim": d, "hidden_dim": h,
              "experts": e, "top_k": k, "capacity_mode": mode,
              "capacity_factor": factor, "expert_kind": kind,
              "activation": act, "bias": bias, "dtype": dtype,
              "router_fp32": True, "batch_prioritized": batch_prioritized,
              "normalize_gate": True, "gate_noise": 0.0, "seed": seed}
    if kind == "gated":
        result["bias"] = False
    return result


PLANS = {
    # W = 2, E = 4 (L = 2), fixed capacity with bias: EP without and with
    # pipelining, and DP.
    "mr_ffn_fixed_w2_train.json": (
        layer(12, 8, 12, 4, 2, "fixed", 1.25), 2,
        [("ep", 1), ("ep", 2), ("dp", 1), ("ex", 2)]),
    # W = 4, E = 8 (L = 2), dropless: sync_capacity before tokens move.
    "mr_ffn_dropless_w4_train.json": (
        layer(10, 8, 6, 8, 2, "dropless", 0.0, act="gelu",
              batch_prioritized=True), 4,
        [("ep", 1), ("ep", 2), ("dp", 1)]),
    # W = 2, E = 4, SwiGLU experts, bounded capacity in bf16.
    "mr_gated_bounded_w2_train_bf16.json": (
        layer(16, 8, 8, 4, 2, "bounded", 1.0, kind="gated", dtype="bf16"), 2,
        [("ep", 2), ("dp", 1), ("ex", 2)]),
    # W = 4, E = 4 (L = 1), top-1, fixed, inference.
    "mr_ffn_fixed_w4_infer.json": (
        layer(9, 4, 8, 4, 1, "fixed", 1.5, act="silu", bias=False), 4,
        [("ep", 1), ("ep", 2), ("dp", 1)]),
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    for name, (lay, world, variants) in PLANS.items():
        training = not name.endswith("_infer.json")
        # Written as format 1 and upgraded: every attribute a step kind
        # declares (StepKinds.def) is then in the file.
        plan = upgrade_plan.upgrade(make_plan(lay, world, training, variants))
        with open(os.path.join(here, name), "w") as f:
            json.dump(plan, f, indent=1)
            f.write("\n")
        print("wrote", name)


if __name__ == "__main__":
    main()
