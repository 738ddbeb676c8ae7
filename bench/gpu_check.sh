#!/usr/bin/env bash
# A GPU check of a change to the runtime, in ONE device call:
#   1. build this tree's runtime with CUDA (no compiler: the GPU machine has
#      no MLIR), and the baseline's moe-run when bench/baseline/ holds the
#      source of an older commit (bench/gpu_check.sh --prepare BASE does that
#      here, before the call; bench/baseline/ is git-ignored: name it in the
#      device call's carry),
#   2. ctest: every test, the CUDA ones run on the card,
#   3. compute-sanitizer --tool memcheck over the CUDA executor and kernel
#      tests (a filter keeps it inside the call),
#   4. A/B: moe-run on the C1 training plan (16384 tokens, bf16, forward and
#      forward+backward, eager and --graph), the baseline's binary on its
#      own plan and this tree's on this tree's plan, alternating, same card.
# The table is printed last; logs and results.json go to $OUT.
#
#   bench/gpu_check.sh --prepare 6a2a279    (here) the baseline's source
#   bench/gpu_check.sh                      (device machine) the check
# CHECK_STEPS (default "build ctest memcheck ab") picks steps, so the check
# can be split over two calls that each fit the device tool's 600 s.
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
if [[ "${1:-}" == "--prepare" ]]; then
  base="${2:?usage: gpu_check.sh --prepare COMMIT}"
  rm -rf "$root/bench/baseline" && mkdir -p "$root/bench/baseline"
  git -C "$root" archive "$base" CMakeLists.txt cmake include lib tools \
      unittests/Cuda/plans/c1_ffn_relu_train.json unittests/Runtime/ReferenceMoE.cpp \
      unittests/Runtime/ReferenceMoE.h 2>/dev/null |
    tar -x -C "$root/bench/baseline" ||
    git -C "$root" archive "$base" | tar -x -C "$root/bench/baseline"
  echo "$base" > "$root/bench/baseline/COMMIT"
  echo "bench/baseline: $(du -sh "$root/bench/baseline" | cut -f1) of $base"
  exit 0
fi

cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="$root/build-gpu"
BASE_BUILD="$root/build-base"
ITERS="${CHECK_ITERS:-20}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
STEPS=" ${CHECK_STEPS:-build ctest memcheck ab} "
wants() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"

configure() { # SRC BUILD [CMAKE FLAGS...]
  local src="$1" build="$2"; shift 2
  cmake -S "$src" -B "$build" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release "$@"
}

echo "=== build ($SECONDS s)"
targets=(); wants ctest || wants memcheck || targets=(moe-run)
(configure "$root" "$BUILD" && ninja -C "$BUILD" -k 0 "${targets[@]}") \
  > "$OUT/build.log" 2>&1 || { echo "build FAILED"; tail -30 "$OUT/build.log"; }
if wants ab && [[ -d "$root/bench/baseline" ]]; then
  (configure "$root/bench/baseline" "$BASE_BUILD" -DFLEX_ENABLE_TESTS=OFF &&
   ninja -C "$BASE_BUILD" moe-run) > "$OUT/build-base.log" 2>&1 ||
    { echo "baseline build FAILED"; tail -20 "$OUT/build-base.log"; }
fi

if wants ctest; then
echo "=== ctest ($SECONDS s)"
timeout "${CTEST_TIMEOUT:-300}" ctest --test-dir "$BUILD" -j 8 --timeout 120 --output-on-failure \
  > "$OUT/ctest.log" 2>&1
grep -E "tests passed|tests failed|\(Failed\)|\(Timeout\)|Not Run" "$OUT/ctest.log" | tail -15
echo "CUDA tests run (not skipped): $(grep -cE 'Test +#[0-9]+: .*(Cuda|cuda|Nccl).* Passed' "$OUT/ctest.log")"
fi

wants memcheck && echo "=== memcheck ($SECONDS s)"
wants memcheck && for t in FlexCudaExecutorTests FlexCudaKernelsTests; do
  bin=$(find "$BUILD" -name "$t" -type f | head -1)
  [[ -n "$bin" ]] || { echo "$t: not built"; continue; }
  # API errors off: OutOfMemoryIsAStatus makes cudaMalloc fail on purpose;
  # the tests check every status themselves. Memory errors still count.
  timeout "${MEMCHECK_TIMEOUT:-200}" compute-sanitizer --tool memcheck \
    --report-api-errors no --error-exitcode 3 "$bin" \
    --gtest_filter="${MEMCHECK_FILTER:-*}" > "$OUT/memcheck-$t.log" 2>&1
  echo "$t under memcheck: exit $? ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck-$t.log" | tail -1))" \
       "$(grep -E '^\[  (PASSED|FAILED) ' "$OUT/memcheck-$t.log" | tr '\n' ' ')"
done

wants ab || { echo "done in $SECONDS s"; exit 0; }
echo "=== A/B C1 ($SECONDS s)"
new_plan="$root/unittests/Cuda/plans/c1_ffn_relu_train.json"
base_plan="$root/bench/baseline/unittests/Cuda/plans/c1_ffn_relu_train.json"
run_one() { # LABEL MOE_RUN PLAN EXTRA...
  local label="$1" bin="$2" plan="$3"; shift 3
  [[ -x "$bin" && -f "$plan" ]] || return 0
  "$bin" "$plan" --device cuda --train --iters "$ITERS" --json "$@" \
    > "$OUT/ab-$label.json" 2> "$OUT/ab-$label.err" ||
    { echo "$label FAILED: $(tail -2 "$OUT/ab-$label.err")"; return 0; }
}
for round in 1 2; do
  for mode in eager graph; do
    extra=(); [[ "$mode" == graph ]] && extra=(--graph)
    run_one "base-$mode-$round" "$BASE_BUILD/bin/moe-run" "$base_plan" "${extra[@]}"
    run_one "new-$mode-$round" "$BUILD/bin/moe-run" "$new_plan" "${extra[@]}"
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
rows, results = [], {}
for path in sorted(glob.glob(os.path.join(out, "ab-*.json"))):
    label = os.path.basename(path)[3:-5]
    try:
        doc = json.load(open(path))
    except Exception:
        continue
    fwd, bwd = doc["forward"]["median_us"], doc["backward"]["median_us"]
    results[label] = {"forward_us": fwd, "backward_us": bwd}
    rows.append(f"{label:18s} fwd {fwd/1000:8.3f} ms  fwd+bwd {(fwd+bwd)/1000:8.3f} ms")
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=1)
print("C1 training plan, median of the timed calls:")
print("\n".join(rows) or "no A/B results")
PY
echo "done in $SECONDS s"
