#!/usr/bin/env bash
# The tree a device call runs, HERE: bench/baseline/ holds HEAD's committed
# files (git archive: what the call measures is exactly a commit) and the
# plans compiled from it (bench/make_plans.sh with FLEX_PLAN_OPTIONS, default
# "fuse-activation-backward=true fuse-combine=true": the fused variants the
# priority script compares). The folder is git-ignored; carry it with the
# call (about 12 MB) and run scripts inside it, e.g.
#   run: cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> QUICK=1 \
#        bash bench/gpu_wgmma_priority.sh
#
#   bench/make_baseline.sh [BUILD_DIR]   (default: build, with the compiler)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export FLEX_PLAN_OPTIONS="${FLEX_PLAN_OPTIONS-fuse-activation-backward=true fuse-combine=true}"
bash bench/make_plans.sh "${1:-$root/build}" > /dev/null
rm -rf bench/baseline
mkdir -p bench/baseline
git archive HEAD | tar -x -C bench/baseline
rm -rf bench/baseline/bench/results
mkdir -p bench/baseline/bench/plans
cp bench/plans/*.json bench/baseline/bench/plans/
# Dropless layers with expert-row layouts as variants (the padded one
# batches its GEMMs over E x C, C the largest expert's rows; the aligned one
# over 128-row blocks): C3 with all three, G3 and the decode layers with
# ragged and aligned (what a one-rank layout=auto would carry).
layout_plan() { # layer mode layouts
  local training=false
  [[ $2 == train ]] && training=true
  "${BUILD_DIR}/bin/moe-opt" "bench/layers/$1.mlir" \
    --moe-lower-to-plan="training=$training layouts=$3" |
    "${BUILD_DIR}/bin/moe-translate" --moert-to-plan \
      > "bench/baseline/bench/plans/$1_layouts.$2.json"
}
BUILD_DIR="${1:-$root/build}"
for mode in infer train; do
  layout_plan c3_dropless $mode padded,ragged,aligned
  layout_plan g3_dropless $mode ragged,aligned
done
layout_plan d1_dropless infer ragged,aligned
layout_plan d2_dropless infer ragged,aligned
echo "bench/baseline: $(git rev-parse --short HEAD), $(ls bench/baseline/bench/plans | wc -l) plans, $(du -sh bench/baseline | cut -f1)"
