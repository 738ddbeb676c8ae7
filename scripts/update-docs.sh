#!/usr/bin/env bash
# Regenerates docs/generated/ from the ODS definitions (after changing a .td).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
flex_build
for doc in Dialects/MoeDialect Dialects/MoeRTDialect MoePasses MoeRTPasses ConversionPasses; do
  cp "$FLEX_BUILD/docs/$doc.md" "$FLEX_ROOT/docs/generated/$(basename "$doc").md"
done
echo "docs/generated/ is current"
