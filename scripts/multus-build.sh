#!/usr/bin/env bash
# Builds Multus CNI (gopkg.in/k8snetworkplumbingwg/multus-cni.v4, from the Go module
# proxy, pinned below) into a cache dir keyed by its version and the Go version, and
# prints that bin dir as the last line of stdout. The Multus node tests put its thin
# plugin (multus), or its thick shim (multus-shim) and daemon (multus-daemon), in front
# of the node's bridge network. Instant when cached; the first build takes minutes.
#
#   scripts/multus-build.sh                   # -> .../kong-mesh-cni/multus/<key>/bin
#   eval "$(scripts/multus-build.sh --env)"   # -> export KMC_MULTUS_BIN=...
#
# Layout of the bin dir: multus (thin plugin), multus-daemon and multus-shim (thick).
# The node's API server gets the NetworkAttachmentDefinition CRD from testenv/crds/.
# A separate script from node-build.sh so that a Multus bump does not rebuild
# Kubernetes (and the reverse). Build output goes to stderr.
set -euo pipefail

MULTUS_VERSION=v4.2.2
MODULE=gopkg.in/k8snetworkplumbingwg/multus-cni.v4

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "multus-build: go not found in PATH" >&2; exit 1; }

key=$(printf '%s\n%s\n%s\n' "$MULTUS_VERSION" "$(go version)" "$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/multus
out=$cache/$key

if [[ ! -e $out/.complete ]]; then
	mkdir -p "$cache"
	exec 9>"$cache/lock"
	flock 9
	if [[ ! -e $out/.complete ]]; then
		start=$(date +%s)
		echo "multus-build: building multus $MULTUS_VERSION into $out (first build: minutes)" >&2
		tmp=$(mktemp -d "$cache/.build-XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		# `go install pkg@version` would ask the proxy for the module's version list
		# (deprecation check), which it refuses for this module: download the exact
		# version and build it with its own go.mod and go.sum (its exact dependencies).
		moddir=$(GOFLAGS=-mod=mod go mod download -json "$MODULE@$MULTUS_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
		[[ -d $moddir ]] || { echo "multus-build: go mod download $MODULE@$MULTUS_VERSION gave no dir" >&2; exit 1; }
		cp -r "$moddir" "$tmp/src"
		chmod -R u+w "$tmp/src"
		# The zip holds vendor/modules.txt only: build from the module cache instead.
		rm -rf "$tmp/src/vendor"
		# The version stamp is what upstream's hack/build-go.sh sets.
		ldflags="-s -w -X $MODULE/pkg/multus.version=$MULTUS_VERSION"
		for c in multus multus-daemon multus-shim; do
			(cd "$tmp/src" && GOFLAGS="-trimpath -buildvcs=false -mod=readonly" CGO_ENABLED=0 \
				go build -ldflags="$ldflags" -o "$tmp/bin/" "./cmd/$c") >&2
		done
		rm -rf "$tmp/src"
		touch "$tmp/.complete"
		rm -rf "$out"
		mv "$tmp" "$out"
		trap - EXIT
		find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
		echo "multus-build: built in $(($(date +%s) - start))s" >&2
	fi
fi

if [[ ${1:-} == --env ]]; then
	echo "export KMC_MULTUS_BIN=$out/bin"
else
	echo "$out/bin"
fi
