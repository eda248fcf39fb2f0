#!/usr/bin/env bash
# The one place that knows what this project needs from a Debian/Ubuntu host: every
# package any README command (demo, tests, benches, CI) runs a program from. Installs
# what is missing (root), or says what to install (not root). Idempotent; one dpkg
# query and nothing else when everything is there.
#
#   scripts/host-deps.sh           install what is missing
#   scripts/host-deps.sh --list    print the packages, one a line
#
# Every external program the project runs is listed in scripts/host-programs.txt with
# its package; `cargo test -p testkit --test host_deps` checks that each resolves
# (`dpkg -S`) to a package below, and that the sources run no program left off the list.
# Rust (rustup) and Go are not Debian packages here: the README's quick start names them.
set -euo pipefail

PACKAGES=(
	bash dash coreutils findutils grep mawk sed gzip tar apt dpkg # the scripts
	util-linux mount procps # unshare, setpriv, nsenter, flock, mount, sysctl, kill
	iproute2 iptables nftables # ip netns, veth; both iptables back ends; nft
	containernetworking-plugins # Debian's reference plugins (1.1.1) in /usr/lib/cni
	runc # the real node's OCI runtime (/usr/sbin/runc)
	busybox-static # sh, sleep and cat in our image (scripts/image-build.sh)
	clang # the eBPF programs, built from source by crates/ebpf/build.rs
	linux-libc-dev # the uapi headers (linux/bpf.h) the eBPF programs include
	gcc libc6-dev # a test builds a fake NSS module
	python3 python3-minimal python3-venv # kubernetes-validate's venv; python3 as a socket client in tests
	strace # fault injection slows fsync for the installer's lost-update test
	git # the image's revision label
)

if [[ ${1:-} == --list ]]; then
	printf '%s\n' "${PACKAGES[@]}"
	exit 0
fi

# One query for all: a package dpkg has never heard of is simply not printed.
declare -A installed=()
while read -r pkg status; do
	[[ $status == installed ]] && installed[$pkg]=1
done < <(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${PACKAGES[@]}" 2>/dev/null || true)
missing=()
for pkg in "${PACKAGES[@]}"; do
	[[ -n ${installed[$pkg]:-} ]] || missing+=("$pkg")
done
((${#missing[@]})) || exit 0

if [[ $(id -u) != 0 ]]; then
	echo "host-deps: missing Debian packages: ${missing[*]}" >&2
	echo "host-deps: install them as root: apt-get install ${missing[*]}" >&2
	exit 1
fi
echo "host-deps: installing ${missing[*]}" >&2
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when an install cannot find what it needs.
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "host-deps: installed in $(($(date +%s) - start))s" >&2
