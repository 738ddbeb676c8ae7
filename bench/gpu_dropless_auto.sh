#!/usr/bin/env bash
# Dropless defaults on one GPU (issue 13, session 14): the aligned blocks'
# batched GEMM at C3's shapes bare and with a ReLU beside the padded batch
# (flex-gemm-bench c3_random); C3 dropless per layout and what `auto` picks
# over the layouts plan (--explain); the GEMM tests refactored after the
# last call. Plans from bench/make_baseline.sh; run inside bench/baseline.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/out}"; BUILD="${BUILD:-build-gpu}"
mkdir -p "$OUT"
exec > >(tee "$OUT/dropless-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
cmake -S . -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
  ninja -C "$BUILD" moe-run flex-gemm-bench FlexCudaKernelsTests >> "$OUT/build.log" 2>&1 ||
  { echo "build FAILED"; tail -20 "$OUT/build.log"; exit 1; }
timeout 120 "$BUILD/bin/flex-gemm-bench" --iters 10 --only "${BENCH_ONLY:-c3_random}" \
  > "$OUT/gemm-bench.log" 2>&1
echo "flex-gemm-bench: exit $?"; grep -E "^(shape|c3|  )|aligned|padded" "$OUT/gemm-bench.log" | head -30
row() { # label plan variant [-- moe-run flags]
  local label=$1 plan=$2 variant=$3; shift 3
  [[ ${1:-} == -- ]] && shift
  timeout 90 "$BUILD/bin/moe-run" "bench/plans/$plan.json" --device cuda \
    --iters 10 --variant "$variant" --json "$@" > "$OUT/$label.json" 2> "$OUT/$label.err" ||
    { echo "$label failed"; tail -3 "$OUT/$label.err"; return; }
  python3 -c "
import json, sys
d = json.load(open(sys.argv[1])); f, b = d['forward'], d.get('backward')
print(f'{sys.argv[2]:24s} {d.get(\"variant\", \"\")!s:28.28s} forward {f[\"median_us\"]:8.1f} us', [(x['op'], round(x['mean_us'], 1)) for x in f['steps']],
      f'backward {b[\"median_us\"]:8.1f} us' if b else '')
" "$OUT/$label.json" "$label"
}
for i in 1 2; do
  row cap1 c3_cap1.infer single
  row ragged c3_dropless_layouts.infer ragged
  row padded c3_dropless_layouts.infer padded
  row aligned c3_dropless_layouts.infer aligned
  row auto c3_dropless_layouts.infer auto
done
row cap1-train c3_cap1.train single -- --train
row auto-train c3_dropless_layouts.train auto -- --train
timeout 60 "$BUILD/bin/moe-run" bench/plans/c3_dropless_layouts.infer.json --device cuda \
  --iters 5 --explain > "$OUT/explain.txt" 2>&1; echo "explain: exit $?"; cat "$OUT/explain.txt" | head -40
K="$BUILD/unittests/Cuda/FlexCudaKernelsTests"
timeout 150 "$K" --gtest_filter='CudaDeviceGemmGraph.*:CudaAlignedGemm.*:*WeightGradientMatchesFp64*:*PerExpertGemmsOnSideStreams*' \
  > "$OUT/tests.log" 2>&1
echo "refactored GEMM tests: exit $? $(grep -E '^\[  (PASSED|FAILED)' "$OUT/tests.log" | tr '\n' ' ')"
grep -E '^\[  FAILED' "$OUT/tests.log" | head
