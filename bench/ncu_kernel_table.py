#!/usr/bin/env python3
"""Per-kernel table of an `ncu --csv --metrics gpu__time_duration.sum,
dram__bytes_read.sum` log (bench/gpu_quick_staged.sh's decode profile):
each kernel's launches in order of the first, its median duration and DRAM
read, so a layer's fixed costs (router, gate, combine) are per kernel, not
per step (a step's event time holds its launches and the gaps).

  ncu_kernel_table.py LOG [ITERATIONS]

ITERATIONS: the profiled forwards (launches of a kernel are split evenly).
"""
import csv
import re
import statistics
import sys


def main():
    path = sys.argv[1]
    lines = [l for l in open(path, errors="replace") if l.startswith('"')]
    if not lines:
        print(f"{path}: no ncu CSV rows")
        return 1
    rows = list(csv.DictReader(lines))
    kernels = {}
    for r in rows:
        name = r.get("Kernel Name", "?")
        bare = re.sub(r"\(anonymous namespace\)|<unnamed>|unnamed>|^void ", "", name)
        found = re.search(r"(\w+)\s*[<(]", bare)  # the kernel's own name
        short = (found.group(1) if found else bare)[:48]
        # The whole name: instantiations of one kernel (the GLU GEMM, the
        # plain one) are rows of their own.
        key = (name, r.get("Grid Size", ""), r.get("Block Size", ""))
        entry = kernels.setdefault(
            key, {"time": [], "dram": [], "order": len(kernels), "short": short})
        value = float(r["Metric Value"].replace(",", "") or 0)
        unit = r.get("Metric Unit", "")
        scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1, "us": 1,
                 "msecond": 1e3, "ms": 1e3,
                 "byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9,
                 "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}.get(unit, 1)
        if r["Metric Name"] == "gpu__time_duration.sum":
            entry["time"].append(value * scale)
        elif r["Metric Name"] == "dram__bytes_read.sum":
            entry["dram"].append(value * scale)
    total = 0.0
    print(f"{'kernel':48s} {'grid':>14s} {'block':>12s} {'n':>3s} {'us':>8s} {'MB read':>8s}")
    for (_, grid, block), e in sorted(kernels.items(), key=lambda kv: kv[1]["order"]):
        short = e["short"]
        t = statistics.median(e["time"]) if e["time"] else 0.0
        d = statistics.median(e["dram"]) / 1e6 if e["dram"] else 0.0
        total += t * len(e["time"])
        print(f"{short:48s} {grid:>14s} {block:>12s} {len(e['time']):3d} {t:8.1f} {d:8.1f}")
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    print(f"sum of kernel medians x launches / {iters}: {total / iters:.1f} us per forward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
