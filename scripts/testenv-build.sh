#!/usr/bin/env bash
# Builds the integration-test environment (testenv/go: k8s-testenv = etcd +
# kube-apiserver v1.37.2, cni-runtime = reference libcni; plus the upstream reference
# CNI plugins) into a cache dir keyed by a hash of the sources, and prints that bin
# dir as the last line of stdout. Instant when the cache is there; the first build
# compiles kube-apiserver and takes many minutes on 2 cores.
#
#   scripts/testenv-build.sh          # -> .../kong-mesh-cni/testenv/<hash>/bin
#   eval "$(scripts/testenv-build.sh --env)"   # -> export KMC_TESTENV_BIN=...
#
# Layout of the bin dir:
#   k8s-testenv, cni-runtime    our Go harnesses
#   plugins/                    containernetworking/plugins $PLUGINS_VERSION (CNI 1.1.0: STATUS, GC)
#   primaries/                  primary CNIs of the install guide's environments that
#                               build here, for tests/primaries.rs: the flannel meta
#                               plugin ($FLANNEL_VERSION of containernetworking/plugins,
#                               CNI <= 0.4.0)
# Debian's containernetworking-plugins (1.1.1, no STATUS/GC) stay in /usr/lib/cni.
# Build output goes to stderr; only the result goes to stdout.
set -euo pipefail

PLUGINS_VERSION=v1.10.0
PLUGINS=(main/bridge main/ptp main/loopback main/macvlan ipam/host-local ipam/static meta/portmap meta/tuning meta/bandwidth meta/firewall meta/sbr meta/vrf)
# flannel left containernetworking/plugins after v0.9.x (flannel-io/cni-plugin, which
# the module proxy does not serve).
FLANNEL_VERSION=v0.9.1

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=$root/testenv/go

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "testenv-build: go not found in PATH" >&2; exit 1; }

# The key covers everything that decides the output: our sources, go.sum, this
# script (plugin version and list) and the Go version.
hash=$(
	cd "$src"
	{
		find . -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) -print0 | sort -z | xargs -0 sha256sum
		sha256sum "$root/scripts/testenv-build.sh" | cut -d' ' -f1
		go version
	} | sha256sum | cut -c1-16
)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/testenv
out=$cache/$hash

if [[ ! -e $out/.complete ]]; then
	mkdir -p "$cache"
	# One builder at a time (two test binaries, or CI and a developer).
	exec 9>"$cache/lock"
	flock 9
	if [[ ! -e $out/.complete ]]; then
		start=$(date +%s)
		echo "testenv-build: building $out (first build: many minutes)" >&2
		tmp=$(mktemp -d "$cache/.build-XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		# GOMODCACHE and GOCACHE stay at their defaults so they persist between builds.
		# -buildvcs=false: the binaries must not depend on the state of the git tree.
		export GOFLAGS="-trimpath -mod=readonly -buildvcs=false"
		(cd "$src" && go build -ldflags='-s -w' -o "$tmp/bin/" ./cmd/k8s-testenv ./cmd/cni-runtime) >&2
		# go install pkg@version builds with the plugins' own go.mod: exactly v1.10.0's deps.
		pkgs=()
		for p in "${PLUGINS[@]}"; do pkgs+=("github.com/containernetworking/plugins/plugins/$p@$PLUGINS_VERSION"); done
		GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp/bin/plugins" go install -ldflags='-s -w' "${pkgs[@]}" >&2
		GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp/bin/primaries" go install -ldflags='-s -w' \
			"github.com/containernetworking/plugins/plugins/meta/flannel@$FLANNEL_VERSION" >&2
		touch "$tmp/.complete"
		rm -rf "$out"
		mv "$tmp" "$out"
		trap - EXIT
		# Builds for older sources are dead weight (~170 MB each); Go's own caches
		# make a rebuild of any of them quick. The newest three stay: a test binary of
		# another worktree (another branch's sources) may be running from one.
		ls -1dt "$cache"/*/ | tail -n +4 | xargs -r rm -rf
		echo "testenv-build: built in $(($(date +%s) - start))s" >&2
	fi
fi

if [[ ${1:-} == --env ]]; then
	echo "export KMC_TESTENV_BIN=$out/bin"
else
	echo "$out/bin"
fi
