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
#   scripts/demo.sh --node --multus
#                            the same in the chart's default mode (OpenShift's): thin
#                            Multus v4.2.2 as the node's CNI, our plugin not chained but
#                            called by Multus for mesh pods through the kuma-cni NAD.
#   scripts/demo.sh --node --network kindnet|flannel
#                            on kind's cluster network (kindnet's ptp) or K3D's (flanneld
#                            leasing the node's podCIDR, the flannel plugin -> bridge).
# The first run builds the Go test environment (and, for --node, the node's binaries):
# many minutes, cached by hash afterwards.
# `--iptables-backend nftables` (or KMC_IPTABLES_BACKEND=nftables) runs the quick variant
# with the native nf_tables backend; the default is the plugin's own (auto).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ $(id -u) != 0 ]]; then
	echo "the demo creates network namespaces and a bridge: run it as root" >&2
	exit 1
fi
scripts/host-deps.sh
# The rest of the arguments go to kmc-demo, which checks them.
if [[ ${1:-} == --node ]]; then
	eval "$(scripts/node-build.sh --env)"
	# Multus and flanneld, for --multus and --network flannel (built once, cached).
	eval "$(scripts/cnis-build.sh --env)"
fi
eval "$(scripts/testenv-build.sh --env)"
cargo build --release -q -p kong-mesh-cni -p demo
exec target/x86_64-unknown-linux-gnu/release/kmc-demo "$@" target/x86_64-unknown-linux-gnu/release/kong-mesh-cni
