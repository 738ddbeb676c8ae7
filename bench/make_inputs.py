#!/usr/bin/env python3
"""Writes random inputs for `moe-run PLAN --inputs DIR` as .npy files.

Why: moe-run's own generator draws every value on one CPU thread (splitmix64 +
Box-Muller), about 40 s for C2's 1e9 values, for each of the benchmark's
runs. Drawing them once per config on the GPU and reading raw bf16 bits
('<u2') takes seconds.

Same distributions as moe-run (docs/Runtime.md): x, grad_out ~ N(0, 1);
wg, w1, w3 ~ N(0, 1/d); w2 ~ N(0, 1/h); b1, b2 ~ N(0, 0.1^2). grad_l_aux is
not written (moe-run then uses 1). The argument names, shapes and dtypes are
read from the plan, so one directory serves every plan of the same layer
(inference and training, any capacity mode).

usage: python3 bench/make_inputs.py PLAN.json DIR [--seed N]
"""

import argparse
import json
import math
import os
import sys

import numpy as np


def stddev(name, layer):
    if name in ("wg", "w1", "w3"):
        return 1.0 / math.sqrt(layer["model_dim"])
    if name == "w2":
        return 1.0 / math.sqrt(layer["hidden_dim"])
    if name in ("b1", "b2"):
        return 0.1
    return 1.0  # x, grad_out


def draw(shape, std, dtype, seed):
    """Normal values; bf16 comes back as raw bits (uint16), as moe-run reads '<u2'."""
    try:
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
        gen = torch.Generator(device=device).manual_seed(seed)
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        if dtype == "bf16":
            return t.bfloat16().view(torch.int16).cpu().numpy().view(np.uint16)
        if dtype == "f16":
            return t.half().cpu().numpy()
        return t.cpu().numpy()
    except ImportError:
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * std
        if dtype == "bf16":
            bits = values.view(np.uint32)
            # round to nearest even (no NaN here)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            return bits.astype(np.uint16)
        return values.astype(np.float16 if dtype == "f16" else np.float32)


def main():
    parser = argparse.ArgumentParser(description="random .npy inputs for moe-run --inputs")
    parser.add_argument("plan")
    parser.add_argument("dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        with open(args.plan) as f:
            plan = json.load(f)
        layer = plan["layer"]
        arguments = plan["arguments"]
    except (OSError, ValueError, KeyError) as error:
        sys.exit(f"make_inputs.py: cannot read the plan '{args.plan}': {error}")
    os.makedirs(args.dir, exist_ok=True)
    # grad_out too, so a training run needs nothing from moe-run's generator.
    wanted = [a for a in arguments if a["role"] == "input" or a["name"] == "grad_out"]
    if not any(a["name"] == "grad_out" for a in wanted):
        # An inference plan has no grad_out argument: add it for training plans
        # of the same layer that share this directory.
        x = next(a for a in arguments if a["name"] == "x")
        wanted.append({"name": "grad_out", "shape": x["shape"], "dtype": x["dtype"]})
    for i, arg in enumerate(wanted):
        if arg["dtype"] not in ("f32", "bf16", "f16"):
            sys.exit(f"make_inputs.py: argument '{arg['name']}' has dtype {arg['dtype']}")
        values = draw(tuple(arg["shape"]), stddev(arg["name"], layer), arg["dtype"],
                      args.seed * 1000 + i)
        np.save(os.path.join(args.dir, arg["name"] + ".npy"), values)
    print(f"wrote {', '.join(a['name'] for a in wanted)} to {args.dir}")


if __name__ == "__main__":
    main()
