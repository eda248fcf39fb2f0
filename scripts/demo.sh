#!/usr/bin/env bash
# The node demo, with a short report. Needs root.
#
#   scripts/demo.sh          the quick variant: a real API server, a node simulated in
#                            temporary directories (a real primary CNI chain, the installer),
#                            pods attached through the reference CNI runtime, traffic, a
#                            repair, the removal. Seconds once the test env is built.
#   scripts/demo.sh --node   the main one: a real node (kubelet, containerd v2 + runc, the
#                            control plane), our image built and our chart installed on it,
#                            a mesh pod and a plain pod started by the kubelet, the release
#                            deleted, the node taken down with the host as it was. About
#                            two minutes once the node's binaries are built.
# The first run builds the Go test environment (and, for --node, the node's binaries):
# many minutes, cached by hash afterwards.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) != 0 ]]; then
	echo "the demo creates network namespaces and a bridge: run it as root" >&2
	exit 1
fi
mode=()
case ${1:-} in
--node) mode=(--node); eval "$(scripts/node-build.sh --env)" ;;
"") ;;
*) echo "usage: $0 [--node]" >&2; exit 2 ;;
esac
eval "$(scripts/testenv-build.sh --env)"
cargo build --release -q -p kong-mesh-cni -p demo
exec target/x86_64-unknown-linux-gnu/release/kmc-demo "${mode[@]}" target/x86_64-unknown-linux-gnu/release/kong-mesh-cni
