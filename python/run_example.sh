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
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${FLEX_BUILD_DIR:-$here/../build}"
python="${FLEXMOE_PYTHON:-}"
if [ -z "$python" ]; then
  python="$build/python-deps/venv/bin/python"
  [ -x "$python" ] || python="$(command -v python3 || true)"
fi
if [ -z "$python" ] || ! "$python" -c "import torch" 2>/dev/null; then
  echo "SKIPPED: the example needs torch (tried '${python:-no python3}');"
  echo "scripts/setup.sh installs it into $build/python-deps/venv"
  exit 77
fi
export FLEX_BUILD_DIR="$build" PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -W "ignore:Failed to initialize NumPy:UserWarning" "$@"
