#!/usr/bin/env bash
# Builds the real Helm CLI (helm.sh/helm/v3, from the Go module proxy, pinned below)
# into a cache dir keyed by its version and the Go version, and prints the binary's
# path as the last line of stdout. The chart tests render and lint the chart with it
# and compare its output with `kong-mesh-cni manifests`. Instant when cached; the
# first build takes a few minutes on 2 cores.
#
#   scripts/helm-build.sh                   # -> .../kong-mesh-cni/helm/<key>/helm
#   eval "$(scripts/helm-build.sh --env)"   # -> export KMC_HELM=...
#
# A separate script from testenv-build.sh so that a Helm bump does not rebuild the
# API server (and the reverse). Build output goes to stderr.
set -euo pipefail

HELM_VERSION=v3.22.0

command -v go >/dev/null || PATH=$PATH:/usr/local/go/bin
command -v go >/dev/null || { echo "helm-build: go not found in PATH" >&2; exit 1; }

key=$(printf '%s\n%s\n' "$HELM_VERSION" "$(go version)" | sha256sum | cut -c1-16)
cache=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/helm
out=$cache/$key

if [[ ! -x $out/helm ]]; then
	mkdir -p "$cache"
	exec 9>"$cache/lock"
	flock 9
	if [[ ! -x $out/helm ]]; then
		start=$(date +%s)
		echo "helm-build: building helm $HELM_VERSION into $out (first build: minutes)" >&2
		tmp=$(mktemp -d "$cache/.build-XXXXXX")
		trap 'rm -rf "$tmp"' EXIT
		# go install pkg@version builds with Helm's own go.mod (its exact dependencies).
		GOFLAGS="-trimpath -buildvcs=false" GOBIN="$tmp" CGO_ENABLED=0 \
			go install -ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
			"helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
		rm -rf "$out"
		mv "$tmp" "$out"
		trap - EXIT
		find "$cache" -mindepth 1 -maxdepth 1 -type d ! -name "$key" -exec rm -rf {} +
		echo "helm-build: built in $(($(date +%s) - start))s" >&2
	fi
fi

if [[ ${1:-} == --env ]]; then
	echo "export KMC_HELM=$out/helm"
else
	echo "$out/helm"
fi
