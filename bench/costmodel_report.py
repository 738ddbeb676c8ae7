#!/usr/bin/env python3
"""The cost model's accuracy report (bench/gpu_costmodel.sh; docs/CostModel.md,
"The accuracy benchmark"). Reads the `moe-run --json --explain` output of each
layer and prints per layer the predicted and measured forward (and backward)
time of the variant that ran, the relative error (measured - predicted) /
predicted, per stage predicted vs measured (the measured per-step means
summed by the model's stage of each op), and the summary: the median and
90th percentile absolute error of the whole pass (forward, plus backward for
training plans), and how many layers are within 10%.

usage: costmodel_report.py RUNS_DIR [--profile P] [--layers LAYERS] [--json OUT]
"""
import argparse
import glob
import json
import os
import statistics

STAGES = ["gate", "dispatch", "experts", "combine", "collectives"]
# getCostStage (lib/Runtime/CostModel/CostModel.cpp): op name -> stage.
GATE = {"router", "gate", "gate_backward", "router_backward", "shard_routing",
        "shard_routing_backward"}
DISPATCH = {"dispatch", "dispatch_backward", "uniform_segments"}
COMBINE = {"combine", "combine_backward"}
COLLECTIVES = {"all_to_all", "all_gather", "reduce_scatter", "all_reduce",
               "sync_capacity"}


def stage_of(op):
    if op in COLLECTIVES:
        return "collectives"
    if op in GATE:
        return "gate"
    if op in DISPATCH:
        return "dispatch"
    if op in COMBINE:
        return "combine"
    return "experts"


def measured_stages(steps):
    out = {s: 0.0 for s in STAGES}
    for step in steps or []:
        out[stage_of(step["op"])] += step["mean_us"]
    return out


def rel(measured, predicted):
    if not predicted or measured is None:
        return None
    return (measured - predicted) / predicted


def quantile(values, q):
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def pct(x):
    return "     -" if x is None else f"{100 * x:+5.0f}%"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("--profile")
    ap.add_argument("--layers")
    ap.add_argument("--json")
    ap.add_argument("--auto", help="folder of moe-run JSONs run with the "
                    "automatic choice (LAYER.json): the variant it settled on")
    args = ap.parse_args()

    shapes = {}
    if args.layers and os.path.exists(args.layers):
        for line in open(args.layers):
            parts = line.split()
            if len(parts) == 10:
                shapes[parts[0]] = " ".join(parts[1:])
    profile = {}
    if args.profile and os.path.exists(args.profile):
        try:
            profile = json.load(open(args.profile))
        except Exception as e:  # a corrupt profile is reported, not fatal
            profile = {"error": str(e)}

    layers, failed = [], []
    for path in sorted(glob.glob(os.path.join(args.runs, "*.json"))):
        name = os.path.basename(path)[:-5]
        try:
            doc = json.load(open(path))
        except Exception:
            failed.append(name)
            continue
        explain = doc.get("explain", {})
        # The variant that ran (a named one, or auto's choice).
        variant = next((v for v in explain.get("variants", [])
                        if v.get("name") == doc.get("variant")), None)
        if variant is None:
            failed.append(name)
            continue
        entry = {"name": name, "shape": shapes.get(name.split(".")[0], ""),
                 "layer": ".".join(name.split(".")[:2]),
                 "variant": doc.get("variant"),
                 "variant_index": variant.get("index", 0),
                 "profile_source": explain.get("profile", {}).get("source"),
                 "capacity": explain.get("capacity")}
        total_pred = total_meas = 0.0
        for pass_name in ("forward", "backward"):
            if pass_name not in doc:
                continue
            meas = doc[pass_name]["median_us"]
            pred = variant.get(f"predicted_{pass_name}_us")
            stages_pred = variant.get(f"{pass_name}_stages_us") or {}
            stages_meas = measured_stages(doc[pass_name].get("steps"))
            entry[pass_name] = {
                "predicted_us": pred, "measured_us": meas,
                "error": rel(meas, pred),
                "stages": {s: {"predicted_us": stages_pred.get(s),
                               "measured_us": stages_meas[s],
                               "error": rel(stages_meas[s], stages_pred.get(s))}
                           for s in STAGES},
                "steps": doc[pass_name].get("steps")}
            total_pred += pred or 0.0
            total_meas += meas
        entry["pass"] = {"predicted_us": total_pred, "measured_us": total_meas,
                         "error": rel(total_meas, total_pred)}
        layers.append(entry)

    dev = profile.get("device", {})
    print(f"device profile: {dev.get('name', '?')} driver {dev.get('driver', '?')} "
          f"CUDA {dev.get('cuda', '?')} NCCL {dev.get('nccl', '') or '-'} "
          f"({profile.get('source', 'missing')}, {profile.get('created', '')})")
    if "memory" in profile:
        m = profile["memory"]
        print(f"  memory {m['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s, launch "
              f"{m['launch_s'] * 1e6:.2f} us; {len(profile.get('gemm', []))} GEMM points")
    for st in profile.get("steps", []):
        rate = (f"{st['bytes_per_s'] / 1e9:8.1f} GB/s" if st.get("bytes_per_s")
                else f"gemm x {st.get('gemm_scale', 1):.2f}")
        print(f"  step {st['op']:<22} alpha {st['alpha_s'] * 1e6:7.1f} us, {rate} "
              f"({st.get('samples', 0)} runs)")
    print()
    print(f"{'layer':<10} {'T d h E k cap dtype ffn mode':<42} "
          f"{'fwd pred':>9} {'fwd meas':>9} {'err':>6} "
          f"{'bwd pred':>9} {'bwd meas':>9} {'err':>6} {'pass err':>8}")
    for e in layers:
        f, b = e.get("forward", {}), e.get("backward", {})
        def us(x):
            return "        -" if x is None else f"{x:9.1f}"
        print(f"{e['name']:<10} {e['shape']:<42} {us(f.get('predicted_us'))} "
              f"{us(f.get('measured_us'))} {pct(f.get('error'))} "
              f"{us(b.get('predicted_us'))} {us(b.get('measured_us'))} "
              f"{pct(b.get('error'))} {pct(e['pass']['error']):>8}")
    print()
    print("per stage, predicted / measured us (forward; backward for training plans):")
    for e in layers:
        for pass_name in ("forward", "backward"):
            if pass_name not in e:
                continue
            cells = []
            for s in STAGES:
                st = e[pass_name]["stages"][s]
                if not st["predicted_us"] and not st["measured_us"]:
                    continue
                cells.append(f"{s} {st['predicted_us'] or 0:.0f}/{st['measured_us']:.0f}")
            print(f"  {e['name']:<10} {pass_name[:3]}  " + ", ".join(cells))

    # The choice: per layer run in several variants, the model's pick (the
    # smallest predicted pass) against the fastest measured.
    picks = []
    by_layer = {}
    for e in layers:
        by_layer.setdefault(e["layer"], []).append(e)
    for layer, runs in sorted(by_layer.items()):
        if len(runs) < 2:
            continue
        # Ties go to the plan's lower variant index, as CostModel::choose.
        pick = min(runs, key=lambda e: (e["pass"]["predicted_us"],
                                        e.get("variant_index", 0)))
        best = min(runs, key=lambda e: e["pass"]["measured_us"])
        loss = pick["pass"]["measured_us"] / best["pass"]["measured_us"] - 1
        # The automatic choice as the runtime makes it: the model's pick,
        # then the measured times of the variants within its band
        # (Executor::refineChoice); the variant its last call ran.
        settled = None
        auto_path = os.path.join(args.auto or "", layer + ".json")
        if args.auto and os.path.exists(auto_path):
            try:
                doc = json.load(open(auto_path))
                settled = doc.get("explain", {}).get("chosen_name")
            except Exception:
                settled = None
        measured = {e["variant"]: e["pass"]["measured_us"] for e in runs}
        auto_loss = (measured[settled] / best["pass"]["measured_us"] - 1
                     if settled in measured else None)
        picks.append({"layer": layer, "pick": pick["variant"], "best": best["variant"],
                      "loss": loss, "auto": settled, "auto_loss": auto_loss,
                      "measured_us": {e["variant"]: e["pass"]["measured_us"] for e in runs},
                      "predicted_us": {e["variant"]: e["pass"]["predicted_us"] for e in runs}})
    if picks:
        print()
        print("the choice (layers run in every variant): model's pick vs the fastest measured")
        for c in picks:
            cells = ", ".join(f"{v} pred {c['predicted_us'][v]:.0f} / meas {c['measured_us'][v]:.0f}"
                              for v in c["measured_us"])
            auto = ("" if c["auto"] is None else
                    f"   auto settled on {c['auto']}, loss "
                    f"{100 * c['auto_loss']:.1f}%" if c["auto_loss"] is not None
                    else f"   auto settled on {c['auto']} (not measured)")
            print(f"  {c['layer']:<10} pick {c['pick']:<8} best {c['best']:<8} "
                  f"loss {100 * c['loss']:5.1f}%   ({cells}){auto}")

    errors = [abs(e["pass"]["error"]) for e in layers if e["pass"]["error"] is not None]
    fwd = [abs(e["forward"]["error"]) for e in layers
           if e.get("forward", {}).get("error") is not None]
    summary = {
        "layers": len(layers), "failed": failed,
        "median_abs_error": statistics.median(errors) if errors else None,
        "p90_abs_error": quantile(errors, 0.9),
        "within_10pct": sum(1 for x in errors if x <= 0.10),
        "forward_median_abs_error": statistics.median(fwd) if fwd else None,
        "forward_p90_abs_error": quantile(fwd, 0.9),
        "choices": len(picks),
        "picks_within_3pct": sum(1 for c in picks if c["loss"] <= 0.03),
        "auto_choices": sum(1 for c in picks if c["auto_loss"] is not None),
        "auto_within_3pct": sum(1 for c in picks if c["auto_loss"] is not None
                                and c["auto_loss"] <= 0.03),
        "mean_signed_error": statistics.mean([e["pass"]["error"] for e in layers
                                              if e["pass"]["error"] is not None])
        if errors else None,
    }
    print()
    def p(x):
        return "-" if x is None else f"{100 * x:.1f}%"
    print(f"summary: {summary['layers']} layers ({len(failed)} failed: "
          f"{', '.join(failed) or 'none'}); whole pass |error| median "
          f"{p(summary['median_abs_error'])}, p90 {p(summary['p90_abs_error'])}, "
          f"within 10%: {summary['within_10pct']}/{len(errors)}; forward only: "
          f"median {p(summary['forward_median_abs_error'])}, p90 "
          f"{p(summary['forward_p90_abs_error'])}; mean signed error "
          f"{p(summary['mean_signed_error'])} (+ = slower than predicted)")
    if picks:
        print(f"choice: the pick within 3% of the fastest in "
              f"{summary['picks_within_3pct']}/{summary['choices']} layers")
    if summary["auto_choices"]:
        print(f"automatic choice (model, then measured refinement): within 3% "
              f"of the fastest in {summary['auto_within_3pct']}/"
              f"{summary['auto_choices']} layers")
    if args.json:
        json.dump({"profile": profile, "summary": summary, "layers": layers,
                   "choices": picks},
                  open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
