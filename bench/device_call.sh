# Sourced by the one-call GPU scripts (bench/gpu_validate.sh,
# gpu_layouts_profile.sh, gpu_staged.sh, gpu_quick_staged.sh): what each does
# first on the device machine.
#   device_call NAME [CMAKE_FLAG...] -- TARGET...
# Logs go to LOGS=/tmp/NAME; the printed log also straight to
# $OUT/NAME-log.txt (a call cut at its time limit still brings it back) and
# everything in LOGS into $OUT/NAME.tgz on exit (a call brings back few
# files). Prints the GPU and FLEX_COMMIT, configures the runtime alone
# (no compiler: the machine has no MLIR) for sm_90 into B (BUILD, default
# /tmp/NAME-build) with the extra CMake flags, builds the targets, and stops
# the script when the build fails. Run from the tree's root.
device_call() {
  local name=$1 flags=() targets=()
  shift
  while (($#)) && [[ $1 != -- ]]; do flags+=("$1"); shift; done
  (($#)) && shift
  targets=("$@")
  OUT="${OUT:-bench/out}"; B="${BUILD:-/tmp/$name-build}"; LOGS=/tmp/$name
  mkdir -p "$OUT" "$LOGS"
  exec > >(tee "$LOGS/$name-log.txt" "$OUT/$name-log.txt") 2>&1
  trap 'tar czf "$OUT/'"$name"'.tgz" -C "$LOGS" . 2>/dev/null' EXIT
  echo "gpu: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); commit ${FLEX_COMMIT:-?}"
  (cmake -S . -B "$B" -G Ninja -DFLEX_ENABLE_COMPILER=OFF -DCMAKE_CUDA_ARCHITECTURES=90 \
     -DCMAKE_BUILD_TYPE=Release "${flags[@]}" > /dev/null &&
   ninja -C "$B" "${targets[@]}" > "$LOGS/build.log" 2>&1) ||
    { echo "build FAILED"; tail -20 "$LOGS/build.log"; exit 1; }
  echo "built at ${SECONDS}s"
}
