#!/usr/bin/env bash
# The cost model's accuracy benchmark, part 2 (the GPU machine, ONE device
# call, about 8 minutes on an H100; docs/CostModel.md, "The accuracy
# benchmark"):
#   1. build moe-run with CUDA (runtime only: the GPU machine has no MLIR),
#   2. moe-run --calibrate $OUT/profile.json --device cuda with the
#      calibration plans bench/costmodel_plans/calib/*.json (other layers
#      than the 39 judged below): the GEMM grid, then each step kind's fixed
#      cost and rate fitted to those plans' timed steps,
#   3. every plan of bench/costmodel_plans (bench/make_costmodel_plans.sh
#      made them here; they are committed, so no carry) with --explain
#      --json --profile $OUT/profile.json, 20 timed iterations, --train for
#      the training plans; no new layer starts after DEADLINE s (default 420),
#   4. bench/costmodel_report.py: predicted vs measured per layer and stage,
#      the median and 90th percentile absolute error; $OUT/results.json and
#      $OUT/report.txt. Logs: $OUT/log.txt, $OUT/build.log, $OUT/runs.log.
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUILD="$root/build-gpu"
ITERS="${COSTMODEL_ITERS:-20}"
DEADLINE="${DEADLINE:-420}"
# The benchmark over two calls (the 39 layers do not fit one call's 600 s
# with the calibration): PROFILE=a profile from an earlier call (carried)
# skips the calibration, LAYERS="l2*" (a glob) runs some layers only.
PROFILE="${PROFILE:-}"
LAYER_GLOB="${LAYERS:-l*}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
mkdir -p "$OUT/runs"
exec > >(tee "$OUT/log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
echo "commit: ${FLEX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"

echo "=== build ($SECONDS s)"
(cmake -S "$root" -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DFLEX_ENABLE_TESTS=OFF \
       -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
 ninja -C "$BUILD" moe-run) > "$OUT/build.log" 2>&1 ||
  { echo "build FAILED"; tail -30 "$OUT/build.log"; exit 1; }
run="$BUILD/bin/moe-run"

if [[ -n "$PROFILE" ]]; then
  echo "=== profile $PROFILE (no calibration)"
  cp "$PROFILE" "$OUT/profile.json"
else
  echo "=== calibrate ($SECONDS s)"
  timeout 180 "$run" --calibrate "$OUT/profile.json" --device cuda \
      "$root"/bench/costmodel_plans/calib/*.json ||
    echo "calibration FAILED: the runs below use the built-in cuda profile"
fi

echo "=== layers ($SECONDS s, no new layer after ${DEADLINE} s)"
: > "$OUT/runs.log"
for plan in "$root"/bench/costmodel_plans/$LAYER_GLOB.json; do
  name="$(basename "$plan" .json)"
  extra=(); [[ "$name" == *.train ]] && extra=(--train)
  # A plan with several variants (layouts) runs each, to judge the choice.
  variants=$(python3 -c "import json,sys; v=[x['name'] for x in json.load(open(sys.argv[1]))['variants']]; print(' '.join(v) if len(v) > 1 else '')" "$plan")
  for variant in ${variants:-""}; do
    run_name="$name${variant:+.$variant}"
    if (( SECONDS > DEADLINE )); then echo "deadline: skipping $run_name"; continue; fi
    pick=(); [[ -n "$variant" ]] && pick=(--variant "$variant")
    start=$SECONDS
    timeout 60 "$run" "$plan" --device cuda "${extra[@]}" "${pick[@]}" --iters "$ITERS" \
        --json --explain --profile "$OUT/profile.json" > "$OUT/runs/$run_name.json" \
        2> "$OUT/runs/$run_name.err"
    rc=$?
    { echo "### $run_name rc=$rc"; cat "$OUT/runs/$run_name.err"; } >> "$OUT/runs.log"
    echo "$run_name rc=$rc $((SECONDS - start)) s"
  done
done

# The automatic choice as a user gets it: each plan with several variants
# once more with none named (the model's pick, then the measured
# refinement explores the variants within its band and settles).
if [[ "${AUTO:-1}" != 0 ]]; then
  echo "=== automatic choice ($SECONDS s)"
  mkdir -p "$OUT/auto"
  for plan in "$root"/bench/costmodel_plans/$LAYER_GLOB.json; do
    name="$(basename "$plan" .json)"
    n=$(python3 -c "import json,sys; print(len(json.load(open(sys.argv[1]))['variants']))" "$plan")
    (( n > 1 )) || continue
    if (( SECONDS > DEADLINE + 60 )); then echo "deadline: skipping auto $name"; continue; fi
    extra=(); [[ "$name" == *.train ]] && extra=(--train)
    timeout 60 "$run" "$plan" --device cuda "${extra[@]}" --iters "$ITERS" \
        --json --explain --profile "$OUT/profile.json" > "$OUT/auto/$name.json" \
        2>> "$OUT/runs.log"
    echo "auto $name rc=$? -> $(python3 -c "import json,sys; e=json.load(open(sys.argv[1]))['explain']; print(e['chosen_name'], '|', e['reason'][:150])" "$OUT/auto/$name.json" 2>/dev/null)"
  done
fi

echo "=== report ($SECONDS s)"
python3 "$root/bench/costmodel_report.py" "$OUT/runs" --profile "$OUT/profile.json" \
  --layers "$root/bench/costmodel_plans/LAYERS" --json "$OUT/results.json" \
  --auto "$OUT/auto" \
  | tee "$OUT/report.txt"
# At most 8 files come back: the per-run JSONs are folded into results.json.
tar -czf "$OUT/runs.tar.gz" -C "$OUT" runs auto && rm -rf "$OUT/runs" "$OUT/auto"
echo "done in $SECONDS s"
