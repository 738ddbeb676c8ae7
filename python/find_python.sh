# ===- find_python.sh - The Python the flexmoe ctests run with -----------=== #
#
# Part of Flex, an MLIR-based compiler and runtime for Mixture-of-Experts.
#
# ===----------------------------------------------------------------------=== #
#
# Sourced by run_tests.sh and run_example.sh: sets `python` to FLEXMOE_PYTHON,
# else the venv scripts/setup.sh makes ($build/python-deps/venv), else
# python3, and `build` to FLEX_BUILD_DIR (default: ../build). When that
# Python cannot import every module named in $1 (space-separated), prints
# why and exits 77, which ctest reports as skipped.
#
# ===----------------------------------------------------------------------=== #
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
build="${FLEX_BUILD_DIR:-$here/../build}"
python="${FLEXMOE_PYTHON:-}"
if [ -z "$python" ]; then
  python="$build/python-deps/venv/bin/python"
  [ -x "$python" ] || python="$(command -v python3 || true)"
fi
needed="$1"
if [ -z "$python" ] || ! "$python" -c "import ${needed// /, }" 2>/dev/null; then
  echo "SKIPPED: needs ${needed// / and } (tried '${python:-no python3}');"
  echo "scripts/setup.sh installs them into $build/python-deps/venv"
  exit 77
fi
export FLEX_BUILD_DIR="$build" PYTHONDONTWRITEBYTECODE=1
