#!/usr/bin/env python3
"""Collects one benchmark run (bench/gpu_run.sh) into results.json, draws the
chart and prints the table last (the device tool returns only the tail).

Inputs, in the work directory gpu_run.sh fills:
  info.json            GPU, date, commit, versions (gpu_run.sh)
  steps.tsv            name, exit status, seconds of each step of the run
  torch.json           bench/torch_moe_layer.py
  raw/check_*.json     moe-run --check --json on the small check plans
  raw/flex_<cfg>_<mode>_<pass>[_graph].json   moe-run --json timings
                       (pass: fwd = inference plan, fwd_bwd = training plan
                       with --train); a .err file beside each holds stderr.
Outputs in --out: results.json, bench.png.

Stages: a plan's steps are mapped to PERF.md's stages by op (STAGE_OF_OP);
forward+backward stages sum both passes. TFLOP/s: FLOPs = T*d*h*4*k forward
(gated: T*d*h*6*k), 3x forward+backward, over the median (PyTorch) or mean
(moe-run, unless it reports a median) time; fractions are of the ceilings
measured in the same run. Decode configs (d1, d2) are forward only and get
their own table: time against the floor (the touched experts' weight bytes
over the copy ceiling, from torch.json).

usage: python3 bench/report.py --work DIR --out DIR
       python3 bench/report.py --results results.json --out DIR   (redraw)
"""

import argparse
import glob
import json
import os
import sys

STAGES = ("gate", "dispatch", "experts", "combine", "other")
STAGE_OF_OP = {
    "router": "gate", "gate": "gate", "gate_backward": "gate", "router_backward": "gate",
    "dispatch": "dispatch", "dispatch_backward": "dispatch",
    "grouped_gemm": "experts", "grouped_gemm_wgrad": "experts", "glu": "experts",
    "glu_backward": "experts", "activation_backward": "experts",
    "combine": "combine", "combine_backward": "combine",
}
CONFIG_ORDER = ("c1", "c2", "c3", "g1", "g3", "d1", "d2")
MODE_ORDER = ("cap1", "dropless")
# Shapes when torch.json lacks a config; T defaults to 16384. Gated: w1, w3, w2
# (6*k FLOPs a token-dimension); decode: dropless, forward only.
SHAPES = {"c1": dict(d=4096, h=4096, k=2), "c2": dict(d=4096, h=14336, k=2),
          "c3": dict(d=2048, h=1408, k=6),
          "g1": dict(d=4096, h=14336, k=2, gated=True), "g3": dict(d=2048, h=1408, k=6, gated=True),
          "d1": dict(d=2048, h=1408, k=6, T=256, decode=True),
          "d2": dict(d=4096, h=1536, k=8, T=128, gated=True, decode=True)}
MODE_TEXT = {"cap1": "cap 1.0", "dropless": "dropless"}


def load_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        return {"error": f"{os.path.basename(path)}: {error}"}


def read_text(path, limit=2000):
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:]
    except OSError:
        return ""


def pass_ms(record):
    """(total ms, is_median) of one moe-run pass record (forward/backward)."""
    for key, is_median in (("median_us", True), ("mean_us", False)):
        if isinstance(record.get(key), (int, float)):
            return record[key] / 1000.0, is_median
    return None, False


def flex_entry(run):
    """Totals and stages (ms) of one moe-run --json output."""
    if "forward" not in run:
        return {"error": run.get("error", "no 'forward' in the moe-run output")}
    entry = {"variant": run.get("variant"), "layer": run.get("layer"), "stages": {}}
    # Auto still measuring variants at the last call: the times are of a
    # variant it tried, not of its choice (moe-run --settle avoids it).
    if run.get("auto_exploring"):
        entry["exploring"] = True
    total, is_median = 0.0, True
    for pass_name in ("forward", "backward"):
        record = run.get(pass_name)
        if record is None:
            continue
        ms, med = pass_ms(record)
        if ms is None:
            return {"error": f"no time in moe-run's '{pass_name}'"}
        entry[pass_name + "_ms"] = ms
        total += ms
        is_median &= med
        for key in ("min_us", "max_us"):
            if isinstance(record.get(key), (int, float)):
                entry[f"{pass_name}_{key[:-3]}_ms"] = record[key] / 1000.0
        for step in record.get("steps", []):
            us = step.get("median_us", step.get("mean_us"))
            if not isinstance(us, (int, float)):
                continue
            stage = STAGE_OF_OP.get(step.get("op"), "other")
            entry["stages"][stage] = entry["stages"].get(stage, 0.0) + us / 1000.0
    entry["total_ms"] = total
    entry["statistic"] = "median" if is_median else "mean"
    return entry


def collect(work):
    info = load_json(os.path.join(work, "info.json"))
    steps = []
    try:
        with open(os.path.join(work, "steps.tsv")) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    steps.append({"step": parts[0], "rc": int(parts[1]), "seconds": int(parts[2]),
                                  "note": parts[3] if len(parts) > 3 else ""})
    except OSError:
        pass
    results = {"info": info, "steps": steps}
    torch_path = os.path.join(work, "torch.json")
    results["torch"] = load_json(torch_path) if os.path.exists(torch_path) else {"error": "not run"}

    flex = {"checks": {}, "runs": {}}
    for path in sorted(glob.glob(os.path.join(work, "raw", "check_*.json"))):
        name = os.path.basename(path)[len("check_"):-len(".json")]
        run = load_json(path)
        flex["checks"][name] = run.get("check", {"error": run.get("error", "no check in output"),
                                                 "stderr": read_text(path[:-5] + ".err", 600)})
    for path in sorted(glob.glob(os.path.join(work, "raw", "flex_*.json"))):
        key = os.path.basename(path)[len("flex_"):-len(".json")]
        entry = flex_entry(load_json(path))
        if "error" in entry:
            entry["stderr"] = read_text(path[:-5] + ".err", 600)
        flex["runs"][key] = entry
    note = os.path.join(work, "flex_note.txt")
    if os.path.exists(note):
        flex["note"] = read_text(note).strip()
    results["flex"] = flex
    return results


def ceilings(results):
    ce = results.get("torch", {}).get("ceilings", {})
    gemm = ce.get("gemm_bf16_8192", {}).get("tflops")
    copy = ce.get("copy_d2d", {}).get("tbps")
    return gemm, copy


def build_rows(results):
    """One row per (config, mode, pass): PyTorch and Flex times, TFLOP/s, fractions."""
    torch_res = results.get("torch", {})
    configs = torch_res.get("configs", {})
    runs = results.get("flex", {}).get("runs", {})
    gemm_ceiling, _ = ceilings(results)
    rows = []
    for cfg in CONFIG_ORDER:
        shape = configs.get(cfg, SHAPES[cfg])
        decode = SHAPES[cfg].get("decode", False)
        flops = (shape.get("T", 16384) * shape["d"] * shape["h"]
                 * (6 if shape.get("gated", SHAPES[cfg].get("gated")) else 4) * shape["k"])
        for mode in MODE_ORDER:
            passes = (("fwd", 1),) if decode else (("fwd", 1), ("fwd_bwd", 3))
            for pass_name, factor in passes:
                row = {"cfg": cfg, "mode": mode, "pass": pass_name, "flops": factor * flops}
                if decode:
                    row["decode"] = True
                    tmode = configs.get(cfg, {}).get("modes", {}).get(mode, {})
                    for key in ("touched_experts", "touched_weight_bytes"):
                        if key in tmode:
                            row[key] = tmode[key]
                    if "floor" in tmode:
                        row["floor_ms"] = tmode["floor"]["ms"]
                tm = configs.get(cfg, {}).get("modes", {}).get(mode, {}).get(pass_name)
                if tm:
                    row["torch_ms"] = tm["median_ms"]
                    row["torch_min_ms"], row["torch_max_ms"] = tm["min_ms"], tm["max_ms"]
                eg = configs.get(cfg, {}).get("expert_gemms_alone", {}).get(pass_name)
                if eg:
                    row["gemms_alone_ms"] = eg["median_ms"]
                for graph in ("", "_graph"):
                    run = runs.get(f"{cfg}_{mode}_{pass_name}{graph}")
                    if run and "total_ms" in run and not run.get("exploring"):
                        row["flex" + graph + "_ms"] = run["total_ms"]
                for name in ("torch_ms", "gemms_alone_ms", "flex_ms", "flex_graph_ms"):
                    if name in row:
                        tflops = row["flops"] / (row[name] * 1e-3) / 1e12
                        row[name[:-3] + "_tflops"] = tflops
                        if gemm_ceiling:
                            row[name[:-3] + "_of_gemm_ceiling"] = tflops / gemm_ceiling
                if any(k in row for k in ("torch_ms", "flex_ms", "flex_graph_ms")):
                    rows.append(row)
    return rows


def stage_times(results, cfg, mode, pass_name):
    """{'PyTorch': {stage: ms}, 'Flex': {...}, 'Flex graph': {...}} for the chart."""
    bars = {}
    tm = results.get("torch", {}).get("configs", {}).get(cfg, {}).get("modes", {}).get(mode, {})
    if pass_name == "fwd" and "fwd" in tm:
        bars["PyTorch"] = {s: v["median_ms"] for s, v in tm["fwd"]["stages"].items()}
    elif pass_name == "fwd_bwd" and "fwd_bwd" in tm:
        # autograd's backward is not split by stage: one 'backward' block.
        parts = tm["fwd_bwd"]["parts"]
        bars["PyTorch"] = {"backward": tm["fwd_bwd"]["median_ms"]}
        if "forward" in parts:
            bars["PyTorch"] = {"backward": parts["backward"]["median_ms"]}
            fwd_stages = tm.get("fwd", {}).get("stages")
            if fwd_stages:  # forward split as measured without autograd, scaled
                scale = parts["forward"]["median_ms"] / max(1e-9, sum(
                    v["median_ms"] for v in fwd_stages.values()))
                for s, v in fwd_stages.items():
                    bars["PyTorch"][s] = v["median_ms"] * scale
    runs = results.get("flex", {}).get("runs", {})
    for graph, label in (("", "Flex"), ("_graph", "Flex graph")):
        run = runs.get(f"{cfg}_{mode}_{pass_name}{graph}")
        if run and "total_ms" in run and not run.get("exploring"):
            # A graph replays the whole pass at once: the per-step times moe-run
            # prints for it are not the steps' (they include the replay), so
            # the chart shows its total only.
            stages = {} if graph else dict(run.get("stages", {}))
            covered = sum(stages.values())
            if covered < run["total_ms"] * 0.999:  # time outside steps (or a graph: no steps)
                stages["other"] = stages.get("other", 0.0) + run["total_ms"] - covered
            bars[label] = stages
    return bars


def draw_chart(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("report.py: matplotlib is missing; no chart", file=sys.stderr)
        return False
    colors = {"gate": "#4C72B0", "dispatch": "#DD8452", "experts": "#55A868",
              "combine": "#C44E52", "other": "#8C8C8C",
              "backward": "#4D4D4D"}  # PyTorch's autograd backward, not split by stage
    chart_stages = STAGES + ("backward",)
    configs = results.get("torch", {}).get("configs", {})
    runs = results.get("flex", {}).get("runs", {})
    # The configs with a result; C1-C3 always (as before) unless a newer
    # config ran, which shows only what ran.
    present = [cfg for cfg in CONFIG_ORDER
               if cfg in configs or any(key.startswith(cfg + "_") for key in runs)]
    columns = (list(CONFIG_ORDER[:3]) if all(cfg in CONFIG_ORDER[:3] for cfg in present)
               else present)
    fig, axes = plt.subplots(2, len(columns), figsize=(17 * len(columns) / 3, 9), squeeze=False)
    for col, cfg in enumerate(columns):
        for row_index, pass_name in enumerate(("fwd", "fwd_bwd")):
            ax = axes[row_index][col]
            if pass_name == "fwd_bwd" and SHAPES[cfg].get("decode"):
                ax.axis("off")  # decode rows: forward only
                ax.set_title(f"{cfg.upper()}: forward only (decode)")
                continue
            labels, positions, x = [], [], 0.0
            for mode in MODE_ORDER:
                for label, stages in stage_times(results, cfg, mode, pass_name).items():
                    bottom = 0.0
                    for stage in chart_stages:
                        value = stages.get(stage, 0.0)
                        if value > 0:
                            ax.bar(x, value, bottom=bottom, color=colors[stage])
                            bottom += value
                    ax.text(x, bottom, f"{bottom:.2f}", ha="center", va="bottom", fontsize=7)
                    labels.append(f"{label}\n{MODE_TEXT[mode]}")
                    positions.append(x)
                    x += 1
                x += 0.5  # a gap between capacity modes
            eg = configs.get(cfg, {}).get("expert_gemms_alone", {}).get(pass_name)
            if eg:
                ax.axhline(eg["median_ms"], color="black", linestyle="--", linewidth=0.8)
            floor = configs.get(cfg, {}).get("modes", {}).get("dropless", {}).get("floor")
            if floor and pass_name == "fwd":  # decode rows: the weight-read floor
                ax.axhline(floor["ms"], color="purple", linestyle=":", linewidth=1.2)
            ax.set_xticks(positions)
            ax.set_xticklabels(labels, fontsize=7)
            ax.set_title(f"{cfg.upper()} {'forward' if pass_name == 'fwd' else 'forward+backward'}")
            ax.set_ylabel("ms per call")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
    handles = [Patch(color=colors[s], label=s) for s in STAGES]
    handles.append(Patch(color=colors["backward"], label="PyTorch backward (autograd, unsplit)"))
    handles.append(Line2D([0], [0], color="black", linestyle="--", label="expert GEMMs alone (bmm)"))
    if any(SHAPES[cfg].get("decode") for cfg in columns):
        handles.append(Line2D([0], [0], color="purple", linestyle=":",
                              label="decode floor (touched weights / copy ceiling)"))
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    info = results.get("info", {})
    decode = [cfg for cfg in columns if SHAPES[cfg].get("decode")]
    tokens = "T=16384" + (" (decode: " + ", ".join(
        f"{cfg.upper()} {SHAPES[cfg]['T']}" for cfg in decode) + ")" if decode else "")
    fig.suptitle(f"Flex vs PyTorch grouped-GEMM MoE layer, {tokens}, bf16 - "
                 f"{info.get('gpu', '?')}, {info.get('date', '?')}, commit {info.get('commit', '?')}")
    fig.tight_layout(rect=(0, 0, 0.95, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def min_bytes(cfg, stage):
    """Fewest bytes a forward stage must move (bf16, every slot kept): dispatch
    reads and writes T*k rows of d; combine reads T*k rows and writes T."""
    shape = SHAPES[cfg]
    T = shape.get("T", 16384)
    if stage == "dispatch":
        return 2 * T * shape["k"] * shape["d"] * 2
    if stage == "combine":
        return (T * shape["k"] + T) * shape["d"] * 2
    return None


def copy_fraction(cfg, stage, ms, copy_tbps):
    """Share of the copy ceiling that a memory-bound stage reaches."""
    nbytes = min_bytes(cfg, stage)
    if not nbytes or not ms or not copy_tbps:
        return None
    return nbytes / (ms * 1e-3) / 1e12 / copy_tbps


def fmt(value, spec):
    """format(value, spec), or '-' in the same width when there is no value."""
    if isinstance(value, (int, float)):
        return format(value, spec)
    width = "".join(ch for ch in spec.split(".")[0] if ch.isdigit())
    return "-".rjust(int(width)) if width else "-"


def print_decode_table(rows):
    """Decode rows (forward only): times against the floor, the touched
    experts' weights read once at the copy ceiling. Nothing without rows."""
    if not rows:
        return
    print("Decode rows (forward, dropless): floor = touched experts' weight bytes / copy ceiling")
    print(f"{'cfg':<4}{'touched':>8}{'weights MB':>11}{'floor ms':>9}{'PyTorch ms':>11}"
          f"{'[min,max]':>16}{'Flex ms':>9}{'Flex+graph':>11}{'torch/floor':>12}{'Flex/floor':>11}")
    for r in rows:
        best_flex = min([r[k] for k in ("flex_ms", "flex_graph_ms") if k in r], default=None)
        floor = r.get("floor_ms")
        span = (f"[{r['torch_min_ms']:.3f},{r['torch_max_ms']:.3f}]" if "torch_min_ms" in r else "-")
        mb = r["touched_weight_bytes"] / 1e6 if "touched_weight_bytes" in r else None
        print(f"{r['cfg']:<4}{fmt(r.get('touched_experts'), '8d')}{fmt(mb, '11.0f')}"
              f"{fmt(floor, '9.3f')}{fmt(r.get('torch_ms'), '11.3f')}{span:>16}"
              f"{fmt(r.get('flex_ms'), '9.3f')}{fmt(r.get('flex_graph_ms'), '11.3f')}"
              f"{fmt(r['torch_ms'] / floor if floor and 'torch_ms' in r else None, '11.2f')}x"
              f"{fmt(best_flex / floor if floor and best_flex else None, '10.2f')}x")


def print_table(results):
    info = results.get("info", {})
    print("\n=== Flex benchmark ===")
    print(f"GPU {info.get('gpu', '?')} | date {info.get('date', '?')} | commit "
          f"{info.get('commit', '?')} | torch {results.get('torch', {}).get('torch', '?')}")
    for step in results.get("steps", []):
        if step["rc"] != 0:
            print(f"step FAILED: {step['step']} (exit {step['rc']}, {step['seconds']} s) {step['note']}")
    torch_res = results.get("torch", {})
    if "error" in torch_res:
        print(f"PyTorch baseline: {torch_res['error']}")
    checks = torch_res.get("check", [])
    if checks:
        print(f"PyTorch layer vs fp64: {sum(c['pass'] for c in checks)}/{len(checks)} cases pass "
              f"(max rel L2 {max(max(c['errors'].values()) for c in checks):.1e})")
    flex = results.get("flex", {})
    if flex.get("note"):
        print(f"Flex: {flex['note']}")
    fchecks = flex.get("checks", {})
    if fchecks:
        passed = [n for n, c in fchecks.items() if c.get("pass") is True]
        failed = [n for n in fchecks if n not in passed]
        print(f"Flex moe-run --check (CUDA) vs fp64: {len(passed)}/{len(fchecks)} pass"
              + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    failed_runs = {k: v for k, v in flex.get("runs", {}).items() if "error" in v}
    for key, run in failed_runs.items():
        print(f"Flex run {key} failed: {run['error']} {run.get('stderr', '').strip()[-200:]}")
    for key, run in flex.get("runs", {}).items():
        if run.get("exploring"):
            print(f"Flex run {key} left out: auto was still measuring variants at its last "
                  f"call ('{run.get('variant')}' timed, not its choice)")
    gemm, copy = ceilings(results)
    print(f"ceilings: bf16 GEMM 8192^3 {fmt(gemm, '.0f')} TFLOP/s, D2D copy {fmt(copy, '.2f')} TB/s")
    rows = build_rows(results)
    header = (f"{'cfg':<4}{'mode':<9}{'pass':<8}{'GEMMs alone':>12}{'PyTorch ms':>11}"
              f"{'[min,max]':>16}{'Flex ms':>9}{'Flex+graph':>11}{'TF/s torch':>11}"
              f"{'TF/s Flex':>10}{'Flex %ceil':>11}{'speedup':>8}")
    print(header)
    for r in (r for r in rows if not r.get("decode")):
        best_flex = min([r[k] for k in ("flex_ms", "flex_graph_ms") if k in r], default=None)
        flex_tflops = r["flops"] / (best_flex * 1e-3) / 1e12 if best_flex else None
        span = (f"[{r['torch_min_ms']:.2f},{r['torch_max_ms']:.2f}]" if "torch_min_ms" in r else "-")
        print(f"{r['cfg']:<4}{r['mode']:<9}{r['pass']:<8}{fmt(r.get('gemms_alone_ms'), '12.3f')}"
              f"{fmt(r.get('torch_ms'), '11.3f')}{span:>16}{fmt(r.get('flex_ms'), '9.3f')}"
              f"{fmt(r.get('flex_graph_ms'), '11.3f')}{fmt(r.get('torch_tflops'), '11.0f')}"
              f"{fmt(flex_tflops, '10.0f')}"
              f"{fmt(flex_tflops / gemm * 100 if flex_tflops and gemm else None, '10.0f')}%"
              f"{fmt(r['torch_ms'] / best_flex if best_flex and 'torch_ms' in r else None, '8.2f')}")
    print_decode_table([r for r in rows if r.get("decode")])
    # PyTorch forward stages (ms), to see where the gap is.
    print("PyTorch forward stages (median ms): gate / dispatch / experts / combine; "
          "dispatch, combine as % of the copy ceiling; dropped %")
    for cfg, entry in torch_res.get("configs", {}).items():
        for mode, m in entry.get("modes", {}).items():
            st = m["fwd"]["stages"]
            frac = [copy_fraction(cfg, s, st[s]["median_ms"], copy) for s in ("dispatch", "combine")]
            print(f"  {cfg} {mode:<9}" + " / ".join(f"{st[s]['median_ms']:.3f}" for s in STAGES[:4])
                  + f"; {fmt(frac[0] and 100 * frac[0], '.0f')}%, {fmt(frac[1] and 100 * frac[1], '.0f')}%"
                  + f"; dropped {100 * m['dropped_fraction']:.2f}%")
    runs = flex.get("runs", {})
    if any("stages" in v and v["stages"] for v in runs.values()):
        print("Flex stages (ms): gate / dispatch / experts / combine / other; forward "
              "dispatch, combine as % of the copy ceiling")
        for key, run in runs.items():
            if run.get("stages") and not run.get("exploring"):
                st = run["stages"]
                line = f"  {key:<26}" + " / ".join(fmt(st.get(s), '.3f') for s in STAGES)
                cfg = key.split("_")[0]
                if key.endswith("_fwd") or key.endswith("_fwd_graph"):
                    frac = [copy_fraction(cfg, s, st.get(s), copy) for s in ("dispatch", "combine")]
                    line += (f"; {fmt(frac[0] and 100 * frac[0], '.0f')}%, "
                             f"{fmt(frac[1] and 100 * frac[1], '.0f')}%")
                print(line)


def main():
    parser = argparse.ArgumentParser(description="collect, chart and tabulate one benchmark run")
    parser.add_argument("--work", help="the work directory gpu_run.sh filled")
    parser.add_argument("--results", help="an existing results.json (redraw only)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if bool(args.work) == bool(args.results):
        sys.exit("report.py: give exactly one of --work DIR or --results FILE")
    os.makedirs(args.out, exist_ok=True)
    if args.work:
        results = collect(args.work)
        results["rows"] = build_rows(results)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    else:
        results = load_json(args.results)
        if "error" in results and len(results) == 1:
            sys.exit(f"report.py: {results['error']}")
    try:
        draw_chart(results, os.path.join(args.out, "bench.png"))
    except Exception as error:  # a broken chart must not hide the table
        print(f"report.py: chart failed: {error!r}", file=sys.stderr)
    print_table(results)


if __name__ == "__main__":
    main()
