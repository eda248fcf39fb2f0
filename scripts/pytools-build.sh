#!/usr/bin/env bash
# The Python tools the tests use (requirements-ci.txt: kubernetes-validate, which checks
# rendered chart objects against the Kubernetes schemas, offline), in a venv kept in the
# cache and reused until requirements-ci.txt changes. Prints the tool's path as the last
# line of stdout, or `export KMC_KUBERNETES_VALIDATE=...` with --env.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
requirements=$root/requirements-ci.txt

python3 -c 'import ensurepip, venv' 2>/dev/null || { echo "pytools-build: python3 with venv is needed (scripts/host-deps.sh installs it)" >&2; exit 1; }

venv=${XDG_CACHE_HOME:-$HOME/.cache}/kong-mesh-cni/ci-venv
stamp=$venv/.requirements-$(sha256sum "$requirements" | cut -c1-16)
if [[ ! -e $stamp ]]; then
	[[ -x $venv/bin/pip ]] || python3 -m venv "$venv" >&2
	"$venv/bin/pip" install -q --disable-pip-version-check -r "$requirements" >&2
	touch "$stamp"
fi
tool=$venv/bin/kubernetes-validate
if [[ ${1:-} == --env ]]; then
	echo "export KMC_KUBERNETES_VALIDATE=$tool"
else
	echo "$tool"
fi
