#!/usr/bin/env bash
# The project's test command. Builds the test environment once (a real kube-apiserver
# and the reference CNI runtime; see README), then runs every test of the workspace.
# Privileged tests need root; under CI=1 they fail instead of skipping when not root.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/host-deps.sh
eval "$(scripts/testenv-build.sh --env)"
# The real helm, for the chart tests (built once from the Go module proxy, cached).
eval "$(scripts/helm-build.sh --env)"
# kubernetes-validate, for the chart tests (a venv from requirements-ci.txt, cached).
eval "$(scripts/pytools-build.sh --env)"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# Unused dependencies (cargo-machete, built once into the cache).
machete=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/cargo-machete-0.9.2
[[ -x $machete/bin/cargo-machete ]] || cargo install --quiet --locked cargo-machete@0.9.2 --root "$machete"
"$machete/bin/cargo-machete"
cargo test --workspace "$@"
