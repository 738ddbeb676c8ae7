#!/usr/bin/env bash
# One device call for the dropless default and the wgmma kernel's gap to
# cuBLAS (issue 13, session 16's first call):
#  1. every layout variant of G3 (inference and training) and the decode
#     layers D1 / D2 with layouts=ragged,aligned, named and under auto (is
#     aligned ever much slower than ragged? then layout=auto cannot carry it);
#  2. Nsight Compute on C3's fc1 and fc2: cuBLAS's strided batch against the
#     wgmma tiles (128x256, the 2-CTA pair, ping-pong) - where the wgmma
#     kernel's 25-35% goes (flex-gemm-bench's NVTX ranges pick the calls).
# Plans from bench/make_baseline.sh; run inside bench/baseline:
#   cd bench/baseline && OUT=$OUT FLEX_COMMIT=<sha> bash bench/gpu_layouts_profile.sh
set -uo pipefail
cd "$(dirname "$0")/.."
. bench/device_call.sh
device_call profile -DFLEX_ENABLE_TESTS=OFF -- moe-run flex-gemm-bench
. bench/moe_run_row.sh
MOE_RUN="$B/bin/moe-run" ROW_LOGS="$LOGS"
variants() { python3 -c "import json,sys; print(' '.join(v['name'] for v in json.load(open(sys.argv[1]))['variants']))" "$1"; }
for plan in d1_dropless_layouts.infer d2_dropless_layouts.infer g3_dropless_layouts.infer \
            g3_dropless_layouts.train; do
  flags=(); [[ $plan == *.train ]] && flags=(--train)
  for v in $(variants "bench/plans/$plan.json"); do
    ROW_ITERS=20 moe_run_row "${plan%%_*}-${v}-${plan##*.}" "$plan" "$v" -- "${flags[@]}"
  done
  # auto after its exploration: 40 calls, the median is the settled variant's
  ROW_ITERS=40 moe_run_row "${plan%%_*}-auto-${plan##*.}" "$plan" auto -- "${flags[@]}"
done
echo "layouts done at ${SECONDS}s"
G="$B/bin/flex-gemm-bench"
timeout 120 "$G" --iters 10 --only c3 > "$LOGS/gemm-c3.log" 2>&1
echo "flex-gemm-bench c3: exit $?"; grep -E "^c3 |wgmma" "$LOGS/gemm-c3.log" | cut -c1-400
ranges=()
for op in fc1 fc2; do
  for cfg in batched "wgmma 128x256" "wgmma 2x(128x256) multicast" "wgmma ping-pong 128x128"; do
    ranges+=(--nvtx-include "c3.$op.$cfg/")
  done
done
NCU=(ncu --clock-control none --nvtx "${ranges[@]}" --launch-count 16)
timeout 240 "${NCU[@]}" --section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats \
  --section LaunchStats --section Occupancy "$G" --iters 1 --only c3 > "$LOGS/ncu-sections.txt" 2>&1
echo "ncu sections: exit $? ($(grep -c '==PROF==\|  Section: GPU Speed Of Light' "$LOGS/ncu-sections.txt") lines)"
# The tensor pipe and the memory path as raw metrics (a name ncu does not
# know fails only this run).
timeout 120 "${NCU[@]}" --metrics \
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,\
sm__inst_executed_pipe_tensor_op_gmma.sum,gpu__time_duration.sum,\
lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum,dram__bytes_read.sum,dram__bytes_write.sum,\
lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__cycles_active.avg.pct_of_peak_sustained_elapsed \
  "$G" --iters 1 --only c3 > "$LOGS/ncu-metrics.txt" 2>&1
echo "ncu metrics: exit $?"
grep -E "raggedMKernel|nvjet|sm90|gemm|Kernel|gmma|duration|throughput|bytes|sectors|cycles_active" \
  "$LOGS/ncu-metrics.txt" | cut -c1-160 | head -150
echo "done at ${SECONDS}s"
