#!/usr/bin/env python3
"""Re-predicts the runs of an accuracy benchmark (bench/gpu_costmodel.sh's
runs directory) with this tree's cost model and the run's own profile, so a
model fix is judged on the times measured before it (docs/CostModel.md, "The
accuracy benchmark"). Each run's explain block gets the predictions
`moe-scale` (the same CostModel, for W = 1) makes for the variant that ran,
at the capacity that run used; the measured times are untouched. Then run
bench/costmodel_report.py on the output directory.

usage: costmodel_repredict.py RUNS_DIR PROFILE OUT_DIR [--moe-scale BIN]
       [--grouped-gemm auto|device|cublas]
"""
import argparse
import glob
import json
import os
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("runs")
    ap.add_argument("profile")
    ap.add_argument("out")
    ap.add_argument("--moe-scale", default="build/bin/moe-scale")
    ap.add_argument("--plans", default="bench/costmodel_plans")
    # Runs recorded before the device-sized grouped GEMM (Runs 15 and 17)
    # ran every dynamic GEMM through cuBLAS per expert: --grouped-gemm cublas.
    ap.add_argument("--grouped-gemm", default="auto",
                    choices=["auto", "device", "cublas"])
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for path in sorted(glob.glob(os.path.join(args.runs, "*.json"))):
        doc = json.load(open(path))
        layer = ".".join(os.path.basename(path).split(".")[:2])
        plan = os.path.join(args.plans, layer + ".json")
        explain = doc["explain"]
        cmd = [args.moe_scale, "--profile", args.profile, "--gpus-per-node", "1",
               # One rank: the links are never used.
               "--intra", "1e-5,1e-6,1e11", "--inter", "1e-5,1e-6,1e10",
               "--grouped-gemm", args.grouped_gemm, "--json", plan]
        if explain.get("capacity", -1) >= 0:
            cmd[1:1] = ["--capacity", str(explain["capacity"])]
        if "backward" in doc:
            cmd.insert(1, "--train")
        scale = json.loads(subprocess.check_output(cmd))
        by_name = {v["variant"]: v for v in scale["points"][0]["variants"]}
        for v in explain["variants"]:
            p = by_name[v["name"]]
            v["predicted_forward_us"] = p["forward_us"]
            v["forward_stages_us"] = p["forward_stages_us"]
            if "backward" in doc:
                v["predicted_backward_us"] = p["backward_us"]
                v["backward_stages_us"] = p["backward_stages_us"]
        explain["repredicted_by"] = "bench/costmodel_repredict.py"
        json.dump(doc, open(os.path.join(args.out, os.path.basename(path)), "w"))


if __name__ == "__main__":
    main()
