#!/usr/bin/env bash
# Shared set-up of the two README commands: installs what is missing (Debian
# packages), then configures and builds Flex incrementally in build/.
# Sourced by run.sh and test.sh; not meant to be run alone.
set -euo pipefail

FLEX_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FLEX_BUILD="${FLEX_BUILD:-$FLEX_ROOT/build}"
FLEX_JOBS="${FLEX_JOBS:-$(nproc)}"

flex_packages=(
  cmake ninja-build g++ python3
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

flex_build() {
  flex_install_missing
  if [ ! -f "$FLEX_BUILD/build.ninja" ]; then
    cmake -S "$FLEX_ROOT" -B "$FLEX_BUILD" -G Ninja \
      -DCMAKE_BUILD_TYPE=Release \
      -DFLEX_ENABLE_COMPILER=ON -DFLEX_ENABLE_RUNTIME=ON -DFLEX_ENABLE_TESTS=ON \
      -DLLVM_EXTERNAL_LIT=/usr/lib/llvm-22/bin/lit
  fi
  cmake --build "$FLEX_BUILD" -j "$FLEX_JOBS"
}
