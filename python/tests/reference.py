# ===- reference.py - A plain PyTorch fp64 MoE layer of the contract -----=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# This file is the tests' reference: the contract of DESIGN.md section 3
# ([gate-1..3], [loc-1], [cap-1], [dispatch-1], [expert-1], [combine-1],
# [loss-1]) written independently of flexmoe and of the Flex runtime, in
# float64 with torch.autograd for the gradients ([grad-1]). It loops where
# the contract reads as a loop (slot order), to stay obviously right.
#
# ===----------------------------------------------------------------------=== #

import math

import torch
import torch.nn.functional as F

_MASK = (1 << 64) - 1
NORMALIZE_EPS = 1.1920928955078125e-07  # float32 epsilon, as Tutel


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def noise_sample(seed, token, expert):
    """The standard normal sample of (seed, t, e) that Flex's gate adds,
    times gate_noise / E (docs: CpuKernels.h, gateNoiseSample)."""
    cell = (token * 0x9E3779B97F4A7C15 + expert) & _MASK
    h = _splitmix64((seed & _MASK) ^ _splitmix64(cell))
    u1 = ((_splitmix64(h) >> 11) + 0.5) * 2.0**-53
    u2 = ((_splitmix64((h + 1) & _MASK) >> 11) + 0.5) * 2.0**-53
    return math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def capacity(mode, factor, tokens, experts, k, max_count):
    """[cap-1]; Tutel's factor: > 0 fixed, 0 dropless, < 0 bounded."""
    spe = -(-tokens // experts)
    bound = k * int(abs(factor) * spe)
    if mode == "fixed":
        return bound
    if mode == "dropless":
        return max_count
    return min(max_count, bound)


def _activation(name, v):
    return {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[name](v)


def reference_moe(x, wg, w1, w2, w3=None, b1=None, b2=None, *, top_k,
                  capacity_mode="fixed", capacity_factor=1.0,
                  activation="relu", normalize=False,
                  batch_prioritized=False, gate_noise=0.0, seed=0):
    """(out [T, d], l_aux) in float64 of float64 leaf tensors; gated when
    w3 is given (SwiGLU), biases when b1/b2 are."""
    T, E = x.shape[0], wg.shape[1]
    logits = x @ wg  # [gate-1]
    if gate_noise:
        noise = torch.tensor(
            [[noise_sample(seed, t, e) for e in range(E)] for t in range(T)],
            dtype=torch.float64)
        logits = logits + gate_noise * noise / E
    scores = torch.softmax(logits, dim=1)
    k = min(top_k, E)  # [gate-2] ties to the lower index: a stable sort
    idx = torch.argsort(-scores.detach(), dim=1, stable=True)[:, :k]
    g = scores.gather(1, idx)
    if normalize and k > 1:  # [gate-3]
        g = g / g.sum(dim=1, keepdim=True).clamp(min=NORMALIZE_EPS)
    # [loc-1]: choice by choice; tokens in order or by descending top score
    order = list(range(T))
    if batch_prioritized:
        top = scores.detach().max(dim=1).values
        order = sorted(order, key=lambda t: -float(top[t]))
    counts = [0] * E
    loc = torch.zeros(T, k, dtype=torch.long)
    for j in range(k):
        for t in order:
            e = int(idx[t, j])
            loc[t, j] = counts[e]
            counts[e] += 1
    C = capacity(capacity_mode, capacity_factor, T, E, k, max(counts))
    out = torch.zeros_like(x)
    for j in range(k):  # [dispatch-1], [expert-1], [combine-1]
        e = idx[:, j]
        kept = (loc[:, j] < C).to(x.dtype)[:, None]
        hidden = torch.einsum("td,tdh->th", x, w1[e])
        if b1 is not None:
            hidden = hidden + b1[e]
        if w3 is not None:
            hidden = F.silu(hidden) * torch.einsum("td,tdh->th", x, w3[e])
        else:
            hidden = _activation(activation, hidden)
        y = torch.einsum("th,thd->td", hidden, w2[e])
        if b2 is not None:
            y = y + b2[e]
        out = out + kept * g[:, j:j + 1] * y
    # [loss-1]
    frac = torch.zeros(E, dtype=torch.float64)
    frac.index_add_(0, idx[:, 0], torch.ones(T, dtype=torch.float64))
    l_aux = E * (scores.mean(dim=0) * (frac / T)).sum()
    return out, l_aux


def rel_l2(a, b):
    a, b = a.detach().double(), b.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - b).norm() / b.norm().clamp(min=1e-30))
