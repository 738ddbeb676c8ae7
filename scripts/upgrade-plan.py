#!/usr/bin/env python3
# ===- upgrade-plan.py - Plan format 1 -> 2 ------------------------------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Rewrites plan files of format version 1 as version 2 (docs/PlanFormat.md,
# "Versions"): every attribute a step kind declares is written out, with the
# value a version 1 reader gave it when the file left it out (the layer's, for
# the gate's routing attributes; the format's default otherwise). Which
# attributes a kind takes is read from include/flex/Runtime/StepKinds.def, the
# one declaration of the steps. Facts are not written: the runtime derives the
# facts of a plan that records none (compile the layer again to record them).
#
#   scripts/upgrade-plan.py PLAN.json [...]      rewrite in place
#
# ===----------------------------------------------------------------------=== #

import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEF = os.path.join(ROOT, "include", "flex", "Runtime", "StepKinds.def")

# The version 1 defaults of attributes the layer does not give.
DEFAULTS = {
    "capacity_factor": 1.0, "capacity_alignment": 1, "trans_b": False,
    "epilogue": "none",
    "bias_scale": 1.0, "accumulate": False, "chunks": 1, "chunk": 0,
    "ranks_per_node": 0, "group_size": 0, "group_stride": 1, "shards": 1,
}
# The attributes a version 1 reader took from the layer when absent.
FROM_LAYER = {
    "top_k": "top_k", "capacity_mode": "capacity_mode",
    "capacity_factor": "capacity_factor", "normalize": "normalize_gate",
    "batch_prioritized": "batch_prioritized", "noise": "gate_noise",
    "seed": "seed", "activation": "activation",
}


def step_attributes():
    """{op spelling: [attribute spelling, ...]} from StepKinds.def."""
    text = open(DEF).read()
    names = dict(re.findall(r'FLEX_STEP_ATTR\((\w+), "(\w+)"', text))
    kinds = {}
    for match in re.finditer(r'^FLEX_STEP\(\w+, "(\w+)",(.*?)StepCost::',
                             text, re.S | re.M):
        attrs = re.findall(r"FLEX_ATTR\((\w+)\)", match.group(2))
        kinds[match.group(1)] = [names[a] for a in attrs]
    return kinds


def upgrade(doc, kinds=None):
    """Returns the version 2 form of the plan document `doc`."""
    kinds = kinds or step_attributes()
    if doc.get("version") == 2:
        return doc
    layer = doc.get("layer", {})
    for variant in doc.get("variants", []):
        for steps in (variant.get("forward", []), variant.get("backward", [])):
            for step in steps:
                attrs = step.setdefault("attrs", {})
                for name in kinds.get(step.get("op"), []):
                    if name in attrs:
                        continue
                    if name in FROM_LAYER and FROM_LAYER[name] in layer:
                        attrs[name] = layer[FROM_LAYER[name]]
                    elif name in DEFAULTS:
                        attrs[name] = DEFAULTS[name]
    doc["version"] = 2
    return doc


def main(paths):
    kinds = step_attributes()
    for path in paths:
        with open(path) as f:
            text = f.read()
        doc = json.loads(text)
        # Keep the file's indentation, so the change is the upgrade only.
        second = text.split("\n")[1] if "\n" in text else ""
        indent = len(second) - len(second.lstrip(" ")) or None
        with open(path, "w") as f:
            json.dump(upgrade(doc, kinds), f, indent=indent)
            if text.endswith("\n"):
                f.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
