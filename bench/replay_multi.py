#!/usr/bin/env python3
"""Replays the recorded multi-GPU runs (bench/RESULTS.md Runs 5-11: C1 and C3,
fixed capacity 1.0 and dropless, every variant, 2 and 4 H200s) through the
cost model with a profile calibrated from those runs' own figures, and prints
predicted vs measured per variant and per stage (docs/CostModel.md,
"Replaying recorded runs"; issue 11, "Accuracy"). CPU only.

What it does:
  1. reads every moe-run JSON of bench/results/gpu_multi_run*.tgz;
  2. compiles the plans the runs ran (bench/make_multi_plans.sh's layers and
     options, into WORK/plans) with this tree's moe-opt and moe-translate and
     checks that every recorded pass has the plan's step ops, in order;
  3. builds one profile per W: the GEMM table of the H100 calibration (its
     shape dependence; the H200's level comes from the fit), the H200's copy
     bandwidth (Run 1), NCCL's own all_to_all figures of the same sessions
     (alpha, beta per W), a node shape of NVLink links for the 2DH plans;
     then fits with moe-replay (fitStepCosts) each step kind's alpha and
     rate to the serial runs' per-step times, all_gather / reduce_scatter to
     the data-parallel runs' step times, the compute slowdown beside an
     exchange to the overlapped against the serial runs' GEMM steps, and the
     exchange's slowdown beside compute to the overlapped passes (fixed
     capacity, flat, Runs 6-11);
  4. predicts every pass (overlapped or serial, as it ran) in-sample (fitted
     on both layers), leave-one-layer-out (fitted on C1's runs, predicting
     C3's, and the reverse) and with the all_to_all fitted to Flex's own
     exchange steps instead of NCCL's figures (in-sample and leave-one-layer-
     out); then the errors, per stage,
     and the model's pick per (runs, layer, W) against the fastest measured.

usage: bench/replay_multi.py [--build build] [--work DIR] [--json OUT]
                             [--recompute-capacity]
       bench/replay_multi.py --live OUT_DIR --profile PROFILE.json
         (issue 14: one bench/gpu_multi.sh call's runs, predicted with the
         profile its calibrate step wrote; nothing fitted)
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
# The stages of the model's ops, as the one-GPU report sums them.
from costmodel_report import COLLECTIVES, STAGES, quantile, stage_of  # noqa: E402
EXPERT_OPS = {"grouped_gemm", "grouped_gemm_wgrad", "activation",
              "activation_backward", "glu", "glu_backward"}
LAYERS = {"c1": "C1", "c3": "C3"}
# The C of each dropless run: the synced largest per-expert count of the
# runs' own inputs (moe-run's generator, seed 0; x per rank), recomputed on
# the CPU by --recompute-capacity (a layer of the same T, d, E, k with h 8,
# whose router and gate see the same x and wg, under mpirun).
DROPLESS_C = {("c1", 2): 4197, ("c1", 4): 4222, ("c3", 2): 1709,
              ("c3", 4): 1729}
# NCCL's own all_to_all_single (bench/nccl_a2a_bw.py: bytes per rank, its own
# block included; GB/s = 1e9 B/s). W = 2: Runs 5-6's sessions, as
# bench/RESULTS.md records them (their JSON was not kept; 64 and 256 MiB: the
# mean of the two sessions). W = 4: Run 8's nccl_a2a_bw.json, read below.
NCCL_W2 = [(16 << 20, 312e9), (64 << 20, 484.5e9), (256 << 20, 562e9),
           (512 << 20, 587e9)]
H100_PROFILE = os.path.join(RESULTS, "2026-12-06_h100_profile_v2.json")
H200_COPY_BYTES_PER_S = 4.296e12  # Run 1, copy_d2d (2026-11-28_h200_torch.json)
ALIGNED_FROM_RUN = 11  # moe-run's ranks meet before each call (Run 11)
CLEAN = 1.05  # a pass whose mean is over 1.05 x its median holds a slow call
REFINE_BAND = 0.25  # Executor::kRefineBand
LIVE_RUN = 100  # --live: the run's number in the tables (ranks aligned)


def fit_line(xy, fallback_alpha=0.0):
    """y = alpha + x / beta by least squares weighted by 1 / y^2, alpha >= 0;
    one size only: alpha = fallback_alpha and beta through the mean."""
    w = [1 / (y * y) for _, y in xy]
    sw = sum(w)
    sx = sum(wi * x for wi, (x, _) in zip(w, xy))
    sy = sum(wi * y for wi, (_, y) in zip(w, xy))
    sxx = sum(wi * x * x for wi, (x, _) in zip(w, xy))
    sxy = sum(wi * x * y for wi, (x, y) in zip(w, xy))
    det = sw * sxx - sx * sx
    if len({round(x) for x, _ in xy}) > 1 and det > 0:
        slope = (sw * sxy - sx * sy) / det
        alpha = (sy - slope * sx) / sw
        if alpha < 0:
            alpha, slope = 0.0, sxy / sxx
        if slope > 0:
            return alpha, 1 / slope
    slope = (sy - fallback_alpha * sw) / sx
    return fallback_alpha, 1 / slope


def fit_link(points):
    """t = alpha + n lambda + n m / beta (points (n, m, t)), least squares on
    relative error: the node shape's link (docs/CostModel.md)."""
    rows = [[1 / t, n / t, n * m / t] for n, m, t in points]
    a = [[sum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    b = [sum(r[i] for r in rows) for i in range(3)]
    for i in range(3):  # Gauss-Jordan on the 3 x 3 normal equations
        p = a[i][i]
        a[i] = [v / p for v in a[i]]
        b[i] /= p
        for j in range(3):
            if j != i:
                f = a[j][i]
                a[j] = [vj - f * vi for vj, vi in zip(a[j], a[i])]
                b[j] -= f * b[i]
    return {"alpha_s": b[0], "per_peer_s": b[1], "beta_bytes_per_s": 1 / b[2]}


# ----------------------------------------------------------------- records --


def load_records(work, live=None):
    """The recorded runs (bench/results/gpu_multi_run*.tgz), or, with `live`
    (a bench/gpu_multi.sh output folder), that run's alone (as run LIVE_RUN)."""
    records = []
    sources = []
    if live:
        sources.append((LIVE_RUN, live))
    else:
        for tgz in sorted(glob.glob(os.path.join(RESULTS, "gpu_multi_run*.tgz"))):
            run = int(re.search(r"run(\d+)", tgz).group(1))
            dest = os.path.join(work, f"run{run}")
            with tarfile.open(tgz) as tar:
                tar.extractall(dest)
            sources.append((run, dest))
    for run, dest in sources:
        for path in sorted(glob.glob(os.path.join(dest, "multi", "flex_*.json"))):
            name = os.path.basename(path)[5:-5]
            config, variant, tag = name.rsplit("_", 2)
            doc = json.load(open(path))
            rec = {"run": run, "W": doc["ranks"], "config": config,
                   "layer": config[:2], "variant": variant, "tag": tag,
                   "two_dh": config.endswith("_2dh"),
                   "dropless": "dropless" in config,
                   "plan": os.path.basename(doc["plan"])}
            for p in ("forward", "backward"):
                d = doc[p]
                rec[p] = {"median": d["median_us"], "mean": d["mean_us"],
                          "steps": [s["mean_us"] for s in d["steps"]],
                          "ops": [s["op"] for s in d["steps"]]}
            rec["label"] = variant + ("+2dh" if rec["two_dh"] else "")
            rec["capacity"] = (DROPLESS_C[(rec["layer"], rec["W"])]
                               if rec["dropless"] else -1)
            records.append(rec)
    return records


def compile_plans(build, out):
    """bench/make_multi_plans.sh's plans, into `out`."""
    os.makedirs(out, exist_ok=True)
    opt, translate = (os.path.join(build, "bin", t)
                      for t in ("moe-opt", "moe-translate"))
    jobs = []
    for w in (2, 4):
        for name in ("c1_cap1", "c1_dropless", "c3_cap1", "c3_dropless"):
            jobs.append((name, f"mr{w}_{name}.train.json",
                         [f"--moe-multiversion=ranks={w} variants=r1d1,r1d2,r1d4,r0d1"]))
        if w > 2:
            for name in ("c1_cap1", "c3_cap1"):
                jobs.append((name, f"mr{w}_{name}_2dh.train.json",
                             [f"--moe-multiversion=ranks={w} variants=r1d1,r1d2",
                              "--moe-a2a-2dh=ranks-per-node=2"]))
    for layer, plan, passes in jobs:
        mlir = subprocess.run(
            [opt, os.path.join(ROOT, "bench", "layers", layer + ".mlir"), *passes,
             "--moe-lower-to-plan=training=true"],
            check=True, capture_output=True).stdout
        text = subprocess.run([translate, "--moert-to-plan"], input=mlir,
                              check=True, capture_output=True).stdout
        open(os.path.join(out, plan), "wb").write(text)


def check_ops(records, plans):
    """Every recorded pass must be its variant's steps, op for op."""
    cache = {}
    for rec in records:
        if rec["plan"] not in cache:
            doc = json.load(open(os.path.join(plans, rec["plan"])))
            cache[rec["plan"]] = {v["name"]: v for v in doc["variants"]}
        v = cache[rec["plan"]][rec["variant"]]
        for p in ("forward", "backward"):
            ops = [s["op"] for s in v[p]]
            if ops != rec[p]["ops"]:
                sys.exit(f"replay_multi: run {rec['run']} {rec['config']} "
                         f"{rec['variant']} {p}: recorded steps {rec[p]['ops']} "
                         f"differ from the plan's {ops}")
    return len(records)


def recompute_capacity(build, work):
    """The dropless runs' C, from moe-run's own inputs on CPU ranks."""
    dims = {"c1": (4096, 8, 2), "c3": (2048, 64, 6)}
    out = {}
    for layer, (d, e, k) in dims.items():
        mlir = os.path.join(work, f"{layer}_route.mlir")
        t = f"tensor<16384x{d}xbf16>"
        ws = (f"tensor<{d}x{e}xf32>", f"tensor<{e}x{d}x8xbf16>",
              f"tensor<{e}x8x{d}xbf16>")
        open(mlir, "w").write(
            f"func.func @r(%x: {t}, %wg: {ws[0]}, %w1: {ws[1]}, %w2: {ws[2]})\n"
            f"    -> ({t}, tensor<f32>) {{\n"
            f"  %o, %a = moe.layer ffn<relu> %x, %wg, %w1, %w2 {{top_k = {k}, "
            f"capacity = #moe.capacity<dropless>, normalize}}\n"
            f"      : ({t}, {ws[0]}, {ws[1]}, {ws[2]}) -> ({t}, tensor<f32>)\n"
            f"  return %o, %a : {t}, tensor<f32>\n}}\n")
        for w in (2, 4):
            plan = os.path.join(work, f"{layer}_route_w{w}.json")
            mlir_out = subprocess.run(
                [os.path.join(build, "bin", "moe-opt"), mlir,
                 f"--moe-multiversion=ranks={w} variants=r1d1,r0d1",
                 "--moe-lower-to-plan"], check=True, capture_output=True).stdout
            open(plan, "wb").write(subprocess.run(
                [os.path.join(build, "bin", "moe-translate"), "--moert-to-plan"],
                input=mlir_out, check=True, capture_output=True).stdout)
            doc = json.loads(subprocess.run(
                ["mpirun", "--oversubscribe", "--allow-run-as-root", "-np", str(w),
                 os.path.join(build, "bin", "moe-run"), plan, "--iters", "2",
                 "--explain", "--json"], check=True, capture_output=True).stdout)
            out[(layer, w)] = doc["explain"]["capacity"]
    return out


# ----------------------------------------------------------------- profile --


def nccl_points(work):
    """(W, bytes per rank, seconds) of NCCL's own all_to_all, 16-512 MiB."""
    pts = [(2, b, b / bw) for b, bw in NCCL_W2]
    doc = json.load(open(os.path.join(work, "run8", "multi", "nccl_a2a_bw.json")))
    pts += [(4, r["bytes"], r["ms"] * 1e-3) for r in doc["results"]
            if r["bytes"] >= 16 << 20]
    return pts


def base_profile(w, nccl, link):
    h100 = json.load(open(H100_PROFILE))
    # The model's all_to_all bytes leave the rank: S (W - 1) / W.
    alpha, beta = fit_line([(b * (w - 1) / w, t) for ww, b, t in nccl if ww == w])
    return {
        "format": "flex-device-profile", "version": 2, "source": "calibrated",
        "created": "2026-12-06T00:00:00Z",
        "notes": "bench/replay_multi.py: H100 GEMM table (shape dependence), "
                 "H200 copy bandwidth (Run 1), NCCL's own all_to_all (Runs 5-8)",
        "device": {"name": "NVIDIA H200", "backend": "cuda", "driver": "",
                   "cuda": "13.0", "nccl": "2.28.3"},
        "world": {"size": w, "ranks_per_node": w},
        "gemm": h100["gemm"],
        "memory": {"bandwidth_bytes_per_s": H200_COPY_BYTES_PER_S,
                   "launch_s": h100["memory"]["launch_s"]},
        "collectives": [{"kind": "all_to_all", "world_size": w, "group_size": w,
                         "transport": "nccl", "alpha_s": alpha,
                         "beta_bytes_per_s": beta}],
        "overlap": {"compute_slowdown": 1.0},
        # 2DH on one host (simulated nodes of 2): both phases cross NVLink.
        "topology": {"gpus_per_node": 2, "intra": link, "inter": link,
                     "source": "NVLink fitted to NCCL's own all_to_all, 2 and 4 H200s"},
    }


class Replay:
    """moe-replay calls in one work folder."""

    def __init__(self, build, work):
        self.tool = os.path.join(build, "bin", "moe-replay")
        self.work = work
        self.count = 0

    def __call__(self, profile, fit, predict):
        self.count += 1
        prof = os.path.join(self.work, f"profile{self.count}.json")
        json.dump(profile, open(prof, "w"), indent=1)
        manifest = os.path.join(self.work, f"manifest{self.count}.json")
        json.dump({"profile": prof, "fit": fit, "predict": predict},
                  open(manifest, "w"))
        out = subprocess.run([self.tool, manifest], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        return json.loads(out.stdout)


def clean(rec, p):
    return rec[p]["mean"] <= CLEAN * rec[p]["median"]


def pass_entry(rec, p, plans, overlap=None):
    e = {"plan": os.path.join(plans, rec["plan"]), "variant": rec["variant"],
         "backward": p == "backward", "capacity": rec["capacity"]}
    if overlap is not None:
        e["overlap"] = overlap
    return e


def first_collective_skewed(rec, p, i):
    """Before Run 11 the first collective of a pass waited for the ranks'
    host skew (bench/RESULTS.md, Run 11)."""
    ops = rec[p]["ops"]
    first = next(j for j, op in enumerate(ops) if op in COLLECTIVES)
    return rec["run"] < ALIGNED_FROM_RUN and i == first


def calibrate(replay, base, records, plans):
    """The profile of one W fitted to `records`: step figures to their
    serial passes, all_gather / reduce_scatter to their data-parallel
    gathers; and the all_to_all point fitted to Flex's serial exchange
    steps, for the variant of the profile that takes it."""
    serial = [r for r in records if r["tag"] == "serial" and not r["two_dh"]]
    fit = []
    for r in serial:
        for p in ("forward", "backward"):
            if clean(r, p):
                fit.append(dict(pass_entry(r, p, plans), steps_us=r[p]["steps"]))
    # Collectives on the compute stream (r0d1's gathers, any tag) and the
    # serial exchanges: their times at the model's bytes.
    coll = [r for r in records if (r["variant"] == "r0d1" and r["tag"] in
                                   ("overlap", "serial")) or r in serial]
    coll_passes = [(r, p) for r in coll for p in ("forward", "backward")
                   if clean(r, p)]
    first = replay(base, fit, [pass_entry(r, p, plans, False)
                               for r, p in coll_passes])
    prof = first["profile"]
    samples = {"all_gather": [], "reduce_scatter": [], "all_to_all": []}
    for (r, p), pred in zip(coll_passes, first["predictions"]):
        for i, (op, us) in enumerate(zip(r[p]["ops"], r[p]["steps"])):
            if op not in samples or first_collective_skewed(r, p, i):
                continue
            if op == "all_to_all" and (r["run"] == 5 or r["tag"] != "serial"):
                continue  # Run 5 exchanged by an older path (Run 6 replaced it)
            samples[op].append((pred["steps"][i]["bytes_exchanged"], us * 1e-6))
    a2a = prof["collectives"][0]
    for kind in ("all_gather", "reduce_scatter"):
        if samples[kind]:
            alpha, beta = fit_line(samples[kind], a2a["alpha_s"])
            prof["collectives"].append(dict(a2a, kind=kind, alpha_s=alpha,
                                            beta_bytes_per_s=beta))
    runs = json.loads(json.dumps(prof))
    if samples["all_to_all"]:
        point = runs["collectives"][0]
        point["alpha_s"], point["beta_bytes_per_s"] = fit_line(samples["all_to_all"])
    return prof, runs


def slowdown(replay, per_w, plans):
    """The compute slowdown beside an exchange from the overlapped against
    the serial runs: s - 1 = sum(overlapped - serial) / sum(f x serial) over
    the expert steps that follow an expert step (they wait for no exchange)
    and that the model runs partly beside an exchange, f that part, on the
    timeline of Flex's own exchange times (the profile's all_to_all fitted
    to its serial exchange steps), s = 1. per_w: [(that profile, records)]."""
    extra = base = 0.0
    steps = 0
    for prof, records in per_w:
        pairs = []
        for r in records:
            if r["tag"] != "overlap" or r["variant"] == "r0d1":
                continue
            s = [q for q in records if q["tag"] == "serial" and q["run"] == r["run"]
                 and q["config"] == r["config"] and q["variant"] == r["variant"]]
            for p in ("forward", "backward"):
                if s and clean(r, p) and clean(s[0], p):
                    pairs.append((r, s[0], p))
        if not pairs:
            continue
        preds = replay(prof, [], [pass_entry(r, p, plans, True)
                                  for r, _, p in pairs])["predictions"]
        for (r, s, p), pred in zip(pairs, preds):
            busy = [(x["start_us"], x["start_us"] + x["us"]) for x in pred["steps"]
                    if x["stream"] == "exchange"]
            ops = r[p]["ops"]
            for i in range(1, len(ops)):
                if ops[i] not in EXPERT_OPS or ops[i - 1] not in EXPERT_OPS:
                    continue
                st = pred["steps"][i]
                a, b = st["start_us"], st["start_us"] + st["us"]
                inside = sum(max(0.0, min(b, y) - max(a, x)) for x, y in busy)
                f = min(1.0, inside / (b - a)) if b > a else 0.0
                if f > 0:
                    extra += r[p]["steps"][i] - s[p]["steps"][i]
                    base += f * s[p]["steps"][i]
                    steps += 1
    return (max(1.0, 1 + extra / base) if base > 0 else 1.0), steps


# Candidates for the exchange's slowdown beside compute.
EXCHANGE_SLOWDOWNS = [1 + 0.25 * i for i in range(17)]  # 1.0 ... 5.0


def exchange_slowdown(replay, per_w, plans):
    """The exchange's slowdown beside compute (the profile's
    overlap.exchange_slowdown): the candidate whose predictions of the
    overlapped passes (forward + backward) have the smallest mean |log(
    measured / predicted)|. One figure, like the compute slowdown, fitted on
    the same records, on the runs whose serial passes the rest of the model
    prices: fixed capacity (the dropless dispatch and combine are off for
    reasons of their own), flat exchanges on the exchange stream, and not
    Run 5's older exchange path. per_w: [(profile, records)]; returns
    (figure, runs)."""
    entries = []
    for prof, records in per_w:
        over = [r for r in records if r["tag"] == "overlap" and r["variant"] != "r0d1"
                and not r["dropless"] and not r["two_dh"] and r["run"] != 5]
        entries.append((prof, over, [pass_entry(r, p, plans, True) for r in over
                                     for p in ("forward", "backward")]))
    best = None
    for figure in EXCHANGE_SLOWDOWNS:
        loss, n = 0.0, 0
        for prof, over, passes in entries:
            if not over:
                continue
            trial = json.loads(json.dumps(prof))
            trial["overlap"]["exchange_slowdown"] = figure
            preds = replay(trial, [], passes)["predictions"]
            for i, r in enumerate(over):
                pred = preds[2 * i]["total_us"] + preds[2 * i + 1]["total_us"]
                meas = r["forward"]["median"] + r["backward"]["median"]
                loss += abs(math.log(meas / pred))
                n += 1
        if n and (best is None or loss < best[1] - 1e-12):
            best = (figure, loss, n)
    return (best[0], best[2]) if best else (1.0, 0)


# ------------------------------------------------------------- predictions --


def measured_stages(rec, p):
    """The step means summed per stage, scaled to add up to the pass median
    (the means include the first call and are maxima over ranks)."""
    total = sum(rec[p]["steps"])
    scale = rec[p]["median"] / total if total > 0 else 1.0
    out = dict.fromkeys(STAGES, 0.0)
    for op, us in zip(rec[p]["ops"], rec[p]["steps"]):
        out[stage_of(op)] += us * scale
    return out


def predicted_stages(pred, overlap):
    """Serial: the stage sums. Overlapped: the compute stream's time per
    stage, as moe-run times it (a step's wait is in the step; an exchange on
    the exchange stream takes none of it), the exchange's tail last."""
    if not overlap:
        return dict(pred["stages_us"])
    out = dict.fromkeys(STAGES, 0.0)
    end = 0.0
    for st in pred["steps"]:
        if st["stream"] == "compute":
            out[st["stage"]] += st["start_us"] + st["us"] - end
            end = st["start_us"] + st["us"]
    out["collectives"] += max(0.0, pred["total_us"] - end)
    return out


def predict(replay, profiles, records, plans, pick_profile):
    """Every pass of `records` with pick_profile(record) -> W's profile."""
    out = {}
    for w in sorted({r["W"] for r in records}):
        for key in sorted({k for r in records if r["W"] == w
                           for k in [pick_profile(r)]}):
            recs = [r for r in records if r["W"] == w and pick_profile(r) == key]
            entries = [pass_entry(r, p, plans, r["tag"] == "overlap")
                       for r in recs for p in ("forward", "backward")]
            preds = replay(profiles[(w, key)], [], entries)["predictions"]
            for i, r in enumerate(recs):
                out[(id(r), "forward")] = preds[2 * i]
                out[(id(r), "backward")] = preds[2 * i + 1]
    return out


def err(pred, meas):
    return (meas - pred) / pred


def summary(pairs):
    e = [abs(err(p, m)) for p, m in pairs]
    if not e:
        return None
    return {"n": len(e), "median": statistics.median(e), "p90": quantile(e, 0.9),
            "within10": sum(x <= 0.10 for x in e),
            "mean_signed": statistics.mean(err(p, m) for p, m in pairs)}


def whole(rec, preds):
    pf, pb = (preds[(id(rec), p)]["total_us"] for p in ("forward", "backward"))
    return pf, rec["forward"]["median"], pf + pb, \
        rec["forward"]["median"] + rec["backward"]["median"]


def session(rec):
    return "8-9" if rec["run"] in (8, 9) else str(rec["run"])


def picks(records, preds, total=True):
    """Per (runs, layer, capacity, W) with two or more variants overlapped:
    the model's pick against the fastest measured."""
    groups = {}
    for r in records:
        if r["tag"] == "overlap":
            key = (r["W"], r["layer"], r["dropless"], session(r))
            groups.setdefault(key, []).append(r)
    out = []
    for key, recs in sorted(groups.items()):
        if len(recs) < 2:
            continue
        i = 2 if total else 0
        pred = {r["label"]: whole(r, preds)[i] for r in recs}
        meas = {r["label"]: whole(r, preds)[i + 1] for r in recs}
        pick = min(pred, key=pred.get)
        best = min(meas, key=meas.get)
        # The runtime's refinement (Executor::refineChoice): every variant
        # predicted within REFINE_BAND of the pick is measured, the fastest
        # measured kept.
        band = [v for v in pred if pred[v] <= pred[pick] * (1 + REFINE_BAND)]
        refined = min(band, key=meas.get)
        out.append({"W": key[0], "layer": LAYERS[key[1]],
                    "capacity": "dropless" if key[2] else "1.0", "runs": key[3],
                    "variants": len(recs), "pick": pick, "fastest": best,
                    "pick_over_fastest": meas[pick] / meas[best] - 1,
                    "within3": meas[pick] <= 1.03 * meas[best],
                    "refined": refined, "measured_in_refinement": len(band),
                    "refined_over_fastest": meas[refined] / meas[best] - 1,
                    "refined_within3": meas[refined] <= 1.03 * meas[best]})
    return out


# ------------------------------------------------------------------ report --


def ms(us):
    return f"{us / 1000:6.2f}"


def pct(x):
    return f"{100 * x:+5.0f}%"


def profile_lines(name, prof):
    coll = {c["kind"]: c for c in prof["collectives"]}
    lines = [f"{name}: compute slowdown beside an exchange "
             f"{prof['overlap']['compute_slowdown']:.2f}, the exchange's beside "
             f"compute {prof['overlap'].get('exchange_slowdown', 1.0):.2f}; " + "; ".join(
                 f"{k} {c['alpha_s'] * 1e6:.1f} us + bytes / "
                 f"{c['beta_bytes_per_s'] / 1e9:.0f} GB/s"
                 for k, c in coll.items())]
    for s in prof.get("steps", []):
        rate = (f"gemm x {s['gemm_scale']:.2f}" if s["bytes_per_s"] == 0 and
                s["op"] not in ("uniform_segments",) else
                f"{s['bytes_per_s'] / 1e9:.0f} GB/s" if s["bytes_per_s"] else "-")
        lines.append(f"    {s['op']:20} alpha {s['alpha_s'] * 1e6:6.1f} us  "
                     f"{rate:>14}  ({s['samples']} steps)")
    return lines


def record_name(r):
    cap = "dropless" if r["dropless"] else "cap 1.0"
    return f"{r['run']:>3} {r['W']} {LAYERS[r['layer']]} {cap:8} {r['label']:9}"


def table(title, recs, preds, others):
    lines = [title, "run W layer capacity variant  | fwd pred  meas   err | "
             "f+b pred  meas   err | " + " | ".join(n for n, _ in others)]
    for r in recs:
        pf, mf, pt, mt = whole(r, preds)
        row = (f"{record_name(r)}| {ms(pf)} {ms(mf)} {pct(err(pf, mf))} | "
               f"{ms(pt)} {ms(mt)} {pct(err(pt, mt))} | ")
        row += " | ".join(pct(err(whole(r, o)[2], mt)).rjust(len(n))
                          for n, o in others)
        lines.append(row)
    return lines


def stage_table(recs, preds):
    lines = ["per stage, forward + backward, predicted / measured ms (overlapped: "
             "the compute stream's time per stage, a wait in the waiting step)",
             "run W layer capacity variant  mode    | " +
             " | ".join(f"{s:>11}" for s in STAGES)]
    for r in recs:
        ov = r["tag"] == "overlap"
        pred = dict.fromkeys(STAGES, 0.0)
        meas = dict.fromkeys(STAGES, 0.0)
        for p in ("forward", "backward"):
            for s, v in predicted_stages(preds[(id(r), p)], ov).items():
                pred[s] += v
            for s, v in measured_stages(r, p).items():
                meas[s] += v
        lines.append(f"{record_name(r)} {r['tag']:7} | " + " | ".join(
            f"{pred[s] / 1000:5.2f}/{meas[s] / 1000:5.2f}" for s in STAGES))
    return lines


def stage_summary(recs, preds):
    """Per stage and mode: the summed predicted and measured time, and the
    median |error| over passes where the stage took >= 0.1 ms."""
    lines = ["per stage (all passes, forward and backward apart): sum predicted / "
             "sum measured ms, median |error| where measured >= 0.1 ms"]
    for mode in ("overlap", "serial"):
        sel = [r for r in recs if r["tag"] == mode]
        cells = []
        for s in STAGES:
            sp = sm = 0.0
            errs = []
            for r in sel:
                for p in ("forward", "backward"):
                    a = predicted_stages(preds[(id(r), p)], mode == "overlap")[s]
                    b = measured_stages(r, p)[s]
                    sp, sm = sp + a, sm + b
                    if b >= 100 and a > 0:
                        errs.append(abs(err(a, b)))
            med = f"{100 * statistics.median(errs):.0f}%" if errs else "-"
            cells.append(f"{s} {sp / 1000:.1f}/{sm / 1000:.1f} ({med})")
        lines.append(f"  {mode:8} " + "; ".join(cells))
    return lines


def summary_lines(name, recs, preds):
    lines = []
    for label, sel, idx in (
            ("overlapped, fwd+bwd", [r for r in recs if r["tag"] == "overlap"], 2),
            ("overlapped, fwd    ", [r for r in recs if r["tag"] == "overlap"], 0),
            ("serial,     fwd+bwd", [r for r in recs if r["tag"] == "serial"], 2),
            ("all,        fwd+bwd", recs, 2),
            # What the model is built for: a fixed C, a flat exchange, the
            # exchange path of Runs 6-11.
            ("overlapped, fwd+bwd, fixed C, flat, Runs 6-11",
             [r for r in recs if r["tag"] == "overlap" and not r["dropless"]
              and not r["two_dh"] and r["run"] >= 6], 2)):
        s = summary([(whole(r, preds)[idx], whole(r, preds)[idx + 1]) for r in sel])
        lines.append(f"  {name:28} {label}: median |error| {100 * s['median']:5.1f}%, "
                     f"p90 {100 * s['p90']:5.1f}%, within 10% {s['within10']:2} of "
                     f"{s['n']:2}, mean signed {100 * s['mean_signed']:+5.1f}%")
    return lines


def pick_lines(name, rows):
    hit = sum(r["within3"] for r in rows)
    refined = sum(r["refined_within3"] for r in rows)
    lines = [f"{name}: the pick within 3% of the fastest measured in {hit} of {len(rows)}; "
             f"the automatic choice (the pick refined by measuring the variants predicted "
             f"within {100 * REFINE_BAND:.0f}% of it) in {refined} of {len(rows)}"]
    for r in rows:
        lines.append(f"  W={r['W']} {r['layer']} cap {r['capacity']:8} runs {r['runs']:4} "
                     f"({r['variants']} variants): pick {r['pick']:9} fastest "
                     f"{r['fastest']:9} {'+' if r['pick_over_fastest'] > 0 else ' '}"
                     f"{100 * r['pick_over_fastest']:.1f}% {'ok' if r['within3'] else 'MISS'}"
                     f"; refined {r['refined']:9} ({r['measured_in_refinement']} measured) "
                     f"{100 * r['refined_over_fastest']:+.1f}% "
                     f"{'ok' if r['refined_within3'] else 'MISS'}")
    return lines


def live_report(args, work, records, plans, checked):
    """Issue 14's live accuracy: the runs of one gpu_multi.sh call predicted
    with the profile calibrated in that call, nothing fitted to the runs."""
    profile = json.load(open(args.profile))
    w = profile["world"]["size"]
    recs = [r for r in records if r["tag"] in ("overlap", "serial")
            and r["W"] == w]
    if not recs:
        sys.exit(f"replay_multi: no overlap or serial run on {w} ranks in "
                 f"{args.live}")
    recs.sort(key=lambda r: (r["tag"] != "overlap", r["layer"], r["dropless"],
                             r["two_dh"], r["variant"]))
    replay = Replay(args.build, work)
    preds = predict(replay, {(w, "live"): profile}, recs, plans,
                    lambda r: "live")
    out = [f"bench/replay_multi.py --live: {len(recs)} runs on {w} ranks from "
           f"{args.live} ({checked} checked against this tree's plans), "
           f"predicted with {args.profile} (calibrated there; nothing fitted)"]
    out += profile_lines("profile", profile)[:1] + [""]
    out += table("overlapped, ms; err = (measured - predicted) / predicted",
                 [r for r in recs if r["tag"] == "overlap"], preds, []) + [""]
    out += table("serial (FLEX_CUDA_OVERLAP=0)",
                 [r for r in recs if r["tag"] == "serial"], preds, []) + [""]
    out += stage_table(recs, preds) + [""] + summary_lines("live", recs, preds)
    for total in (True, False):
        out += pick_lines(f"picks, live, {'fwd+bwd' if total else 'fwd'}",
                          picks(recs, preds, total))
    print("\n".join(out))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build", default=os.path.join(ROOT, "build"))
    ap.add_argument("--work", help="work folder (default: a temporary one)")
    ap.add_argument("--json", help="write every figure as JSON here")
    ap.add_argument("--recompute-capacity", action="store_true",
                    help="recompute the dropless runs' C on CPU ranks (mpirun)")
    ap.add_argument("--live", metavar="DIR",
                    help="a bench/gpu_multi.sh output folder: predict its runs "
                    "with --profile as calibrated there, nothing fitted")
    ap.add_argument("--profile", metavar="FILE",
                    help="with --live: the profile moe-run --calibrate wrote "
                    "on those GPUs")
    args = ap.parse_args()
    if bool(args.live) != bool(args.profile):
        ap.error("--live and --profile go together")
    work = args.work or tempfile.mkdtemp(prefix="replay_multi.")
    os.makedirs(work, exist_ok=True)
    if args.recompute_capacity:
        found = recompute_capacity(args.build, work)
        print("dropless C recomputed:", {f"{k[0]} W={k[1]}": v for k, v in found.items()},
              "(committed:", {f"{k[0]} W={k[1]}": v for k, v in DROPLESS_C.items()}, ")")
        DROPLESS_C.update(found)
    records = load_records(work, args.live)
    plans = os.path.join(work, "plans")
    compile_plans(args.build, plans)
    checked = check_ops(records, plans)
    if args.live:
        return live_report(args, work, records, plans, checked)
    recs = [r for r in records if r["tag"] in ("overlap", "serial")]
    recs.sort(key=lambda r: (r["tag"] != "overlap", r["W"], r["layer"], r["dropless"],
                             r["run"], r["two_dh"], r["variant"]))
    ab = sorted({f"run {r['run']} {r['config']} {r['variant']} {r['tag']}"
                 for r in records if r not in recs})
    nccl = nccl_points(work)
    link = fit_link([(w - 1, b / w, t) for w, b, t in nccl])
    replay = Replay(args.build, work)
    profiles, slow, xslow = {}, {}, {}
    for fitted_on in ("all", "c1", "c3"):
        fits = {}
        for w in (2, 4):
            mine = [r for r in recs if r["W"] == w and fitted_on in ("all", r["layer"])]
            fits[w] = calibrate(replay, base_profile(w, nccl, link), mine, plans) + (mine,)
        # One card: one slowdown for both W, from the layers fitted on.
        slow[fitted_on] = slowdown(replay, [(f[1], f[2]) for f in fits.values()], plans)
        for w, (nccl_prof, runs_prof, _) in fits.items():
            for prof in (nccl_prof, runs_prof):
                prof["overlap"]["compute_slowdown"] = slow[fitted_on][0]
        # The exchange's slowdown beside compute, per all_to_all figure
        # (NCCL's own, Flex's own exchange steps): fitted on the same runs.
        for col, label in ((0, "nccl"), (1, "runs")):
            figure = exchange_slowdown(replay, [(f[col], f[2]) for f in fits.values()],
                                       plans)
            xslow[(fitted_on, label)] = figure
            for f in fits.values():
                f[col]["overlap"]["exchange_slowdown"] = figure[0]
        for w, (nccl_prof, runs_prof, _) in fits.items():
            profiles[(w, fitted_on)] = nccl_prof
            profiles[(w, "runs" if fitted_on == "all" else "runs_" + fitted_on)] = runs_prof
    pa = predict(replay, profiles, recs, plans, lambda r: "all")
    pl = predict(replay, profiles, recs, plans,
                 lambda r: "c3" if r["layer"] == "c1" else "c1")
    pb = predict(replay, profiles, recs, plans, lambda r: "runs")
    plb = predict(replay, profiles, recs, plans,
                  lambda r: "runs_c3" if r["layer"] == "c1" else "runs_c1")
    others = [("LOLO err", pl), ("a2a-runs err", pb), ("a2a-runs LOLO", plb)]

    out = [f"bench/replay_multi.py: {len(recs)} recorded runs replayed "
           f"({checked} runs' forward and backward step ops checked against this tree's "
           f"plans: all equal); "
           f"A/B runs not replayed: {len(ab)}",
           "dropless C: " + ", ".join(f"{LAYERS[k[0]]} W={k[1]} {v}"
                                      for k, v in sorted(DROPLESS_C.items())),
           f"NVLink (2DH's node shape) fitted to NCCL's own: alpha "
           f"{link['alpha_s'] * 1e6:.1f} us, {link['per_peer_s'] * 1e6:.2f} us per peer, "
           f"{link['beta_bytes_per_s'] / 1e9:.1f} GB/s",
           "compute slowdown beside an exchange (from the overlapped vs serial "
           "expert steps): " + ", ".join(f"fitted on {k} {v[0]:.2f} ({v[1]} steps)"
                                         for k, v in slow.items()),
           "exchange slowdown beside compute (the overlapped passes' mean |log "
           "error|, candidates 1.0 ... 5.0; fixed C, flat, Runs 6-11): " + ", ".join(
               f"fitted on {k[0]} with {'NCCL' if k[1] == 'nccl' else 'Flex'}'s "
               f"all_to_all {v[0]:.2f} ({v[1]} runs)" for k, v in xslow.items()), ""]
    for w in (2, 4):
        out += profile_lines(f"W={w} in-sample", profiles[(w, "all")])
        for key, name in (("c1", "fitted on C1"), ("c3", "fitted on C3"),
                          ("runs", "a2a from runs")):
            out += profile_lines(f"W={w} {name}", profiles[(w, key)])[:1]
        out.append("")
    out += table("overlapped (the default), ms; err = (measured - predicted) / "
                 "predicted, in-sample; LOLO = fitted on the other layer; a2a-runs "
                 "= all_to_all fitted to Flex's serial exchange steps",
                 [r for r in recs if r["tag"] == "overlap"], pa, others) + [""]
    out += table("serial (FLEX_CUDA_OVERLAP=0)", [r for r in recs if r["tag"] == "serial"],
                 pa, others) + [""]
    out += stage_table(recs, pa) + [""] + stage_summary(recs, pa) + [""]
    out.append("whole pass")
    for name, preds in (("in-sample", pa), ("leave-one-layer-out", pl),
                        ("in-sample, a2a from runs", pb),
                        ("leave-one-layer-out, a2a from runs", plb)):
        out += summary_lines(name, recs, preds)
    out.append("")
    result = {"records": len(recs), "profiles": {f"W{k[0]}_{k[1]}": v for k, v in
                                                  profiles.items()}}
    for name, preds in (("in-sample", pa), ("leave-one-layer-out", pl),
                        ("in-sample, a2a from runs", pb),
                        ("leave-one-layer-out, a2a from runs", plb)):
        for total in (True, False):
            rows = picks(recs, preds, total)
            out += pick_lines(f"picks, {name}, {'fwd+bwd' if total else 'fwd'}", rows)
            result[f"picks {name} {'fwd+bwd' if total else 'fwd'}"] = rows
    out += ["", "A/B runs (a knob the model has no figure for): " + "; ".join(ab)]
    print("\n".join(out))
    if args.json:
        result["rows"] = [dict({k: v for k, v in r.items() if k not in
                                ("forward", "backward")},
                               predicted={n: [pr[(id(r), p)]["total_us"] for p in
                                              ("forward", "backward")]
                                          for n, pr in (("in-sample", pa), ("lolo", pl),
                                                        ("a2a-runs", pb),
                                                        ("a2a-runs-lolo", plb))},
                               measured=[r[p]["median"] for p in ("forward", "backward")])
                          for r in recs]
        json.dump(result, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
