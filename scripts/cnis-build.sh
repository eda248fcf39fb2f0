#!/usr/bin/env bash
# Builds the cluster networks the node tests put on a real node besides the bridge,
# from the Go module proxy at pinned versions, into a cache dir keyed by those versions
# and the Go version, and prints that bin dir as the last line of stdout. Instant when
# cached; the first build takes minutes.
#
#   scripts/cnis-build.sh                   # -> .../kong-mesh-cni/cnis/<key>/bin
#   eval "$(scripts/cnis-build.sh --env)"   # -> export KMC_CNIS_BIN=...
#
# Layout of the bin dir:
#   multus, multus-daemon, multus-shim   Multus v4 (thin plugin; thick daemon and shim),
#                                        the chart's default mode (node_multus)
#   flanneld                             Flannel's node agent, K3D's cluster network
#                                        (node_flannel; its CNI plugin is testenv's)
# A separate script from node-build.sh so that a bump here does not rebuild Kubernetes
# (and the reverse). Build output goes to stderr.
set -euo pipefail

MULTUS_VERSION=v4.2.2
MULTUS_MODULE=gopkg.in/k8snetworkplumbingwg/multus-cni.v4
FLANNEL_VERSION=v0.28.4
FLANNEL_MODULE=github.com/flannel-io/flannel

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "cnis-build: go not found in PATH" >&2; exit 1; }

key=$(printf '%s\n%s\n%s\n%s\n' "$MULTUS_VERSION" "$FLANNEL_VERSION" "$(go version)" "$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/cnis
out=$cache/$key

# The module MODULE@VERSION's source, writable, in DIR. `go install pkg@version` would
# ask the proxy for the module's version list (deprecation check), which it refuses for
# these modules: download the exact version and build it with its own go.mod and go.sum.
source_of() {
	local module=$1 version=$2 dir=$3 moddir
	moddir=$(GOFLAGS=-mod=mod go mod download -json "$module@$version" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
	[[ -d $moddir ]] || { echo "cnis-build: go mod download $module@$version gave no dir" >&2; exit 1; }
	cp -r "$moddir" "$dir"
	chmod -R u+w "$dir"
	# The zips hold vendor/modules.txt only: build from the module cache instead.
	rm -rf "$dir/vendor"
}

if [[ ! -e $out/.complete ]]; then
	mkdir -p "$cache"
	exec 9>"$cache/lock"
	flock 9
	if [[ ! -e $out/.complete ]]; then
		start=$(date +%s)
		echo "cnis-build: building multus $MULTUS_VERSION and flanneld $FLANNEL_VERSION into $out (first build: minutes)" >&2
		tmp=$(mktemp -d "$cache/.build-XXXXXX")
		trap 'rm -rf "$tmp"' EXIT

		source_of "$MULTUS_MODULE" "$MULTUS_VERSION" "$tmp/multus"
		# The version stamp is what upstream's hack/build-go.sh sets.
		ldflags="-s -w -X $MULTUS_MODULE/pkg/multus.version=$MULTUS_VERSION"
		for c in multus multus-daemon multus-shim; do
			(cd "$tmp/multus" && GOFLAGS="-trimpath -buildvcs=false -mod=readonly" CGO_ENABLED=0 \
				go build -ldflags="$ldflags" -o "$tmp/bin/" "./cmd/$c") >&2
		done

		source_of "$FLANNEL_MODULE" "$FLANNEL_VERSION" "$tmp/flannel"
		# Without its Tencent Cloud VPC backend: that SDK's module is refused by the proxy
		# (403), and no test here runs on Tencent Cloud. Its UDP backend needs cgo.
		sed -i '/flannel\/pkg\/backend\/tencentvpc"/d' "$tmp/flannel/main.go"
		(cd "$tmp/flannel" && GOFLAGS="-trimpath -buildvcs=false -mod=mod" CGO_ENABLED=1 \
			go build -ldflags="-s -w -X $FLANNEL_MODULE/pkg/version.Version=$FLANNEL_VERSION" -o "$tmp/bin/flanneld" .) >&2

		rm -rf "$tmp/multus" "$tmp/flannel"
		touch "$tmp/.complete"
		rm -rf "$out"
		mv "$tmp" "$out"
		trap - EXIT
		find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
		echo "cnis-build: built in $(($(date +%s) - start))s" >&2
	fi
fi

if [[ ${1:-} == --env ]]; then
	echo "export KMC_CNIS_BIN=$out/bin"
else
	echo "$out/bin"
fi
