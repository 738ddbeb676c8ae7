#!/usr/bin/env bash
# Shared set-up of the two README commands: installs what is missing (Debian
# packages), then configures and builds Flex incrementally in build/.
# Sourced by run.sh and test.sh; not meant to be run alone.
set -euo pipefail

FLEX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEX_BUILD="${FLEX_BUILD:-$FLEX_ROOT/build}"
FLEX_JOBS="${FLEX_JOBS:-$(nproc)}"

flex_packages=(
  cmake ninja-build g++ python3 python3-venv
  libmlir-22-dev mlir-22-tools llvm-22-dev llvm-22-tools
  nlohmann-json3-dev libzstd-dev libgtest-dev
  libopenblas-dev openmpi-bin libopenmpi-dev
)

flex_install_missing() {
  local missing=()
  for pkg in "${flex_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "flex: installing ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# The Python package's tests (python/, docs/Python.md) need torch and pytest:
# a venv under the build folder, made once (FLEX_PYTHON_DEPS=0 skips it; the
# python-flexmoe test then says it was skipped). PyPI's torch needs its CUDA
# libraries to import, even on a CPU, so they come too; triton (1 GB, only
# for compiling GPU kernels) does not (pip then warns that it is missing).
# setuptools >= 70.1 builds the package offline (a test pip-installs it).
# About 1.5 minutes and 4.4 GB, once.
FLEX_TORCH_SPEC="${FLEX_TORCH_SPEC:-torch==2.15.0}"
flex_torch_deps_script='
from importlib.metadata import requires
from pip._vendor.packaging.requirements import Requirement
for text in requires("torch") or []:
    r = Requirement(text)
    if r.name != "triton" and (not r.marker or r.marker.evaluate({"extra": ""})):
        print(str(r).split(";")[0].replace(" ", ""))
'
flex_python_deps() {
  [ "${FLEX_PYTHON_DEPS:-1}" = 0 ] && return 0
  local venv="$FLEX_BUILD/python-deps/venv" start=$SECONDS deps
  "$venv/bin/python" -c "import torch, pytest" >/dev/null 2>&1 && return 0
  echo "flex: installing $FLEX_TORCH_SPEC (without triton) and pytest into $venv"
  if python3 -m venv --clear "$venv" &&
     "$venv/bin/pip" install -q --no-deps "$FLEX_TORCH_SPEC" &&
     deps=$("$venv/bin/python" -c "$flex_torch_deps_script") &&
     "$venv/bin/pip" install -q pytest "setuptools>=70.1" $deps; then
    echo "flex: torch and pytest installed in $((SECONDS - start)) s"
  else
    echo "flex: could not install torch; the python-flexmoe test will be skipped"
  fi
}

flex_build() {
  flex_install_missing
  if [ ! -f "$FLEX_BUILD/build.ninja" ]; then
    cmake -S "$FLEX_ROOT" -B "$FLEX_BUILD" -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DFLEX_ENABLE_COMPILER=ON -DFLEX_ENABLE_RUNTIME=ON -DFLEX_ENABLE_TESTS=ON \
      -DLLVM_EXTERNAL_LIT=/usr/lib/llvm-22/bin/lit
  fi
  cmake --build "$FLEX_BUILD" -j "$FLEX_JOBS"
  flex_python_deps
}
