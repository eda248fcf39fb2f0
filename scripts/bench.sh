#!/usr/bin/env bash
# Every benchmark of the workspace; each prints its figures (medians, p99, ratios
# against the baseline it names). Needs root. Figures from a shared, noisy machine:
# compare the numbers of one run side by side, not across runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/host-deps.sh
eval "$(scripts/testenv-build.sh --env)"
cargo bench --workspace "$@" 2>&1 | grep -v -E '^\s*(Compiling|Finished|Running|Executable)\b'
