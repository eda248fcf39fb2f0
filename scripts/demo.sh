#!/usr/bin/env bash
# The node demo: the whole Kong Mesh CNI on a simulated node (a real API server, a real
# primary CNI chain, the installer, pods, traffic, a repair, the removal), with a short
# report. Needs root. The first run builds the test environment (minutes); then seconds.
# `scripts/demo.sh --iptables-backend nftables` (or KMC_IPTABLES_BACKEND=nftables) runs it
# with the native nf_tables backend; the default is the plugin's own (auto).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) != 0 ]]; then
	echo "the demo creates network namespaces and a bridge: run it as root" >&2
	exit 1
fi
eval "$(scripts/testenv-build.sh --env)"
cargo build --release -q -p kong-mesh-cni -p demo
exec target/x86_64-unknown-linux-gnu/release/kmc-demo "$@" target/x86_64-unknown-linux-gnu/release/kong-mesh-cni
