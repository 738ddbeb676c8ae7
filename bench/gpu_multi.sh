#!/usr/bin/env bash
# The multi-GPU run in ONE device call (nvidia-h200-x2 or -x4), issue 5, on
# W = the GPUs found (or BENCH_RANKS), one rank per GPU:
#   1. build the runtime with CUDA and NCCL (no compiler: no MLIR there),
#   2. the NCCL tests: the communicator, the multi-rank plans on W GPUs vs
#      the fp64 reference over three exchange paths, moe-run under mpirun
#      and started torchrun-style (ctest -R
#      'Nccl|CudaMultiRank|moe-run.cuda|Rendezvous'), the same plans with
#      the exchanges through the copy engines (FLEX_A2A_TRANSPORT=ce), then
#      the whole ctest,
#   3. NCCL's own all-to-all bandwidth through torch.distributed (torchrun,
#      bench/nccl_a2a_bw.py) for comparison, the cost model's calibration
#      on the W GPUs (moe-run --calibrate --device cuda, one profile JSON),
#      and the GEMMs' slowdown beside
#      an exchange over NCCL and over the copy engines
#      (bench/overlap_probe.py),
#   4. timings: mpirun -np W moe-run on bench/plans/mr<W>_{c1,c3}_*.train.json
#      (2DH plans for W = 4; 16384 tokens per GPU; variants r1d1, r1d2,
#      r1d4, r0d1; forward+backward, with and without overlap), one JSON
#      per run in $OUT/multi/.
# A failed step is recorded and the next one still runs; a summary comes
# last. Needs bench/plans from bench/make_multi_plans.sh (run where the
# compiler is), carried with the call:
#   run(kind="nvidia-h200-x4", carry=["bench/plans"],
#       command="bash bench/gpu_multi.sh")
# Knobs: BENCH_EXTRA (A/B runs, see flex()), BENCH_MULTI_CONFIGS ("c1_cap1
# c3_cap1 c1_dropless c3_dropless c1_cap1_2dh c3_cap1_2dh"), BENCH_VARIANTS
# ("r1d1 r1d2 r1d4 r0d1") -- these three run none when set empty --,
# BENCH_ITERS (20, PERF.md: median of >= 20), BENCH_SKIP ("build tests ce
# ctest nccl calibrate probe flex", any subset), BENCH_DEADLINE (540 s: no new step after).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
ITERS="${BENCH_ITERS:-20}"
CONFIGS="${BENCH_MULTI_CONFIGS-c1_cap1 c3_cap1 c1_dropless c3_dropless c1_cap1_2dh c3_cap1_2dh}"
VARIANTS="${BENCH_VARIANTS-r1d1 r1d2 r1d4 r0d1}"
SKIP=" ${BENCH_SKIP:-} "
DEADLINE="${BENCH_DEADLINE:-540}"
BUILD="${BENCH_BUILD_DIR:-$root/build-gpu-multi}"
MOE_RUN="$BUILD/bin/moe-run"
# NVLink multicast stays off: it can take the host's shared GPUs down.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export FLEX_COLLECTIVE_TIMEOUT_S="${FLEX_COLLECTIVE_TIMEOUT_S:-120}"
export PYTHONUNBUFFERED=1
# One rank per GPU (BENCH_RANKS to use fewer); plans mr<RANKS>_*.
RANKS="${BENCH_RANKS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')}"
(( RANKS >= 2 )) || RANKS=2
MPIRUN=(mpirun --oversubscribe --allow-run-as-root
        -x NCCL_NVLS_ENABLE -x TORCH_SYMM_MEM_DISABLE_MULTICAST
        -x NVSHMEM_DISABLE_NVLS -x FLEX_COLLECTIVE_TIMEOUT_S -np "$RANKS")

mkdir -p "$OUT/multi" || exit 1
exec > >(tee "$OUT/multi_log.txt") 2>&1
start=$SECONDS
failed=()
skip() { [[ "$SKIP" == *" $1 "* ]]; }
late() { (( SECONDS - start > DEADLINE )); }
step() { # step NAME COMMAND...: runs unless skipped or past the deadline
  local name=$1; shift
  if skip "$name"; then echo "== $name: skipped (BENCH_SKIP)"; return 0; fi
  if late; then echo "== $name: skipped (past ${DEADLINE}s)"; failed+=("$name:late"); return 0; fi
  echo "== $name ($((SECONDS - start)) s)"
  "$@" || { echo "== $name FAILED ($?)"; failed+=("$name"); }
}

echo "gpu_multi.sh: commit ${FLEX_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
nvidia-smi -L || true
nvidia-smi topo -m 2>/dev/null | head -5 || true
python3 -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count(), "NCCL", torch.cuda.nccl.version())' || true
ls /usr/include/nccl.h /usr/lib/x86_64-linux-gnu/libnccl.so* 2>/dev/null || true

build() {
  cmake -S "$root" -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
    -DFLEX_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
    -DCMAKE_BUILD_TYPE=Release >"$OUT/multi/cmake.txt" 2>&1 \
    || { tail -30 "$OUT/multi/cmake.txt"; return 1; }
  grep "Flex:" "$OUT/multi/cmake.txt"
  grep -q "NCCL communicator with" "$OUT/multi/cmake.txt" \
    || { echo "no NCCL communicator in this build"; return 1; }
  ninja -C "$BUILD" -j"$(nproc)" >"$OUT/multi/build.txt" 2>&1 \
    || { grep -B2 -A8 "error" "$OUT/multi/build.txt" | head -80; return 1; }
}
step build build

tests() {
  # Bounded: a hung collective must not spend the call's device time.
  timeout 120 "$BUILD/unittests/Cuda/FlexNcclCommunicatorTests" &&
  timeout 120 "$BUILD/unittests/Cuda/FlexCudaMultiRankTests" --gtest_brief=1 &&
  # The other exchange paths (the test plans' runs are small, so the
  # default packs them): in place on the exchange stream, and staged on the
  # compute stream.
  FLEX_A2A_STAGING=0 timeout 120 "$BUILD/unittests/Cuda/FlexCudaMultiRankTests" --gtest_brief=1 &&
  FLEX_CUDA_OVERLAP=0 FLEX_A2A_STAGING=1 timeout 120 "$BUILD/unittests/Cuda/FlexCudaMultiRankTests" --gtest_brief=1 &&
  (cd "$BUILD" && ctest --timeout 120 --output-on-failure -R 'Nccl|CudaMultiRank|moe-run.cuda|Rendezvous')
}
step tests tests
# The exchanges through the copy engines (FLEX_A2A_TRANSPORT=ce): every
# multi-rank plan again, then moe-run across processes (CUDA IPC).
ce() {
  FLEX_A2A_TRANSPORT=ce timeout 180 "$BUILD/unittests/Cuda/FlexCudaMultiRankTests" --gtest_brief=1 &&
  (cd "$BUILD" && ctest --timeout 120 --output-on-failure -R 'peer-copies|PeerCopies')
}
step ce ce
step ctest bash -c "cd '$BUILD' && ctest -j8 --timeout 120 --output-on-failure 2>&1 | tail -40"

nccl() {
  timeout 180 torchrun --standalone --nproc_per_node "$RANKS" \
    "$root/bench/nccl_a2a_bw.py" "$OUT/multi/nccl_a2a_bw.json"
}
step nccl nccl

# The cost model's profile on these W GPUs (docs/CostModel.md, "CUDA
# calibration"): Flex's own exchange, the collectives and both slowdowns,
# the slowest rank's; the runs below name it with --profile, so every
# variant's prediction can be set beside its measurement (issue 14, item
# 2): here, python3 bench/replay_multi.py --live OUT --profile
# OUT/multi/profile_wW.json.
calibrate() {
  timeout 180 "${MPIRUN[@]}" "$MOE_RUN" \
    --calibrate "$OUT/multi/profile_w$RANKS.json" --device cuda
}
step calibrate calibrate

# Transports beside the GEMMs (bench/overlap_probe.py): NCCL's kernels,
# NCCL with its copy-engine path, and plain copy engines.
probe() {
  local ok=0
  timeout 120 torchrun --standalone --nproc_per_node "$RANKS" \
    "$root/bench/overlap_probe.py" nccl "$OUT/multi/probe_nccl.json" || ok=1
  NCCL_P2P_USE_CUDA_MEMCPY=1 timeout 120 torchrun --standalone \
    --nproc_per_node "$RANKS" "$root/bench/overlap_probe.py" nccl \
    "$OUT/multi/probe_nccl_ce.json" || { echo "NCCL_P2P_USE_CUDA_MEMCPY=1 failed or timed out"; ok=1; }
  CUDA_VISIBLE_DEVICES="$(seq -s, 0 $((RANKS - 1)))" timeout 120 python3 \
    "$root/bench/overlap_probe.py" ce "$OUT/multi/probe_ce.json" || ok=1
  return $ok
}
step probe probe

# One run: mpirun -np W moe-run, forward+backward, one JSON; prints the
# totals and the exchange's share. Extra environment (A=B) or moe-run flags
# (--no-align) follow the tag.
flex_run() { # flex_run CONFIG VARIANT TAG [ENV=VALUE | --FLAG ...]
  local config=$1 variant=$2 tag=$3; shift 3
  local plan="$root/bench/plans/mr${RANKS}_$config.train.json"
  local json="$OUT/multi/flex_${config}_${variant}_${tag}.json"
  # ENV=VALUE items go to every rank's environment; --flag items (and
  # their values) to moe-run.
  local envs=() vars=() flags=() e
  for e in "$@"; do
    if [[ "$e" != --* && "$e" == *=* ]]; then envs+=(-x "$e"); vars+=("$e"); else flags+=("$e"); fi
  done
  if env "${vars[@]}" timeout 120 "${MPIRUN[@]}" "${envs[@]}" "$MOE_RUN" "$plan" \
       --device cuda --train --variant "$variant" --iters "$ITERS" --json "${flags[@]}" \
       >"$json.tmp" 2>"$json.err"; then
    mv "$json.tmp" "$json"
    python3 - "$json" "$config" "$variant" "$tag" <<'PY' || true
import json, sys
d = json.load(open(sys.argv[1]))
def comm(steps):
    return sum(s["mean_us"] for s in steps
               if s["op"] in ("all_to_all", "all_gather", "reduce_scatter"))
f, b = d["forward"], d["backward"]
print(f"   {sys.argv[2]:12} {sys.argv[3]:5} {sys.argv[4]:8} fwd {f['median_us']/1000:7.3f} ms "
      f"fwd+bwd {(f['median_us'] + b['median_us'])/1000:7.3f} ms  "
      f"(exchange steps {comm(f['steps'])/1000:.3f} + {comm(b['steps'])/1000:.3f} ms)")
PY
  else
    echo "   $config $variant $tag FAILED"; tail -5 "$json.err"; return 1
  fi
}

flex() {
  local ok=0
  for config in $CONFIGS; do
    local plan="$root/bench/plans/mr${RANKS}_$config.train.json"
    # 2DH needs more than one simulated node of 2.
    [[ -f "$plan" || ( "$config" == *_2dh && RANKS -le 2 ) ]] || {
      echo "missing $plan (bench/make_multi_plans.sh, carry bench/plans)"; ok=1; continue; }
    [[ -f "$plan" ]] || continue
    for variant in $VARIANTS; do
      # 2DH plans hold r1d1 and r1d2 only.
      grep -q "\"name\": *\"$variant\"" "$plan" || continue
      late && { echo "past ${DEADLINE}s: no more runs"; return 1; }
      flex_run "$config" "$variant" overlap || ok=1
      # Exchanges on the compute stream: exact per-step times, the
      # compute-only time, and so the exposed communication.
      if [[ "$config" == *cap1 ]]; then
        flex_run "$config" "$variant" serial FLEX_CUDA_OVERLAP=0 || ok=1
      fi
    done
  done
  # A/B runs, "config:variant:tag[:ENV=VALUE|--flag,...]" each. The
  # default: the exchanges through the copy engines against NCCL's kernels
  # (FLEX_A2A_TRANSPORT=ce), overlapped and serial.
  local extra config variant tag envs
  for extra in ${BENCH_EXTRA-c1_cap1:r1d2:ce:FLEX_A2A_TRANSPORT=ce c1_cap1:r1d4:ce:FLEX_A2A_TRANSPORT=ce c1_cap1:r1d1:ceserial:FLEX_A2A_TRANSPORT=ce,FLEX_CUDA_OVERLAP=0 c3_cap1:r1d2:ce:FLEX_A2A_TRANSPORT=ce}; do
    IFS=: read -r config variant tag envs <<<"$extra"
    late && { echo "past ${DEADLINE}s: no more runs"; return 1; }
    # shellcheck disable=SC2086
    flex_run "$config" "$variant" "$tag" ${envs//,/ } || ok=1
  done
  return $ok
}
step flex flex


# One file comes back instead of dozens.
tar czf "$OUT/multi_results.tgz" -C "$OUT" multi && rm -rf "$OUT/multi"
echo "== done in $((SECONDS - start)) s; failed: ${failed[*]:-none}"
(( ${#failed[@]} == 0 ))
