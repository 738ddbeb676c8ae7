#!/usr/bin/env bash
# The test command: installs what is missing, builds, and runs every test
# (gtest unit tests and the lit suite) through ctest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
flex_build
cd "$FLEX_BUILD"
ctest --output-on-failure -j "$FLEX_JOBS" "$@"
