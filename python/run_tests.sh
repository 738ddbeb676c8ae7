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
source "$(dirname "${BASH_SOURCE[0]}")/find_python.sh" "torch pytest"
# -rs lists the skipped tests with their reasons; -rP prints the passed
# tests' output: the measured compile time.
exec "$python" -m pytest "$here/tests" -q -rsP -p no:cacheprovider -p no:logging \
  -W ignore::DeprecationWarning "$@"
