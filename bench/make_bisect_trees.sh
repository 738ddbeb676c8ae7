#!/usr/bin/env bash
# The source trees bench/gpu_bisect.sh builds side by side on the device
# machine: for each REV, bench/bisect/<REV>/ holds what a runtime-only build
# of flex-gemm-bench needs (git archive of the build files, include, lib,
# tools), and bench/bisect/revs lists them in order. The folder is
# git-ignored; carry it with the call (about 3 MB per tree).
#
#   bench/make_bisect_trees.sh REV...      (here, before the call)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
(( $# > 0 )) || { echo "usage: bench/make_bisect_trees.sh REV..." >&2; exit 2; }
rm -rf bench/bisect && mkdir -p bench/bisect
for rev in "$@"; do
  short=$(git rev-parse --short=12 "$rev")
  mkdir -p "bench/bisect/$short"
  git archive "$short" CMakeLists.txt cmake include lib tools |
    tar -x -C "bench/bisect/$short"
  echo "$short $(git log -1 --format=%s "$short" | cut -c1-70)" >> bench/bisect/revs
done
du -sh bench/bisect
cat bench/bisect/revs
