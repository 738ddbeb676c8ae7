# Sourced by the one-call GPU scripts (bench/gpu_*.sh): moe_run_row times
# one variant of a plan with moe-run on the device and prints one line: the
# label, the variant that ran, the forward (and backward) median and each
# step's mean.
#   moe_run_row LABEL PLAN VARIANT [NAME=VALUE...] [-- MOE-RUN FLAGS...]
# PLAN is bench/plans/PLAN.json; NAME=VALUE pairs are the run's environment
# (FLEX_WGMMA=0, ...). Needs MOE_RUN (the binary) and ROW_LOGS (where
# LABEL.json and LABEL.err go); ROW_ITERS timed calls (default 10; 30 for
# VARIANT auto, whose first calls measure the candidates: with 10, call 47's
# D1 row reported one of them, auto_exploring true). Under auto, a moe-run
# with --settle also leaves those calls untimed.
moe_run_row() {
  local label=$1 plan=$2 variant=$3
  shift 3
  local env=() flags=()
  while (($#)); do
    [[ $1 == -- ]] && { shift; flags=("$@"); break; }
    env+=("$1")
    shift
  done
  local settle=() help
  help="$("$MOE_RUN" --help 2>&1)" # (grep -q on a pipe: SIGPIPE under pipefail)
  [[ $variant == auto ]] && grep -q -- --settle <<< "$help" && settle=(--settle 64)
  env "${env[@]}" timeout 90 "$MOE_RUN" "bench/plans/$plan.json" --device cuda \
    --iters "${ROW_ITERS:-$([[ $variant == auto ]] && echo 30 || echo 10)}" \
    --variant "$variant" --json "${settle[@]}" "${flags[@]}" \
    > "$ROW_LOGS/$label.json" 2> "$ROW_LOGS/$label.err" ||
    { echo "$label failed: $(tail -2 "$ROW_LOGS/$label.err")"; return; }
  python3 - "$ROW_LOGS/$label.json" "$label" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
f, b = d["forward"], d.get("backward")
steps = lambda p: [(x["op"], round(x["mean_us"], 1)) for x in p["steps"]]
print(f"{sys.argv[2]:24s} {d['variant'][:26]:26s}"
      + (" (still exploring)" if d.get("auto_exploring") else "")
      + f" fwd {f['median_us']:8.1f} us"
      + (f" bwd {b['median_us']:8.1f} us" if b else ""), steps(f),
      steps(b) if b else "")
PY
}
