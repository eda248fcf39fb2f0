#!/usr/bin/env bash
# Builds the binaries of a real single Kubernetes node for the node tests into a cache
# dir keyed by a hash of the sources, and prints that bin dir as the last line of stdout
# (same shape as scripts/testenv-build.sh). Instant when the cache is there.
#
#   scripts/node-build.sh          # -> .../kong-mesh-cni/node/<hash>/bin
#   eval "$(scripts/node-build.sh --env)"   # -> export KMC_NODE_BIN=...
#
# Layout of the bin dir:
#   etcd kube-apiserver kube-controller-manager kube-scheduler kubelet   v1.37.2 (testenv/node/go)
#   standin                     static stand-in for pause, the sidecar and the apps (CGO off)
#   containerd ctr containerd-shim-runc-v2   containerd $CONTAINERD_VERSION
# runc is Debian's (/usr/sbin/runc); the CNI plugins are the test env's (scripts/testenv-build.sh).
# Build output goes to stderr; only the result goes to stdout.
set -euo pipefail

CONTAINERD_VERSION=v2.2.1
# Must match k8s.io/kubernetes in testenv/node/go/go.mod.
KUBE_VERSION=v1.37.2

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$root/testenv/node/go

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "node-build: go not found in PATH" >&2; exit 1; }

hash=$(
	cd "$src"
	{
		find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | sort -z | xargs -0 sha256sum
		sha256sum "$root/scripts/node-build.sh" | cut -d' ' -f1
		go version
	} | sha256sum | cut -c1-16
)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/node
out=$cache/$hash

if [[ ! -e $out/.complete ]]; then
	mkdir -p "$cache"
	exec 9>"$cache/lock"
	flock 9
	if [[ ! -e $out/.complete ]]; then
		start=$(date +%s)
		echo "node-build: building $out (first build: many minutes)" >&2
		tmp=$(mktemp -d "$cache/.build-XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		export GOFLAGS="-trimpath -mod=readonly -buildvcs=false"
		(cd "$src" && CGO_ENABLED=0 go build -ldflags='-s -w' -o "$tmp/bin/" ./cmd/standin) >&2
		# Built from the module, not the repository, the binaries would report
		# v0.0.0-master: stamp the release as its own build does.
		v=k8s.io/component-base/version
		kube_ldflags="-s -w -X $v.gitVersion=$KUBE_VERSION -X $v.gitMajor=${KUBE_VERSION:1:1} -X $v.gitMinor=$(cut -d. -f2 <<<"$KUBE_VERSION")"
		kube_ldflags+=" -X $v.gitTreeState=clean"
		# One binary at a time: each link of a Kubernetes binary wants ~1-2 GiB.
		(cd "$src" && go build -ldflags='-s -w' -o "$tmp/bin/" ./cmd/etcd) >&2
		for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet; do
			(cd "$src" && go build -ldflags="$kube_ldflags" -o "$tmp/bin/" "./cmd/$cmd") >&2
		done
		# containerd's own go.mod decides its deps; no_btrfs: no cgo headers needed.
		pkgs=()
		for c in containerd ctr containerd-shim-runc-v2; do pkgs+=("github.com/containerd/containerd/v2/cmd/$c@$CONTAINERD_VERSION"); done
		GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp/bin" go install -tags no_btrfs -ldflags='-s -w' "${pkgs[@]}" >&2
		touch "$tmp/.complete"
		rm -rf "$out"
		mv "$tmp" "$out"
		trap - EXIT
		find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$hash" -exec rm -rf {} +
		echo "node-build: built in $(($(date +%s) - start))s" >&2
	fi
fi

if [[ ${1:-} == --env ]]; then
	echo "export KMC_NODE_BIN=$out/bin"
else
	echo "$out/bin"
fi
