#!/usr/bin/env python3
# ===- multi_report.py - Tables of a multi-GPU run -----------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Reads the per-run JSON that bench/gpu_multi.sh leaves (a multi_results.tgz,
# or its multi/ folder) and prints, per config, one row per variant: the
# layer time with exchanges overlapped and serial, the exchange steps of the
# serial run, and the exposed communication (layer time minus the
# compute-only time: the r1d1 serial run's time minus its exchange steps,
# used for every variant; bench/RESULTS.md, "Runs 5-7"). The A/B runs
# (staged, inplace, ...) follow. Pass times are medians over iterations of
# each call's largest-over-ranks time (moe-run); exchange steps are
# per-step means of the largest over ranks; ms.
#
#   python3 bench/multi_report.py bench/results/gpu_multi_run6.tgz [--png F]
#
# --png F draws, per config, each variant's serial forward and backward as
# stacked stages (router, gate, dispatch, exchange, experts, combine,
# other; per-step times are exact only when serial) with the overlapped
# pass's time as a marker beside it.
#
# ===----------------------------------------------------------------------=== #

import io
import json
import os
import re
import sys
import tarfile

EXCHANGE_OPS = ("all_to_all", "all_gather", "reduce_scatter")
NAME = re.compile(r"flex_(?P<config>.+)_(?P<variant>r\d+d\d+|ep\d+|dp)_"
                  r"(?P<tag>[a-z0-9]+)\.json$")


def runs(path):
    """(config, variant, tag) -> the run's JSON."""
    found = {}

    def add(name, text):
        m = NAME.search(os.path.basename(name))
        if m:
            found[(m["config"], m["variant"], m["tag"])] = json.loads(text)

    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for f in files:
                with open(os.path.join(root, f)) as fh:
                    if f.endswith(".json"):
                        add(f, fh.read())
    else:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith(".json"):
                    add(member.name, tar.extractfile(member).read())
    return found


def totals(run):
    f, b = run["forward"], run["backward"]

    def exchange(pass_):
        return sum(s["mean_us"] for s in pass_.get("steps", [])
                   if s["op"] in EXCHANGE_OPS) / 1000

    return {"fwd": f["median_us"] / 1000,
            "all": (f["median_us"] + b["median_us"]) / 1000,
            "fwd_exchange": exchange(f),
            "all_exchange": exchange(f) + exchange(b)}


STAGES = (("router", ("router", "router_backward")),
          ("gate", ("gate", "gate_backward", "sync_capacity", "shard_routing",
                    "shard_routing_backward")),
          ("dispatch", ("dispatch", "dispatch_backward")),
          ("exchange", EXCHANGE_OPS),
          ("experts", ("grouped_gemm", "grouped_gemm_wgrad", "glu",
                       "glu_backward", "activation_backward",
                       "uniform_segments")),
          ("combine", ("combine", "combine_backward")))


def stages(pass_):
    """ms per stage of one pass's steps (the rest under 'other')."""
    out = {name: 0.0 for name, _ in STAGES}
    out["other"] = 0.0
    for step in pass_.get("steps", []):
        name = next((n for n, ops in STAGES if step["op"] in ops), "other")
        out[name] += step["mean_us"] / 1000
    return out


def draw(found, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    configs = sorted({c for c, _, t in found if t == "serial"})
    if not configs:
        sys.exit("multi_report.py --png: no serial runs to draw")
    fig, axes = plt.subplots(1, len(configs), figsize=(6 * len(configs), 4.5),
                             squeeze=False)
    names = [n for n, _ in STAGES] + ["other"]
    colors = plt.get_cmap("tab10").colors
    for ax, config in zip(axes[0], configs):
        variants = sorted(v for c, v, t in found
                          if c == config and t == "serial")
        labels, ticks, x = [], [], 0
        for v in variants:
            run = found[(config, v, "serial")]
            for pass_name in ("forward", "backward"):
                bottom = 0.0
                for i, (stage, ms) in enumerate(stages(run[pass_name]).items()):
                    ax.bar(x, ms, bottom=bottom, color=colors[i % len(colors)],
                           label=stage if x == 0 else None)
                    bottom += ms
                overlap = found.get((config, v, "overlap"))
                if overlap:
                    ax.plot([x - 0.4, x + 0.4],
                            [overlap[pass_name]["median_us"] / 1000] * 2,
                            color="black", linewidth=2,
                            label="overlapped pass" if x == 0 else None)
                labels.append(f"{v}\n{'fwd' if pass_name == 'forward' else 'bwd'}")
                ticks.append(x)
                x += 1
            x += 0.5
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("ms (serial steps, largest over ranks)")
        ax.set_title(config)
    handles, texts = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, texts, loc="upper right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.88, 1))
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def fmt(value):
    return "" if value is None else f"{value:.2f}"


def main():
    args = sys.argv[1:]
    png = None
    if "--png" in args:
        i = args.index("--png")
        if i + 1 >= len(args):
            sys.exit("usage: multi_report.py RESULTS.tgz|DIR [--png F]")
        png = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        sys.exit("usage: multi_report.py RESULTS.tgz|DIR [--png F]")
    sys.argv[1:] = args
    found = runs(sys.argv[1])
    if not found:
        sys.exit(f"multi_report.py: no flex_*.json runs in {sys.argv[1]}")
    configs = sorted({c for c, _, _ in found})
    for config in configs:
        variants = sorted({v for c, v, _ in found if c == config})
        # Compute-only: the fastest serial run of an r1d1 or r0d1 variant
        # without its exchanges (the experts' work is the same in each).
        serial = {v: totals(found[(config, v, "serial")]) for v in variants
                  if (config, v, "serial") in found}
        base = None
        if "r1d1" in serial:
            t = serial["r1d1"]
            base = (t["fwd"] - t["fwd_exchange"], t["all"] - t["all_exchange"])
        print(f"\n{config}" + (f"  (compute-only fwd {base[0]:.2f} ms, "
                               f"fwd+bwd {base[1]:.2f} ms)" if base else ""))
        print("| variant | fwd overlap | fwd serial | exchange steps (serial, "
              "fwd) | exposed fwd | fwd+bwd overlap | fwd+bwd serial | "
              "exposed fwd+bwd |")
        print("|---|---|---|---|---|---|---|---|")
        for v in variants:
            o = found.get((config, v, "overlap"))
            o = totals(o) if o else None
            s = serial.get(v)
            exposed = (o["fwd"] - base[0]) if (o and base) else None
            exposed_all = (o["all"] - base[1]) if (o and base) else None
            print(f"| {v} | {fmt(o and o['fwd'])} | {fmt(s and s['fwd'])} | "
                  f"{fmt(s and s['fwd_exchange'])} | {fmt(exposed)} | "
                  f"{fmt(o and o['all'])} | {fmt(s and s['all'])} | "
                  f"{fmt(exposed_all)} |")
        extra = sorted((v, t) for c, v, t in found
                       if c == config and t not in ("overlap", "serial"))
        for v, t in extra:
            x = totals(found[(config, v, t)])
            print(f"  A/B {v} {t}: fwd {x['fwd']:.2f} ms, fwd+bwd "
                  f"{x['all']:.2f} ms, exchange steps {x['fwd_exchange']:.2f}"
                  f" + {x['all_exchange'] - x['fwd_exchange']:.2f} ms")
    if png:
        draw(found, png)


if __name__ == "__main__":
    main()
