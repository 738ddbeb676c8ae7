#!/usr/bin/env bash
# ===- run_example.sh - The python-train-lm ctest: the training example ---=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Runs a Python example (its path and arguments are this script's) with the
# Python run_tests.sh uses: FLEXMOE_PYTHON, else the venv scripts/setup.sh
# makes, else python3. Without torch it prints why and exits 77 (skipped).
#
# ===----------------------------------------------------------------------=== #
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh" "torch"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -W "ignore:Failed to initialize NumPy:UserWarning" "$@"
