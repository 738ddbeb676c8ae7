#!/usr/bin/env python3
# ===- decode_chart.py - The decode layers and the grouped GEMM, as a chart -=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Reads the log of bench/gpu_decode.sh (flex-gemm-bench's table, the decode
# layers' moe-run lines, the PyTorch decode rows) and draws two panels:
#   1. each decode layer's forward: Flex with cuBLAS per expert (before the
#      device-sized kernel), Flex with the kernel (eager, and as a CUDA
#      graph), the plain PyTorch layer, and the weight-read floor;
#   2. the grouped GEMM alone (forward GEMMs): the device-sized kernel
#      against cuBLAS per expert, per shape, over its floor.
# Prints the numbers it drew, so a chart is never the only record.
#
#   python3 bench/decode_chart.py LOG [--out chart.png]
#
# ===----------------------------------------------------------------------=== #
import argparse
import re
import sys


def parse(text):
    gemm = []  # (shape, op, rows per expert, device us, cublas us, floor us)
    for line in text.splitlines():
        m = re.match(r"^(\S+)\s+(fc1|fc2|dgrad1|wgrad1)\s+(\d+)\s+([\d.]+)\s+"
                     r"(\d+)\s+\|\s+([\d.]+)\s+([\d.]+)\s+(\S+)\s+\|\s+"
                     r"(\S+)\s+(\S+)", line)
        if m:
            gemm.append((m[1], m[2], float(m[4]), float(m[6]), float(m[7]),
                         float(m[10])))
    layers = {}  # name -> {mode: us}
    for m in re.finditer(r"^(d\d)_dropless\.infer (\S+) \(exit 0\): forward: "
                         r"([\d.]+) us median ([\d.]+)", text, re.M):
        layers.setdefault(m[1], {})[m[2]] = float(m[4])
    for m in re.finditer(r"^(d\d) dropless: fwd ([\d.]+) ms .* floor ([\d.]+) "
                         r"ms", text, re.M):
        layers.setdefault(m[1], {})["pytorch"] = 1000 * float(m[2])
        layers[m[1]]["floor"] = 1000 * float(m[3])
    return gemm, layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--out", default="decode.png")
    args = ap.parse_args()
    gemm, layers = parse(open(args.log).read())
    if not gemm or not layers:
        sys.exit(f"decode_chart.py: no gemm table or decode layers in {args.log}")
    modes = [("cublas", "Flex, cuBLAS per expert"),
             ("device", "Flex, device-sized GEMM"),
             ("device-graph", "Flex, device-sized, CUDA graph"),
             ("pytorch", "PyTorch grouped-GEMM layer"),
             ("floor", "weight-read floor")]
    print("decode layers, forward us:")
    for name, row in sorted(layers.items()):
        print(f"  {name}: " + ", ".join(f"{label} {row[key]:.0f}"
                                        for key, label in modes if key in row))
    fwd = [g for g in gemm if g[1] in ("fc1", "fc2")]
    print("grouped GEMM alone (us): shape op rows/expert device cublas floor")
    for g in fwd:
        print(f"  {g[0]} {g[1]} {g[2]:.0f} {g[3]:.1f} {g[4]:.1f} {g[5]:.1f}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("decode_chart.py: matplotlib is not installed; no chart")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8),
                                      gridspec_kw={"width_ratios": [1, 2]})
    names = sorted(layers)
    width = 0.16
    for i, (key, label) in enumerate(modes):
        xs = [n + (i - 2) * width for n in range(len(names))]
        ys = [layers[name].get(key, 0) for name in names]
        left.bar(xs, ys, width, label=label)
    left.set_xticks(range(len(names)))
    left.set_xticklabels([n.upper() for n in names])
    left.set_ylabel("forward, us (lower is better)")
    left.set_title("Decode layers (H100, bf16)")
    left.legend(fontsize=7)
    labels = [f"{g[0]}\n{g[1]}, {g[2]:.0f}/exp" for g in fwd]
    xs = range(len(fwd))
    right.bar([x - 0.2 for x in xs], [g[4] for g in fwd], 0.4,
              label="cuBLAS per expert (host read)")
    right.bar([x + 0.2 for x in xs], [g[3] for g in fwd], 0.4,
              label="device-sized kernel")
    right.scatter(list(xs), [g[5] for g in fwd], color="black", marker="_",
                  s=400, label="weight-read floor", zorder=3)
    right.set_xticks(list(xs))
    right.set_xticklabels(labels, fontsize=6, rotation=35, ha="right")
    right.set_yscale("log")
    right.set_ylabel("us (log)")
    right.set_title("One grouped GEMM of a dynamic routing, E = 64 (C3: 1536 rows/expert)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
