#!/usr/bin/env python3
# ===- step_chart.py - moe-run's per-step tables, side by side ----------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Draws one stacked bar per moe-run step table (the lines "  3 grouped_gemm
# 729.2 us  36.3%" under a pass), so the steps a change moved stand out
# between runs or variants. Each bar is LABEL=FILE[@MARKER]: the table is the
# run of step lines right after the first line of FILE containing MARKER
# (default "forward:"; e.g. "backward:", or a line a script printed before
# the table). Prints the numbers it drew, so a chart is never the only
# record. Needs matplotlib.
#
#   python3 bench/step_chart.py --out chart.png --title T \
#       "before=run29/c3_cap1.infer.txt" "after=run30/c3.txt"
#
# ===----------------------------------------------------------------------=== #
import argparse
import re
import sys

STEP = re.compile(r"^\s+\d+\s+(\S+)\s+([0-9.]+) us\s+[0-9.]+%")


def read_table(path, marker):
    """The (step, us) pairs of the first table after `marker` in `path`."""
    steps, inside = [], False
    with open(path) as f:
        for line in f:
            if not inside:
                inside = marker in line
                continue
            m = STEP.match(line)
            if not m:
                if steps:
                    break
                continue
            steps.append((m.group(1), float(m.group(2))))
    if not steps:
        sys.exit(f"step_chart: no step table after '{marker}' in {path}")
    return steps


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("bars", nargs="+", help="LABEL=FILE[@MARKER]")
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    args = parser.parse_args()

    tables = []
    for bar in args.bars:
        label, _, rest = bar.partition("=")
        path, _, marker = rest.partition("@")
        if not label or not path:
            sys.exit(f"step_chart: '{bar}' is not LABEL=FILE[@MARKER]")
        tables.append((label, read_table(path, marker or "forward:")))

    for label, steps in tables:
        total = sum(us for _, us in steps)
        print(f"{label}: total {total:.1f} us; " +
              ", ".join(f"{name} {us:.1f}" for name, us in steps))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = []
    for _, steps in tables:
        for name, _ in steps:
            if name not in kinds:
                kinds.append(name)
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(tables), 4.5))
    for x, (label, steps) in enumerate(tables):
        bottom = 0.0
        for name, us in steps:
            ax.bar(x, us, bottom=bottom, width=0.6,
                   color=colors(kinds.index(name) % 10), edgecolor="white")
            if us > 0.04 * sum(u for _, u in steps):
                ax.text(x, bottom + us / 2, f"{name}\n{us:.0f}", ha="center",
                        va="center", fontsize=7)
            bottom += us
        ax.text(x, bottom, f"{bottom:.0f} us", ha="center", va="bottom",
                fontsize=8)
    ax.set_xticks(range(len(tables)))
    ax.set_xticklabels([label for label, _ in tables], fontsize=8)
    ax.set_ylabel("us (sum of the steps' medians)")
    ax.set_title(args.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)


if __name__ == "__main__":
    main()
