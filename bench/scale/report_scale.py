#!/usr/bin/env python3
# ===- report_scale.py - The scale study's plot and table -----------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Reads bench/scale/scale.json (run_scale.sh: moe-scale's JSON per layer) and
# writes a PNG (--png: per layer, predicted forward + backward time per
# variant family against W on a log2 axis, the winner marked) and a Markdown
# table (--md: per layer and W the winner, the runner-up and the best of each
# family). matplotlib only for the PNG.
#
# ===----------------------------------------------------------------------=== #
import argparse
import json


def family(v, shards):
    """The line a variant belongs to, or None (1 < r < s: only the best)."""
    r, d = v["r"], v["d"]
    if v["two_dh"]:
        return "2DH, fused reorder (best d)" if v["fused_reorder"] else \
            "2DH as built (best d)"
    if r == 0:
        return "r0 (data parallel)"
    if r == 1:
        return f"r1 d{d}"
    if r == shards:
        return f"r=s d{d}"
    return "1<r<s (best)"


def shards(point):
    return max(1, point["world_size"] // point["experts"])


def families(point):
    """{family: the best variant of it} at one W."""
    best = {}
    for v in point["variants"]:
        f = family(v, shards(point))
        if f is not None and (f not in best or v["total_us"] < best[f]["total_us"]):
            best[f] = v
    return best


def label(v):
    if v is None:
        return "-"
    mark = "" if v.get("fits", True) else "!"
    return f"{v['label']}{mark} {v['total_us'] / 1000:.2f}"


def best_of(point, keep):
    chosen = None
    for v in point["variants"]:
        if keep(v) and (chosen is None or v["total_us"] < chosen["total_us"]):
            chosen = v
    return chosen


def markdown(doc):
    out = []
    for name, data in doc["layers"].items():
        layer = data["layer"]
        out.append(f"**{name}**: T {layer['tokens_per_gpu']} per GPU, d {layer['model_dim']}, "
                   f"h {layer['hidden_dim']}, E {layer['experts']}, top-{layer['top_k']}, "
                   f"{layer['dtype']}, capacity {layer['capacity_mode']} "
                   f"{layer['capacity_factor']:g}; forward + backward, ms "
                   f"(! = over {data.get('memory_gib', 80):g} GiB per GPU)\n")
        out.append("| W | nodes | winner | runner-up | best flat EP | best 2DH (as built) "
                   "| best 2DH, fused reorder | r0d1 |")
        out.append("|---|---|---|---|---|---|---|---|")
        for p in data["points"]:
            by = {v["label"]: v for v in p["variants"]}
            w = by.get(p["winner"])
            runner = min((v for v in p["variants"] if v is not w and not v["fused_reorder"]
                          and (v["fits"] or not p["any_fits"])),
                         key=lambda v: v["total_us"], default=None)
            runner_text = "-" if runner is None else \
                f"{runner['label']}{'' if runner['fits'] else '!'} " \
                f"+{(runner['total_us'] / w['total_us'] - 1) * 100:.1f}%"
            out.append("| {} | {} | **{}** | {} | {} | {} | {} | {} |".format(
                p["world_size"], p["nodes"], label(w), runner_text,
                label(best_of(p, lambda v: not v["two_dh"] and v["r"] != 0)),
                label(best_of(p, lambda v: v["two_dh"] and not v["fused_reorder"])),
                label(best_of(p, lambda v: v["two_dh"] and v["fused_reorder"])),
                label(best_of(p, lambda v: v["r"] == 0))))
        out.append("")
    return "\n".join(out)


# One colour per family on every panel.
COLOURS = {"r0 (data parallel)": "tab:red", "r1 d1": "tab:blue", "r1 d2": "tab:cyan",
           "r1 d4": "tab:purple", "r=s d1": "tab:olive", "r=s d2": "tab:brown",
           "r=s d4": "tab:pink", "1<r<s (best)": "tab:gray",
           "2DH as built (best d)": "tab:orange", "2DH, fused reorder (best d)": "tab:green"}


def plot(doc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = list(doc["layers"].items())
    fig, axes = plt.subplots(1, len(layers), figsize=(6.2 * len(layers), 5.4),
                             squeeze=False)
    for ax, (name, data) in zip(axes[0], layers):
        lines = {}
        for p in data["points"]:
            for f, v in families(p).items():
                lines.setdefault(f, []).append((p["world_size"], v))
        for f, points in sorted(lines.items()):
            xs = [w for w, _ in points]
            ys = [v["total_us"] / 1000 for _, v in points]
            style = "--" if "fused" in f else ":" if f.startswith("2DH") else "-"
            (line,) = ax.plot(xs, ys, style, marker=".", label=f, linewidth=1.3,
                              color=COLOURS.get(f))
            # Variants that do not fit the GPU's memory: hollow markers.
            over = [(w, v["total_us"] / 1000) for w, v in points if not v["fits"]]
            if over:
                ax.plot(*zip(*over), "o", mfc="none", color=line.get_color(), ms=7)
        winners = []
        for p in data["points"]:
            w = next(v for v in p["variants"] if v["label"] == p["winner"])
            winners.append((p["world_size"], w["total_us"] / 1000, w["label"]))
        ax.plot([w for w, _, _ in winners], [t for _, t, _ in winners], "*",
                color="black", ms=13, label="winner (as built)", zorder=5)
        for w, t, text in winners:
            ax.annotate(text, (w, t), textcoords="offset points", xytext=(0, -14),
                        ha="center", fontsize=7)
        layer = data["layer"]
        ax.set_title(f"{name}: T {layer['tokens_per_gpu']}/GPU, E {layer['experts']}, "
                     f"d=h {layer['model_dim']}", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("W (GPUs; 8 per node)")
        ax.set_ylabel("predicted forward + backward (ms)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    first = layers[0][1]
    fig.suptitle("Flex cost model past the machines: DGX H100-like nodes, profile "
                 f"{first['profile']['source']} (hollow = over "
                 f"{first.get('memory_gib', 80):g} GiB per GPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scale_json")
    parser.add_argument("--png")
    parser.add_argument("--md")
    args = parser.parse_args()
    doc = json.load(open(args.scale_json))
    table = markdown(doc)
    if args.md:
        open(args.md, "w").write(table + "\n")
    print(table)
    if args.png:
        plot(doc, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
