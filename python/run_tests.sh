#!/usr/bin/env bash
# ===- run_tests.sh - The python-flexmoe ctest: pytest over python/tests --=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Runs the flexmoe tests with a Python that has torch and pytest: FLEXMOE_PYTHON,
# else the venv scripts/setup.sh makes ($FLEX_BUILD_DIR/python-deps/venv),
# else python3. Without torch or pytest it prints why and exits 77, which
# ctest reports as skipped. pytest's summary line is the last line.
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
if [ -z "$python" ] || ! "$python" -c "import torch, pytest" 2>/dev/null; then
  echo "SKIPPED: python-flexmoe needs torch and pytest (tried '${python:-no python3}');"
  echo "scripts/setup.sh installs them into $build/python-deps/venv"
  exit 77
fi
export FLEX_BUILD_DIR="$build" PYTHONDONTWRITEBYTECODE=1
# -rs lists the skipped tests with their reasons; -rP prints the passed
# tests' output: the measured compile time.
exec "$python" -m pytest "$here/tests" -q -rsP -p no:cacheprovider -p no:logging \
  -W ignore::DeprecationWarning "$@"
