#!/usr/bin/env bash
# Which commit slowed a kernel (issue 13: call 34 measured every wgmma form
# 1.5-2.2x slower than at 86ceb09): flex-gemm-bench from each tree of
# bench/bisect (bench/make_bisect_trees.sh REV...), built at once (runtime
# only, no tests), then timed one after the other on the same card.
# BENCH_ONLY picks the shapes (default c3,decode_t512), BUDGET the seconds.
#
#   bench/gpu_bisect.sh    (device machine, bench/bisect carried)
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
BUDGET="${BUDGET:-420}"
ONLY="${BENCH_ONLY:-c3,decode_t512}"
export FLEX_WGMMA=1
mkdir -p "$OUT"
exec > >(tee "$OUT/bisect-log.txt") 2>&1
echo "gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
limit() {
  local left=$((BUDGET - SECONDS))
  echo $(( left < $1 ? left : $1 ))
}
[[ -f bench/bisect/revs ]] || { echo "no bench/bisect/revs"; exit 2; }
mapfile -t revs < <(cut -d' ' -f1 bench/bisect/revs)
echo "=== build ${#revs[@]} trees at once ($SECONDS s)"
pids=()
for rev in "${revs[@]}"; do
  ( cmake -S "bench/bisect/$rev" -B "/tmp/bisect-build-$rev" -G Ninja \
      -DFLEX_ENABLE_COMPILER=OFF -DFLEX_ENABLE_TESTS=OFF \
      -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release &&
    timeout "$(limit 300)" ninja -C "/tmp/bisect-build-$rev" flex-gemm-bench
  ) > "$OUT/bisect-build-$rev.log" 2>&1 &
  pids+=($!)
done
for i in "${!pids[@]}"; do
  wait "${pids[$i]}" && echo "${revs[$i]}: built" ||
    { echo "${revs[$i]}: build FAILED"; grep -E "error" "$OUT/bisect-build-${revs[$i]}.log" | head -5; }
done
echo "=== bench ($SECONDS s)"
for rev in "${revs[@]}"; do
  bin="/tmp/bisect-build-$rev/bin/flex-gemm-bench"
  [[ -x $bin ]] || continue
  (( BUDGET - SECONDS > 20 )) || { echo "$rev: skipped (budget)"; continue; }
  echo "--- $(grep "^$rev " bench/bisect/revs)"
  timeout "$(limit 60)" "$bin" --iters 10 --only "$ONLY" > "$OUT/bisect-bench-$rev.log" 2>&1
  echo "exit $?"
  cat "$OUT/bisect-bench-$rev.log"
done
echo "done in $SECONDS s"
