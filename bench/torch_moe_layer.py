#!/usr/bin/env python3
"""The PyTorch peer of the Flex benchmark (/work/shared/PERF.md).

Times, on one GPU, with CUDA events (warm-up, then the median of --iters runs,
with min/max):

* the plain PyTorch grouped-GEMM MoE layer of PERF.md, forward and
  forward+backward, for C1, C2, C3 (bf16, 16384 tokens), capacity factor 1.0
  and dropless, with per-stage forward times (gate, dispatch, experts,
  combine); the same for the gated (SwiGLU) layers G1, G3 of issue 13;
* the decode-sized layers D1, D2 (issue 13: a few hundred tokens, dropless),
  forward only, with their floor: the bytes of the expert weights that the
  timed routing touches (experts given >= 1 row) over the copy ceiling;
* "expert GEMMs alone": fc1 and fc2 of every expert as two torch.bmm calls on
  the capacity-padded shapes with perfectly even routing (C = T*k/E), forward
  (and the four backward bmm for forward+backward); gated: w1, w3, w2 (three
  bmm forward, six backward);
* the two ceilings of the same run: a bf16 GEMM 8192^3 (TFLOP/s) and a large
  device-to-device copy (TB/s, bytes read + written).

Before timing it checks the layer (the exact code that is timed) against an
fp64 CPU reference written independently from the contract of
/work/shared/DESIGN.md, section 3 (outputs and every gradient, relative L2
<= 2e-2, on small shapes with fresh random inputs), and stops if it fails.

What the layer computes (the Flex benchmark layers in bench/layers compute the
same function):
  [gate]     logits = x.float() @ wg (router in fp32), softmax over E, top-k,
             gates normalized over the k choices (normalize_gate), GShard l_aux.
  [dispatch] stable argsort of the (choice-major) expert ids: rows grouped by
             expert, and within an expert in the [loc-1] order (all first
             choices, then all second choices, ...; tokens in order).
             capacity factor f > 0: C = k * int(f * ceil(T/E)) ([cap-1]); a slot
             whose rank within its expert is >= C is dropped: the kept rows are
             selected with a boolean mask, which costs ONE device->host sync
             per forward (torch._grouped_mm leaves rows past the last group
             offset unwritten, so the rows must be compacted to a known count;
             the sync is what a user writing plain PyTorch pays for that).
             Dropless (f = 0) keeps every slot and has no sync.
             Then the gather x[token of row].
  [experts]  torch._grouped_mm (fc1) -> relu -> torch._grouped_mm (fc2);
             gated: silu(_grouped_mm(w1)) * _grouped_mm(w3) -> _grouped_mm (w2).
  [combine]  scale each row by its gate (bf16), out.index_add_(0, token, rows).
  No biases, no gate noise, no batch-prioritized routing.

Usage: python3 -u bench/torch_moe_layer.py [--configs c1,c2,c3,g1,g3,d1,d2] [--iters 20]
                                            [--out torch.json] [--check-only]
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

try:
    import torch
except ImportError:
    sys.exit("torch_moe_layer.py: PyTorch is not installed (the GPU machine's python3 has it)")

# PERF.md's configurations: d (model), h (hidden per expert), E, k; issue 13's
# gated (SwiGLU: w1, w3, w2) and decode-sized ones (T tokens, dropless, forward
# only). The keys beyond d, h, E, k appear only where set, so C1-C3's output
# is as before.
CONFIGS = {
    "c1": dict(d=4096, h=4096, E=8, k=2),
    "c2": dict(d=4096, h=14336, E=8, k=2),
    "c3": dict(d=2048, h=1408, E=64, k=6),
    "g1": dict(d=4096, h=14336, E=8, k=2, gated=True),
    "g3": dict(d=2048, h=1408, E=64, k=6, gated=True),
    "d1": dict(d=2048, h=1408, E=64, k=6, T=256, decode=True),
    "d2": dict(d=4096, h=1536, E=64, k=8, T=128, gated=True, decode=True),
}
# Capacity modes: the factor of [cap-1]; 0 = dropless.
MODES = {"cap1": 1.0, "dropless": 0.0}
DECODE_MODES = ("dropless",)  # decode rows: inference serving runs dropless
TOKENS = 16384  # the default T
STAGES = ("gate", "dispatch", "experts", "combine")
TOLERANCE = 2e-2  # [num-1] for bf16


def capacity_of(T, E, k, factor):
    """[cap-1] for a fixed factor; None for dropless (f = 0)."""
    if factor == 0:
        return None
    return k * int(factor * math.ceil(T / E))


def layer_flops(T, d, h, k, gated=False):
    """PERF.md: forward FLOPs = T*d*h*4*k (two GEMMs; gated: three, 6*k);
    forward+backward = 3x."""
    return T * d * h * (6 if gated else 4) * k


def tokens_of(c):
    return c.get("T", TOKENS)


def expert_weight_bytes(c):
    """bf16 bytes of one expert's weights: w1, w2 (and w3 when gated)."""
    return (3 if c.get("gated") else 2) * c["d"] * c["h"] * 2


# ---------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------

def moe_layer(x, wg, w1, w2, k, capacity, normalize=True, marks=None, w3=None):
    """The plain PyTorch grouped-GEMM MoE layer. Returns (out, l_aux, kept).

    x [T, d] bf16, wg [d, E] f32, w1 [E, d, h], w2 [E, h, d] bf16;
    w3 [E, d, h] bf16 makes the experts gated (SwiGLU).
    capacity: int (drop slots past it) or None (dropless).
    marks: optional callable(stage_name) called after each stage (CUDA events).
    kept: number of kept slots (a tensor; read it only outside timing).
    """
    T = x.shape[0]
    E = wg.shape[1]
    mark = marks or (lambda name: None)

    # gate: router in fp32, softmax, top-k, normalized gates, GShard l_aux.
    logits = x.float() @ wg
    scores = torch.softmax(logits, dim=-1)
    top_scores, top_idx = torch.topk(scores, k, dim=-1)
    gates = top_scores
    if normalize and k > 1:
        gates = gates / gates.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    # frac_e = share of tokens whose first choice is e; scatter_add, not bincount
    # or one_hot, which read the max back to the host (a sync).
    first = torch.zeros(T, E, device=x.device, dtype=torch.float32)
    first.scatter_(1, top_idx[:, :1], 1.0)
    l_aux = E * (scores.mean(dim=0) * first.mean(dim=0)).sum()
    mark("gate")

    # dispatch: choice-major flattening (index j*T + t) so that a stable sort by
    # expert gives [loc-1]'s order within each expert.
    flat_expert = top_idx.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    counts = torch.zeros(E, device=x.device, dtype=torch.int64)
    counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert))
    if capacity is None:
        rows = order
        row_counts = counts
    else:
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(order.numel(), device=x.device) - starts[flat_expert[order]]
        rows = order[rank < capacity]  # the one host sync: compacts kept rows
        row_counts = counts.clamp(max=capacity)
    offs = torch.cumsum(row_counts, 0).to(torch.int32)
    token = rows % T
    x_rows = x[token]
    mark("dispatch")

    # experts
    if w3 is None:
        hidden = torch.relu(torch._grouped_mm(x_rows, w1, offs=offs))
    else:
        hidden = (torch.nn.functional.silu(torch._grouped_mm(x_rows, w1, offs=offs))
                  * torch._grouped_mm(x_rows, w3, offs=offs))
    y = torch._grouped_mm(hidden, w2, offs=offs)
    mark("experts")

    # combine
    g_rows = gates.t().reshape(-1)[rows].to(y.dtype)
    out = torch.zeros_like(x).index_add_(0, token, y * g_rows.unsqueeze(1))
    mark("combine")
    return out, l_aux, offs[-1]


# ---------------------------------------------------------------------------
# fp64 reference (independent: dense experts, explicit [loc-1] loop)
# ---------------------------------------------------------------------------

def reference_layer(x, wg, w1, w2, k, factor, normalize=True, w3=None):
    """fp64 CPU reference of the contract (DESIGN.md section 3). Inputs are
    float64 leaf tensors; w3 given: gated experts, silu(x w1) * (x w3) then w2.
    Returns (out, l_aux, indices, kept_mask)."""
    T, d = x.shape
    E = wg.shape[1]
    scores = torch.softmax(x @ wg, dim=-1)
    # [gate-2]: ties go to the lower expert index (stable sort of -score).
    idx = torch.argsort(-scores.detach(), dim=-1, stable=True)[:, :k]
    g = scores.gather(1, idx)
    if normalize and k > 1:
        g = g / g.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps)
    # [loc-1]: all first choices before second choices; tokens in order.
    loc = torch.zeros(T, k, dtype=torch.int64)
    count = [0] * E
    idx_list = idx.tolist()
    for j in range(k):
        for t in range(T):
            e = idx_list[t][j]
            loc[t, j] = count[e]
            count[e] += 1
    # [cap-1]
    C = max(count) if factor == 0 else k * int(factor * math.ceil(T / E))
    kept = loc < C
    # [expert-1] for every expert on every token, then [combine-1].
    if w3 is None:
        dense = torch.stack([torch.relu(x @ w1[e]) @ w2[e] for e in range(E)])  # [E, T, d]
    else:
        # silu(a) = a * sigmoid(a), written out rather than F.silu.
        dense = torch.stack([((x @ w1[e]) * torch.sigmoid(x @ w1[e]) * (x @ w3[e])) @ w2[e]
                             for e in range(E)])
    picked = dense[idx, torch.arange(T).unsqueeze(1)]  # [T, k, d]
    out = (picked * (g * kept).unsqueeze(-1)).sum(dim=1)
    # [loss-1]
    frac = torch.zeros(E, dtype=torch.float64).index_add_(
        0, idx[:, 0], torch.ones(T, dtype=torch.float64)) / T
    l_aux = E * (scores.mean(dim=0) * frac).sum()
    return out, l_aux, idx, kept


def relative_l2(got, want):
    got = got.detach().double().cpu()
    want = want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    denom = want.norm().item()
    return (got - want).norm().item() / (denom if denom > 0 else 1.0)


def check_layer(device, T, d, h, E, k, factor, seed, gated=False):
    """Runs the timed layer code on `device` (bf16) and the fp64 reference on
    the CPU, on fresh random inputs; returns a dict of relative L2 errors."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen).bfloat16()
    wg = torch.randn(d, E, generator=gen) / math.sqrt(d)
    w1 = (torch.randn(E, d, h, generator=gen) / math.sqrt(d)).bfloat16()
    w2 = (torch.randn(E, h, d, generator=gen) / math.sqrt(h)).bfloat16()
    grad_out = torch.randn(T, d, generator=gen).bfloat16()
    weights = [x, wg, w1, w2]
    if gated:
        weights.append((torch.randn(E, d, h, generator=gen) / math.sqrt(d)).bfloat16())

    def split(tensors):  # (x, wg, w1, w2) and w3 (or None)
        return tensors[:4], (tensors[4] if gated else None)

    # Device run, through autograd as the timed forward+backward.
    dev = [t.to(device).requires_grad_() for t in weights]
    dev4, dev_w3 = split(dev)
    out, l_aux, kept_rows = moe_layer(*dev4, k, capacity_of(T, E, k, factor), w3=dev_w3)
    grads = torch.autograd.grad((out, l_aux), dev,
                                (grad_out.to(device), torch.ones((), device=device)))

    # Reference on the same (rounded) values, in fp64.
    ref_in = [t.double().requires_grad_() for t in weights]
    ref4, ref_w3 = split(ref_in)
    ref_out, ref_aux, ref_idx, ref_kept = reference_layer(*ref4, k, factor, w3=ref_w3)
    ref_grads = torch.autograd.grad((ref_out, ref_aux), ref_in,
                                    (grad_out.double(), torch.ones((), dtype=torch.float64)))

    # The routing must agree, or the comparison is meaningless (an fp32 vs fp64
    # near-tie): report it instead of a misleading error.
    with torch.no_grad():
        dev_idx = torch.topk(torch.softmax(dev[0].float() @ dev[1], -1), k, dim=-1)[1].cpu()
    routing_same = bool((dev_idx == ref_idx).all())
    result = {
        "T": T, "d": d, "h": h, "E": E, "k": k, "capacity_factor": factor,
        "seed": seed, "device": str(device),
        "kept_slots": int(kept_rows), "ref_kept_slots": int(ref_kept.sum()),
        "dropped_slots": T * k - int(ref_kept.sum()),
        "routing_same": routing_same,
        "errors": {
            "out": relative_l2(out, ref_out),
            "l_aux": relative_l2(l_aux, ref_aux),
            "grad_x": relative_l2(grads[0], ref_grads[0]),
            "grad_wg": relative_l2(grads[1], ref_grads[1]),
            "grad_w1": relative_l2(grads[2], ref_grads[2]),
            "grad_w2": relative_l2(grads[3], ref_grads[3]),
        },
    }
    if gated:  # only where set: the ungated cases' records are as before
        result["gated"] = True
        result["errors"]["grad_w3"] = relative_l2(grads[4], ref_grads[4])
    result["pass"] = (routing_same and result["kept_slots"] == result["ref_kept_slots"]
                      and all(e <= TOLERANCE for e in result["errors"].values()))
    return result


CHECK_CASES = [
    # (T, d, h, E, k, factor): drops exercised by factor 1.0 / 0.5 on small T.
    (512, 64, 128, 8, 2, 1.0),
    (512, 64, 128, 8, 2, 0.0),
    (384, 64, 64, 16, 3, 0.5),
    (768, 128, 96, 64, 6, 1.0),
    (768, 128, 96, 64, 6, 0.0),
]
# The gated (SwiGLU) path, same tolerance: drops, a half capacity, dropless.
GATED_CHECK_CASES = [
    (512, 64, 128, 8, 2, 1.0),
    (384, 64, 64, 16, 3, 0.5),
    (768, 128, 96, 64, 6, 0.0),
]


def run_checks(device):
    results = []
    cases = [(c, False) for c in CHECK_CASES] + [(c, True) for c in GATED_CHECK_CASES]
    for i, (case, gated) in enumerate(cases):
        # Fresh inputs per process: the seed changes with the time.
        seed = (int(time.time() * 1000) + i) % (2**31)
        r = check_layer(device, *case, seed=seed, gated=gated)
        errs = " ".join(f"{n}={e:.1e}" for n, e in r["errors"].items())
        print(f"check {'gated ' if gated else ''}T={r['T']} d={r['d']} h={r['h']} E={r['E']} k={r['k']} "
              f"f={r['capacity_factor']}: dropped={r['dropped_slots']} {errs} "
              f"{'ok' if r['pass'] else 'FAIL'}", flush=True)
        results.append(r)
    return results


# ---------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------

def stats(values):
    return {
        "median_ms": statistics.median(values),
        "min_ms": min(values),
        "max_ms": max(values),
        "mean_ms": statistics.fmean(values),
        "n": len(values),
    }


def time_events(body, marks_names, iters, warmup):
    """Times body(mark) with CUDA events: mark(name) records an event after
    each named stage. Returns ({total: stats, name: stats...}). All events are
    read after one synchronize at the end, so timing adds no syncs."""
    for _ in range(warmup):
        body(lambda name: None)
    torch.cuda.synchronize()
    runs = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        events = []

        def mark(name):
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append((name, ev))

        start.record()
        body(mark)
        runs.append((start, events))
    torch.cuda.synchronize()
    per_name = {n: [] for n in marks_names}
    total = []
    for start, events in runs:
        names = [n for n, _ in events]
        if names != list(marks_names):
            raise RuntimeError(f"stage marks {names} != {list(marks_names)}")
        prev = start
        for name, ev in events:
            per_name[name].append(prev.elapsed_time(ev))
            prev = ev
        total.append(start.elapsed_time(events[-1][1]))
    result = {"total": stats(total)}
    for name in marks_names:
        result[name] = stats(per_name[name])
    return result


def random_layer_inputs(T, d, h, E, device, gated=False):
    """Uniform random inputs as moe-run draws them: x ~ N(0,1), wg, w1, w3 ~ N(0,1/d),
    w2 ~ N(0,1/h), grad_out ~ N(0,1); never zeros. w3 is None unless gated."""
    x = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    wg = torch.randn(d, E, device=device, dtype=torch.float32) / math.sqrt(d)
    w1 = (torch.randn(E, d, h, device=device) / math.sqrt(d)).bfloat16()
    w2 = (torch.randn(E, h, d, device=device) / math.sqrt(h)).bfloat16()
    grad_out = torch.randn(T, d, device=device, dtype=torch.bfloat16)
    w3 = (torch.randn(E, d, h, device=device) / math.sqrt(d)).bfloat16() if gated else None
    return x, wg, w1, w2, grad_out, w3


def touched_experts(x, wg, k):
    """Experts that the layer's routing gives >= 1 row (dropless: every slot is
    kept), from the same router ops as moe_layer; outside timing."""
    with torch.no_grad():
        top_idx = torch.topk(torch.softmax(x.float() @ wg, dim=-1), k, dim=-1)[1]
        return int(torch.unique(top_idx).numel())


def bench_layer(cfg, mode, iters, warmup, device):
    c = CONFIGS[cfg]
    T, d, h, E, k = tokens_of(c), c["d"], c["h"], c["E"], c["k"]
    gated, decode = bool(c.get("gated")), bool(c.get("decode"))
    factor = MODES[mode]
    capacity = capacity_of(T, E, k, factor)
    x, wg, w1, w2, grad_out, w3 = random_layer_inputs(T, d, h, E, device, gated)
    one = torch.ones((), device=device)

    # Kept slots of this routing (outside timing).
    with torch.no_grad():
        out, l_aux, kept = moe_layer(x, wg, w1, w2, k, capacity, w3=w3)
        kept = int(kept)
        if not torch.isfinite(out).all():
            raise RuntimeError(f"{cfg} {mode}: the layer output has NaN/Inf")

    def forward(mark):
        with torch.no_grad():
            moe_layer(x, wg, w1, w2, k, capacity, marks=mark, w3=w3)

    fwd = time_events(forward, STAGES, iters, warmup)
    flops = layer_flops(T, d, h, k, gated)
    result = {
        "capacity_factor": factor,
        "capacity": capacity,
        "kept_slots": kept,
        "dropped_fraction": 1.0 - kept / (T * k),
        "fwd": {**fwd["total"], "stages": {s: fwd[s] for s in STAGES},
                "tflops": flops / (fwd["total"]["median_ms"] * 1e-3) / 1e12},
    }
    if decode:
        # Forward only; the floor (main) needs the experts this routing touches.
        touched = touched_experts(x, wg, k)
        result["touched_experts"] = touched
        result["touched_weight_bytes"] = touched * expert_weight_bytes(c)
    else:
        weights = [x, wg, w1, w2] + ([w3] if gated else [])
        params = [t.requires_grad_() for t in weights]

        def forward_backward(mark):
            out, l_aux, _ = moe_layer(*params[:4], k, capacity, w3=params[4] if gated else None)
            mark("forward")
            torch.autograd.grad((out, l_aux), params, (grad_out, one))
            mark("backward")

        fwd_bwd = time_events(forward_backward, ("forward", "backward"), iters, warmup)
        for t in params:
            t.requires_grad_(False)
        result["fwd_bwd"] = {
            **fwd_bwd["total"],
            "parts": {"forward": fwd_bwd["forward"], "backward": fwd_bwd["backward"]},
            "tflops": 3 * flops / (fwd_bwd["total"]["median_ms"] * 1e-3) / 1e12}
        del params
    del x, wg, w1, w2, w3, grad_out
    torch.cuda.empty_cache()
    return result


def bench_expert_gemms(cfg, iters, warmup, device):
    """PERF.md's "expert GEMMs alone": two torch.bmm on the capacity-padded
    shapes with even routing, C = T*k/E; plus the four backward bmm. Gated:
    three bmm (w1, w3, w2) forward and six backward (the GEMMs only: silu and
    the product are not in it, as relu is not). Decode rows: forward only."""
    c = CONFIGS[cfg]
    T, d, h, E, k = tokens_of(c), c["d"], c["h"], c["E"], c["k"]
    gated, decode = bool(c.get("gated")), bool(c.get("decode"))
    C = T * k // E
    xe = torch.randn(E, C, d, device=device, dtype=torch.bfloat16)
    w1 = (torch.randn(E, d, h, device=device) / math.sqrt(d)).bfloat16()
    w2 = (torch.randn(E, h, d, device=device) / math.sqrt(h)).bfloat16()
    w3 = (torch.randn(E, d, h, device=device) / math.sqrt(d)).bfloat16() if gated else None
    gy = torch.randn(E, C, d, device=device, dtype=torch.bfloat16)

    def forward(mark):
        torch.bmm(torch.bmm(xe, w1), w2)
        if gated:
            torch.bmm(xe, w3)
        mark("fwd")

    def forward_backward(mark):
        hh = torch.bmm(xe, w1)
        torch.bmm(hh, w2)
        if gated:
            torch.bmm(xe, w3)
        gh = torch.bmm(gy, w2.transpose(1, 2))      # d hidden
        torch.bmm(hh.transpose(1, 2), gy)           # d w2
        torch.bmm(gh, w1.transpose(1, 2))           # d x
        torch.bmm(xe.transpose(1, 2), gh)           # d w1
        if gated:  # gh stands in for the gradients of both products
            torch.bmm(gh, w3.transpose(1, 2))       # d x, second term
            torch.bmm(xe.transpose(1, 2), gh)       # d w3
        mark("fwd_bwd")

    flops = layer_flops(T, d, h, k, gated)
    fwd = time_events(forward, ("fwd",), iters, warmup)["total"]
    fwd["tflops"] = flops / (fwd["median_ms"] * 1e-3) / 1e12
    result = {"capacity": C, "fwd": fwd}
    if not decode:
        fb = time_events(forward_backward, ("fwd_bwd",), iters, warmup)["total"]
        fb["tflops"] = 3 * flops / (fb["median_ms"] * 1e-3) / 1e12
        result["fwd_bwd"] = fb
    del xe, w1, w2, w3, gy
    torch.cuda.empty_cache()
    return result


def bench_ceilings(iters, warmup, device):
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    gemm = time_events(lambda mark: (a @ b, mark("gemm")), ("gemm",), iters, warmup)["total"]
    gemm["tflops"] = 2 * n**3 / (gemm["median_ms"] * 1e-3) / 1e12
    del a, b
    # 4 GiB copied: far past the 60 MB L2; bytes counted = read + written.
    nbytes = 4 << 30
    src = torch.empty(nbytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    copy = time_events(lambda mark: (dst.copy_(src), mark("copy")), ("copy",), iters, warmup)["total"]
    copy["bytes_moved"] = 2 * nbytes
    copy["tbps"] = 2 * nbytes / (copy["median_ms"] * 1e-3) / 1e12
    del src, dst
    torch.cuda.empty_cache()
    return {"gemm_bf16_8192": gemm, "copy_d2d": copy}


def bench_config(cfg, args, device, copy_tbps):
    """Expert GEMMs alone and the layer in each capacity mode (decode rows:
    dropless, forward only, with the floor); prints a line each."""
    c = CONFIGS[cfg]
    T, decode = tokens_of(c), bool(c.get("decode"))
    entry = {"T": T, **c,
             "flops_fwd": layer_flops(T, c["d"], c["h"], c["k"], bool(c.get("gated"))),
             "expert_gemms_alone": bench_expert_gemms(cfg, args.iters, args.warmup, device),
             "modes": {}}
    eg = entry["expert_gemms_alone"]
    print(f"{cfg} expert GEMMs alone: fwd {eg['fwd']['median_ms']:.3f} ms "
          f"({eg['fwd']['tflops']:.0f} TFLOP/s)"
          + (f", fwd+bwd {eg['fwd_bwd']['median_ms']:.3f} ms" if "fwd_bwd" in eg else ""),
          flush=True)
    for mode in args.modes.split(","):
        if mode not in MODES:
            sys.exit(f"torch_moe_layer.py: unknown mode '{mode}' (know {', '.join(MODES)})")
        if decode and mode not in DECODE_MODES:
            continue  # decode rows run dropless only
        r = bench_layer(cfg, mode, args.iters, args.warmup, device)
        entry["modes"][mode] = r
        st = r["fwd"]["stages"]
        stage_text = " ".join("%s %.3f" % (s, st[s]["median_ms"]) for s in STAGES)
        line = (f"{cfg} {mode}: fwd {r['fwd']['median_ms']:.3f} ms "
                f"[{r['fwd']['min_ms']:.3f}, {r['fwd']['max_ms']:.3f}] ({stage_text}), ")
        if decode:
            # Floor: the touched experts' weights read once at the copy ceiling
            # (bytes read + written per second; reading is half of a copy's).
            floor_ms = r["touched_weight_bytes"] / (copy_tbps * 1e12) * 1e3
            r["floor"] = {"ms": floor_ms, "copy_tbps": copy_tbps,
                          "what": "touched experts' weight bytes / copy ceiling"}
            line += (f"touched {r['touched_experts']}/{c['E']} experts, "
                     f"{r['touched_weight_bytes'] / 1e6:.0f} MB of weights, floor {floor_ms:.3f} ms, "
                     f"PyTorch/floor {r['fwd']['median_ms'] / floor_ms:.2f}x")
        else:
            line += (f"fwd+bwd {r['fwd_bwd']['median_ms']:.3f} ms "
                     f"[{r['fwd_bwd']['min_ms']:.3f}, {r['fwd_bwd']['max_ms']:.3f}], "
                     f"dropped {100 * r['dropped_fraction']:.2f}%")
        print(line, flush=True)
    return entry


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="c1,c2,c3")
    parser.add_argument("--modes", default="cap1,dropless")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default="torch_results.json")
    parser.add_argument("--check-only", action="store_true",
                        help="only the fp64 check (runs on the CPU too)")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    if args.iters < 20 and not args.check_only:
        print(f"note: --iters {args.iters} < 20: PERF.md asks for a median of >= 20", flush=True)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("torch_moe_layer.py: no CUDA device (use --device cpu --check-only here)")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch_moe_layer.py: torch {torch.__version__} has no torch._grouped_mm")

    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": os.environ.get("FLEX_COMMIT", ""),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "tokens": TOKENS, "iters": args.iters, "warmup": args.warmup,
        "layer": "router fp32 -> top-k -> normalized gates, GShard l_aux -> stable argsort "
                 "-> [cap-1] drop via mask (1 host sync) or dropless -> gather -> "
                 "_grouped_mm -> relu -> _grouped_mm -> scale by gate -> index_add_",
    }
    if any(CONFIGS.get(cfg, {}).get("gated") for cfg in args.configs.split(",")):
        result["layer_gated"] = ("the same, experts silu(_grouped_mm w1) * _grouped_mm w3 "
                                 "-> _grouped_mm w2")

    torch.backends.cuda.matmul.allow_tf32 = False  # the router stays true fp32
    # Correct first: the exact timed code vs the fp64 reference.
    result["check"] = run_checks(device)
    if not all(r["pass"] for r in result["check"]):
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        sys.exit("torch_moe_layer.py: the layer disagrees with the fp64 reference; not timing")
    if args.check_only:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print("check passed")
        return

    result["ceilings"] = bench_ceilings(args.iters, args.warmup, device)
    ce = result["ceilings"]
    print(f"ceilings: gemm bf16 8192^3 {ce['gemm_bf16_8192']['tflops']:.0f} TFLOP/s, "
          f"copy {ce['copy_d2d']['tbps']:.2f} TB/s", flush=True)
    result["configs"] = {}
    for cfg in args.configs.split(","):
        if cfg not in CONFIGS:
            sys.exit(f"torch_moe_layer.py: unknown config '{cfg}' (know {', '.join(CONFIGS)})")
        result["configs"][cfg] = bench_config(cfg, args, device, ce["copy_d2d"]["tbps"])
        with open(args.out, "w") as f:  # keep what we have if a later config fails
            json.dump(result, f, indent=2)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
