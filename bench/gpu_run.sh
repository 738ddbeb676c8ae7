#!/usr/bin/env bash
# The whole benchmark in ONE device call (bench/RESULTS.md says how to run it):
#   1. the PyTorch baseline with its fp64 check and the two ceilings,
#   2. build the runtime with CUDA (no compiler: the GPU machine has no MLIR),
#   3. ctest (CPU and CUDA tests),
#   4. Flex: moe-run --check on the small plans, then the benchmark plans
#      (forward on the inference plan, forward+backward on the training plan,
#      each with and without --graph), if moe-run has the CUDA device,
#   5. bench/report.py: $OUT/results.json, $OUT/bench.png, the table last.
# A failed step is recorded and the next one still runs, so the PyTorch
# baseline and the report come back even before the CUDA backend exists.
#
# Needs bench/plans (bench/make_plans.sh, run where the compiler is) carried
# with the call. Knobs (environment): BENCH_ITERS (20), BENCH_CONFIGS
# ("c1 c2 c3"; also g1 g3, gated, and d1 d2, decode: any subset, e.g.
# "g1 g3 d1 d2"), BENCH_SKIP="build ctest torch flex" (any subset),
# BENCH_DEADLINE (540: seconds after which no new step or Flex run starts,
# so the report still comes back inside the device tool's 600 s),
# BENCH_BUILD_DIR (build-gpu), FLEX_COMMIT (the commit to report when .git
# does not travel).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
OUT="${OUT:-$root/bench/out}"
WORK="${BENCH_WORK:-/tmp/flexbench}"
ITERS="${BENCH_ITERS:-20}"
CONFIGS="${BENCH_CONFIGS:-c1 c2 c3}"
MODES="cap1 dropless"
SKIP=" ${BENCH_SKIP:-} "
DEADLINE="${BENCH_DEADLINE:-540}"
BUILD="${BENCH_BUILD_DIR:-$root/build-gpu}"
MOE_RUN="$BUILD/bin/moe-run"
export PYTHONUNBUFFERED=1
# NVLink multicast stays off (the device docs ask it for every machine).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

mkdir -p "$OUT" || { echo "gpu_run.sh: cannot create OUT=$OUT" >&2; exit 1; }
rm -rf "$WORK" && mkdir -p "$WORK/raw" || { echo "gpu_run.sh: cannot create $WORK" >&2; exit 1; }
exec > >(tee "$OUT/log.txt") 2>&1

skipped() { [[ "$SKIP" == *" $1 "* ]]; }
# is_decode CFG: a decode config (its layer is marked "// bench: decode"):
# dropless only, forward only, no training plan (bench/make_plans.sh).
is_decode() { grep -qs '^// bench: decode' "$root"/bench/layers/"$1"_*.mlir; }
# limit CAP: the seconds a step may take: CAP, or less so that it ends by the
# deadline (at least 1: a step past the deadline fails at once, recorded).
limit() { local left=$(( DEADLINE - SECONDS )); (( left < $1 )) && echo $(( left > 1 ? left : 1 )) || echo "$1"; }
# step NAME NOTE COMMAND...: runs it, records exit status and seconds.
step() {
  local name="$1" note="$2"; shift 2
  local start=$SECONDS rc
  echo "=== $name ($(( SECONDS )) s into the run)"
  "$@"; rc=$?
  printf '%s\t%d\t%d\t%s\n' "$name" "$rc" "$((SECONDS - start))" "$note" >> "$WORK/steps.tsv"
  (( rc == 0 )) || echo "=== $name FAILED (exit $rc)"
  return $rc
}

# --- 0. what ran where -----------------------------------------------------
commit="${FLEX_COMMIT:-$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || true)}"
[[ -n "$commit" ]] || commit="unknown (set FLEX_COMMIT)"
[[ -n "$(git -C "$root" status --porcelain 2>/dev/null)" ]] && commit="$commit+dirty"
gpu="$(nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu --format=csv,noheader 2>/dev/null | head -1)"
echo "gpu: ${gpu:-none found}   commit: $commit"
python3 - "$WORK/info.json" "$commit" "$gpu" "$root/bench/plans/COMPILER_COMMIT" <<'EOF'
import datetime, json, subprocess, sys
path, commit, gpu, compiler_commit_file = sys.argv[1:5]
def run(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as error:
        return f"unavailable: {error}"
try:
    compiler_commit = open(compiler_commit_file).read().strip()
except OSError:
    compiler_commit = "unknown"
info = {
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit, "plans_compiled_at": compiler_commit,
    "gpu": gpu.split(",")[0].strip() if gpu else "none",
    "nvidia_smi": gpu, "nvcc": run(["nvcc", "--version"]).splitlines()[-1:] ,
    "host": run(["uname", "-r"]),
}
json.dump(info, open(path, "w"), indent=2)
EOF

# --- 1. PyTorch baseline (first: it needs no build) ---------------------------------------------------
if ! skipped torch; then
  configs_csv="$(echo $CONFIGS | tr ' ' ',')"
  step torch "" timeout "$(limit 240)" env FLEX_COMMIT="$commit" python3 -u bench/torch_moe_layer.py \
      --configs "$configs_csv" --iters "$ITERS" --out "$WORK/torch.json"
fi

# --- 2. build --------------------------------------------------------------
build() {
  cmake -S "$root" -B "$BUILD" -G Ninja -DFLEX_ENABLE_COMPILER=OFF \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
  ninja -C "$BUILD" -k 0 >> "$OUT/build.log" 2>&1  # -k 0: a broken test target still leaves moe-run built
  local rc=$?
  (( rc == 0 )) || tail -40 "$OUT/build.log"
  grep -iE "CUDA backend|FLEX_ENABLE_CUDA|nvcc" "$OUT/build.log" | head -5
  return $rc
}
skipped build || step build "" timeout "$(limit 330)" bash -c "$(declare -f build); OUT='$OUT' BUILD='$BUILD' root='$root' build"

# --- 3. tests --------------------------------------------------------------
if ! skipped ctest; then
  if [[ -d "$BUILD" ]]; then
    step ctest "" timeout "$(limit 200)" ctest --test-dir "$BUILD" -j 16 --timeout 120 --output-on-failure > "$OUT/ctest.log" 2>&1
    grep -E "tests passed|tests failed|Failed|\*\*\*" "$OUT/ctest.log" | tail -15
  else
    printf 'ctest\t1\t0\tno build directory\n' >> "$WORK/steps.tsv"
  fi
fi

# --- 4. Flex ---------------------------------------------------------------
flex_available() {
  [[ -x "$MOE_RUN" ]] || { echo "no $MOE_RUN (the build failed or was skipped)"; return 1; }
  # The help text in a variable first: `grep -q` would stop reading it at
  # the match, and moe-run's write into the closed pipe would fail the
  # pipeline under pipefail (Run 27: "no --device option" from a build
  # that has it).
  local help; help="$("$MOE_RUN" --help 2>&1)"
  grep -q -- "--device" <<< "$help" ||
    { echo "moe-run has no --device option yet (CUDA backend not in this commit)"; return 1; }
  ls bench/plans/*.json > /dev/null 2>&1 ||
    { echo "no bench/plans: run bench/make_plans.sh here and carry bench/plans"; return 1; }
  return 0
}
# moe_run KEY ARGS...: one moe-run, JSON to raw/KEY.json, stderr to raw/KEY.err.
moe_run() {
  local key="$1"; shift
  if (( SECONDS > DEADLINE )); then
    echo "  $key: not run, past the deadline ($DEADLINE s)"
    echo "{\"error\": \"not run: past the deadline of $DEADLINE s\"}" > "$WORK/raw/$key.json"
    return 1
  fi
  timeout "$(limit 180)" "$MOE_RUN" "$@" --device cuda --json > "$WORK/raw/$key.json" 2> "$WORK/raw/$key.err"
  local rc=$?
  (( rc == 0 )) || { echo "  $key: exit $rc: $(tail -c 300 "$WORK/raw/$key.err")"; rm -f "$WORK/raw/$key.json"; echo "{\"error\": \"exit $rc\"}" > "$WORK/raw/$key.json"; }
  return $rc
}
flex_runs() {
  local graph_flags=("") settle=()
  local help; help="$("$MOE_RUN" --help 2>&1)"
  grep -q -- "--graph" <<< "$help" && graph_flags+=("--graph")
  # Auto's exploring calls untimed: the rows time its settled choice.
  grep -q -- "--settle" <<< "$help" && settle=(--settle 64)
  local failed=0
  # Correct first: the small plans against the fp64 reference, on the GPU.
  for plan in bench/plans/check_*.train.json; do
    local name; name="$(basename "$plan" .train.json)"
    moe_run "check_$name" "$plan" --train --check --seed "$RANDOM" || failed=1
    echo "  check $name: $(python3 -c "import json,sys; c=json.load(open(sys.argv[1])).get('check',{}); print('pass' if c.get('pass') else 'FAIL', [(r['name'], r['relative_l2']) for r in c.get('results', [])])" "$WORK/raw/check_$name.json" 2>&1 | tail -c 400)"
  done
  # No CUDA device for moe-run (every check said so): the timings would fail
  # the same way, so stop here with the reason.
  if grep -qs "not available" "$WORK"/raw/check_*.err && ! grep -qs '"results"' "$WORK"/raw/check_*.json; then
    echo "moe-run --device cuda is unavailable: $(head -c 300 "$(ls "$WORK"/raw/check_*.err | head -1)")" | tee "$WORK/flex_note.txt"
    return 1
  fi
  for cfg in $CONFIGS; do
    local inputs="$WORK/inputs/$cfg" modes="$MODES" decode=0
    local input_plan="bench/plans/${cfg}_cap1.train.json"
    if is_decode "$cfg"; then
      modes="dropless" decode=1 input_plan="bench/plans/${cfg}_dropless.infer.json"
    fi
    # One set of random inputs per config, shared by every plan of it.
    python3 bench/make_inputs.py "$input_plan" "$inputs" --seed 1 || { failed=1; continue; }
    for mode in $modes; do
      for graph in "${graph_flags[@]}"; do
        local suffix=""; [[ -n "$graph" ]] && suffix="_graph"
        moe_run "flex_${cfg}_${mode}_fwd$suffix" "bench/plans/${cfg}_${mode}.infer.json" \
            --inputs "$inputs" --iters "$ITERS" "${settle[@]}" $graph || failed=1
        (( decode )) && continue  # decode rows: forward only
        moe_run "flex_${cfg}_${mode}_fwd_bwd$suffix" "bench/plans/${cfg}_${mode}.train.json" \
            --inputs "$inputs" --iters "$ITERS" --train "${settle[@]}" $graph || failed=1
      done
    done
    rm -rf "$inputs"
  done
  return $failed
}
if ! skipped flex; then
  if reason="$(flex_available)"; then
    step flex "" flex_runs
  else
    echo "Flex not run: $reason"
    echo "$reason" > "$WORK/flex_note.txt"
    printf 'flex\t0\t0\tskipped: %s\n' "$reason" >> "$WORK/steps.tsv"
  fi
fi

# --- 5. report (table last) --------------------------------------------------
python3 bench/report.py --work "$WORK" --out "$OUT" ||
  { echo "gpu_run.sh: report.py failed; raw results are in $WORK" >&2; exit 1; }
