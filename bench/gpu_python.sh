#!/usr/bin/env bash
# Issue 12 (and the per-call state of the C API) on the GPU machine, in ONE
# device call of a few minutes:
#   1. build the runtime with CUDA (no MLIR there): libflex.so, moe-run and
#      the CUDA executor tests;
#   2. the per-call workspace/seed CUDA tests (CudaPerCallState.*), also
#      under compute-sanitizer --tool memcheck;
#   3. the flexmoe tests (python/tests) with the machine's torch, the CUDA
#      ones included, libflex_compiler.so carried from the CPU machine (it
#      links MLIR statically);
#   4. bench/python_overhead.py when present: the layer's time against
#      moe-run on the same layer.
# Prepare HERE (bench/baseline is git-ignored; carry it):
#   bench/gpu_python.sh --prepare     snapshot of HEAD + the compiler library
#                                     + pytest wheels (the GPU machine has no
#                                     network)
# then in the device call: cd bench/baseline && OUT=$OUT bash bench/gpu_python.sh
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${1:-}" == "--prepare" ]]; then
  dest="$root/bench/baseline"
  rm -rf "$dest" && mkdir -p "$dest/carry/wheels"
  git -C "$root" archive HEAD | tar -x -C "$dest"
  git -C "$root" rev-parse --short HEAD > "$dest/COMMIT"
  cp "$root/build/lib/libflex_compiler.so" "$dest/carry/"
  (cd "$dest/carry/wheels" &&
   pip download -q --no-deps pytest iniconfig pluggy packaging) ||
    echo "no pytest wheels: the GPU machine's own pytest must do"
  echo "bench/baseline: $(du -sh "$dest" | cut -f1) of $(cat "$dest/COMMIT")"
  exit 0
fi
OUT="${OUT:-$root/bench/out}"
BUILD="$root/build-gpu"
# STEPS picks steps (default "cuda pytest overhead"); PYTEST_ARGS narrows
# the flexmoe tests (default: all of python/tests).
STEPS="${STEPS:-cuda pytest overhead}"
read -r -a pytest_args <<< "${PYTEST_ARGS:-python/tests}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: $(cat "$root/COMMIT" 2>/dev/null || echo unknown)"

echo "=== build ($SECONDS s)"
(cmake -S "$root" -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
       -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
 ninja -C "$BUILD" FlexCAPIShared moe-run \
   $([[ " $STEPS " == *" cuda "* ]] && echo FlexCudaExecutorTests)) \
  > "$OUT/build.log" 2>&1 || { echo "build FAILED"; tail -30 "$OUT/build.log"; exit 1; }
tests="$(find "$BUILD" -name FlexCudaExecutorTests -type f | head -1)"

if [[ " $STEPS " == *" cuda "* ]]; then
  echo "=== CUDA per-call state ($SECONDS s)"
  "$tests" --gtest_filter='CudaPerCallState.*' 2>&1 | tail -15
  echo "=== memcheck ($SECONDS s)"
  compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" \
    --gtest_filter='CudaPerCallState.*' 2>&1 | tail -6
fi

echo "=== flexmoe tests ($SECONDS s)"
python=python3
if ! "$python" -c "import pytest" 2>/dev/null; then
  "$python" -m venv --system-site-packages "$OUT/venv" &&
    "$OUT/venv/bin/pip" install -q --no-index "$root"/carry/wheels/*.whl &&
    python="$OUT/venv/bin/python"
fi
"$python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available())"
export FLEX_LIBRARY="$(find "$BUILD" -name libflex.so -type f | head -1)"
export FLEX_COMPILER_LIBRARY="$root/carry/libflex_compiler.so"
export FLEXMOE_CACHE_DIR="$OUT/cache" FLEX_BUILD_DIR="$BUILD" PYTHONDONTWRITEBYTECODE=1
[[ " $STEPS " == *" pytest "* ]] &&
  (cd "$root" && timeout 300 "$python" -m pytest "${pytest_args[@]}" -q -rs \
     -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tail -25)

if [[ " $STEPS " == *" overhead "* && -f "$root/bench/python_overhead.py" ]]; then
  echo "=== python overhead ($SECONDS s)"
  # OVERHEAD_CONFIGS: the PERF.md layers to time (issue 12 asks C1-C3; C1
  # alone takes about 25 s, C2 the longest).
  (cd "$root" && timeout 240 "$python" bench/python_overhead.py \
     --configs "${OVERHEAD_CONFIGS:-c1,c2,c3}" \
     --moe-run "$BUILD/bin/moe-run" 2>&1 | tail -40)
fi
rm -rf "$OUT/cache" "$OUT/venv"
echo "done in $SECONDS s"
