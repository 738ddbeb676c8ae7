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
#      moe-run on the same layer, and beside them the plain PyTorch layer
#      (--peers torch) and, with the "tutel" step, Tutel's moe_layer;
#   tutel: Tutel's extension built from its own source (carry/tutel-src,
#      setup.py build_ext --inplace, no network) while the runtime builds;
#      if it fails, the log says why and the rest goes on without it.
# Prepare HERE (bench/baseline is git-ignored; carry it):
#   bench/gpu_python.sh --prepare     snapshot of HEAD + the compiler library
#                                     + pytest and setuptools wheels (the GPU
#                                     machine has no network) + Tutel's
#                                     source from its mirror (TUTEL_GIT)
# then in the device call: cd bench/baseline && OUT=$OUT bash bench/gpu_python.sh
# (Tutel beside flexmoe alone: STEPS="tutel overhead", about 4 minutes.)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${1:-}" == "--prepare" ]]; then
  dest="$root/bench/baseline"
  rm -rf "$dest" && mkdir -p "$dest/carry/wheels"
  git -C "$root" archive HEAD | tar -x -C "$dest"
  git -C "$root" rev-parse --short HEAD > "$dest/COMMIT"
  cp "$root/build/lib/libflex_compiler.so" "$dest/carry/"
  (cd "$dest/carry/wheels" &&
   pip download -q --no-deps pytest iniconfig pluggy packaging setuptools) ||
    echo "no pytest wheels: the GPU machine's own pytest must do"
  # Tutel's source (never the project's: built there from its own tree),
  # without its pictures; TUTEL_GIT: the mirror's git directory.
  tutel_git="${TUTEL_GIT:-}"
  for g in /work/.mirror/microsoft+tutel /work/.mirror/microsoft+tutel/*; do
    [[ -z "$tutel_git" && -f "$g/HEAD" ]] && tutel_git="$g"
  done
  if [[ -n "$tutel_git" ]] &&
     mkdir -p "$dest/carry/tutel-src" &&
     git --git-dir="$tutel_git" archive HEAD |
       tar -x -C "$dest/carry/tutel-src" --exclude='*.svg'; then
    git --git-dir="$tutel_git" log -1 --format='%h %cs' \
      > "$dest/carry/tutel-src/TUTEL_COMMIT"
    echo "tutel: $(cat "$dest/carry/tutel-src/TUTEL_COMMIT")," \
         "$(du -sh "$dest/carry/tutel-src" | cut -f1)"
  else
    rm -rf "$dest/carry/tutel-src"
    echo "tutel: no mirror (TUTEL_GIT); the tutel step will say so"
  fi
  echo "bench/baseline: $(du -sh "$dest" | cut -f1) of $(cat "$dest/COMMIT")"
  exit 0
fi
OUT="${OUT:-$root/bench/out}"
BUILD="$root/build-gpu"
# STEPS picks steps (default "cuda pytest tutel overhead"); PYTEST_ARGS
# narrows the flexmoe tests (default: all of python/tests).
STEPS="${STEPS:-cuda pytest tutel overhead}"
read -r -a pytest_args <<< "${PYTEST_ARGS:-python/tests}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: $(cat "$root/COMMIT" 2>/dev/null || echo unknown)"

# The Python: the machine's, or a venv over it with the carried wheels
# when it lacks pytest (the tests) or setuptools (Tutel's build).
python=python3
needs="$([[ " $STEPS " == *" pytest "* ]] && echo pytest)"
needs+="$([[ " $STEPS " == *" tutel "* ]] && echo " setuptools")"
for module in $needs; do
  if ! "$python" -c "import $module" 2>/dev/null; then
    "$python" -m venv --system-site-packages "$OUT/venv" &&
      "$OUT/venv/bin/pip" install -q --no-index "$root"/carry/wheels/*.whl &&
      python="$OUT/venv/bin/python"
    break
  fi
done

# Tutel's extension (one C++ file linking CUDA, NVRTC and, where found,
# NCCL: about a minute) builds beside the runtime; its setup.py retries
# without NCCL, then without CUDA, when a build fails.
tutel_src="$root/carry/tutel-src" tutel_dir="" tutel_pid=""
if [[ " $STEPS " == *" tutel "* && -f "$tutel_src/setup.py" ]]; then
  tutel_dir="/tmp/flex-tutel-$(cut -d' ' -f1 "$tutel_src/TUTEL_COMMIT")"
  rm -rf "$tutel_dir" && cp -r "$tutel_src" "$tutel_dir"
  # -lcuda: the toolkit's stub, wherever the toolkit is (Tutel names only
  # /usr/local/cuda's).
  cuda_home="$(dirname "$(dirname "$(command -v nvcc ||
                                     echo /usr/local/cuda/bin/nvcc)")")"
  (cd "$tutel_dir" &&
   LIBRARY_PATH="$cuda_home/lib64/stubs:${LIBRARY_PATH:-}" \
   TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout 420 \
     "$python" setup.py build_ext --inplace) > "$OUT/tutel-build.log" 2>&1 &
  tutel_pid=$!
fi

echo "=== build ($SECONDS s)"
(cmake -S "$root" -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
       -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
 ninja -C "$BUILD" FlexCAPIShared moe-run \
   $([[ " $STEPS " == *" cuda "* ]] && echo FlexCudaExecutorTests)) \
  > "$OUT/build.log" 2>&1 || {
    echo "build FAILED"; tail -30 "$OUT/build.log"
    [[ -n "$tutel_pid" ]] && kill "$tutel_pid" 2>/dev/null
    exit 1; }
tests="$(find "$BUILD" -name FlexCudaExecutorTests -type f | head -1)"

if [[ " $STEPS " == *" cuda "* ]]; then
  echo "=== CUDA per-call state ($SECONDS s)"
  "$tests" --gtest_filter='CudaPerCallState.*' 2>&1 | tail -15
  echo "=== memcheck ($SECONDS s)"
  compute-sanitizer --tool memcheck --error-exitcode 3 "$tests" \
    --gtest_filter='CudaPerCallState.*' 2>&1 | tail -6
fi

echo "=== flexmoe tests ($SECONDS s)"
"$python" -c "import torch, sys; print('torch', torch.__version__, 'python', sys.version.split()[0], 'cuda', torch.cuda.is_available())"
export FLEX_LIBRARY="$(find "$BUILD" -name libflex.so -type f | head -1)"
export FLEX_COMPILER_LIBRARY="$root/carry/libflex_compiler.so"
export FLEXMOE_CACHE_DIR="$OUT/cache" FLEX_BUILD_DIR="$BUILD" PYTHONDONTWRITEBYTECODE=1
[[ " $STEPS " == *" pytest "* ]] &&
  (cd "$root" && timeout 300 "$python" -m pytest "${pytest_args[@]}" -q -rs \
     -p no:cacheprovider -W ignore::DeprecationWarning 2>&1 | tail -25)

peers=torch
if [[ " $STEPS " == *" tutel "* ]]; then
  echo "=== tutel ($SECONDS s)"
  peers=torch,tutel
  if [[ -z "$tutel_pid" ]]; then
    echo "tutel: no source at $tutel_src (bench/gpu_python.sh --prepare" \
         "unpacks it from the mirror); Tutel's rows are skipped"
  elif wait "$tutel_pid"; tutel_rc=$?; ((tutel_rc != 0)); then
    echo "tutel: build FAILED (rc $tutel_rc, $OUT/tutel-build.log):"
    grep -iE "error|fatal" "$OUT/tutel-build.log" | head -8
    tail -5 "$OUT/tutel-build.log"
  else
    grep -E "^Try installing without|^Installing without" \
      "$OUT/tutel-build.log"
    echo "tutel: $(cat "$tutel_src/TUTEL_COMMIT") built in $tutel_dir" \
         "($(grep -c 'Try installing without' "$OUT/tutel-build.log")" \
         "retries)"
    (cd "$root/bench" && "$python" -c "import tutel_layer, sys
try:
    tutel_layer.load(sys.argv[1]); print('tutel: imports')
except ImportError as error:
    print('tutel: does not import:', error)" "$tutel_dir" 2>&1 | tail -3)
  fi
fi

if [[ " $STEPS " == *" overhead "* && -f "$root/bench/python_overhead.py" ]]; then
  echo "=== python overhead ($SECONDS s)"
  # OVERHEAD_CONFIGS: the PERF.md layers to time (issue 12 asks C1-C3; C1
  # alone takes about 25 s, C2 the longest), beside them the peers: the
  # PyTorch layer and Tutel's (its kernels compile at its first call).
  (cd "$root" && timeout 360 "$python" bench/python_overhead.py \
     --configs "${OVERHEAD_CONFIGS:-c1,c2,c3}" \
     --moe-run "$BUILD/bin/moe-run" --peers "$peers" \
     ${tutel_dir:+--tutel-path "$tutel_dir"} \
     --json "$OUT/overhead.json" 2>&1 | tail -60)
fi
rm -rf "$OUT/cache" "$OUT/venv"
echo "done in $SECONDS s"
