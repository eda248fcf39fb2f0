#!/usr/bin/env bash
# Builds the kong-mesh-cni image without a container engine: an OCI image layout
# (https://github.com/opencontainers/image-spec/blob/main/image-layout.md) written
# directly with tar, gzip and sha256sum. The same image as deployments/Dockerfile:
# FROM scratch, our static release binary, Debian's static busybox for sh/sleep/cat.
#
#   scripts/image-build.sh [--binary PATH] [--out DIR]
#
#   --binary  the kong-mesh-cni binary to put in (default: cargo build --release into
#             target/image/cargo, once; cargo reuses the build when nothing changed)
#   --out     the layout's dir (default: target/image/kong-mesh-cni); replaced
#
# KMC_IMAGE_GZIP (1-9, default 9): the layer's compression level. The node tests put a
# 100 MB debug binary in and use 1 (1 s instead of 11 s of CPU per image); the image's
# content is the same, only its layer blob differs.
#
# Prints the layout's dir last. Load it with `skopeo copy oci:DIR docker-daemon:...` or
# push it with `skopeo copy oci:DIR docker://REGISTRY/kong-mesh-cni:TAG`.
# linux/amd64 only: the arm64 image comes from deployments/Dockerfile (TARGETARCH) on a
# machine with buildx; this script does not cross-build.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

binary="" out="$root/target/image/kong-mesh-cni"
while (($#)); do
	case $1 in
	--binary) binary=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	*) echo "image-build: unknown argument $1 (usage: $0 [--binary PATH] [--out DIR])" >&2; exit 2 ;;
	esac
done

if [[ -z $binary ]]; then
	# A target dir of its own: the tests run this script while `cargo test` holds the
	# lock of target/ (and a release build shares nothing with the debug one anyway).
	target_dir=${KMC_IMAGE_TARGET_DIR:-$root/target/image/cargo}
	cargo build --release --locked -p kong-mesh-cni --target-dir "$target_dir" >&2
	binary=$target_dir/x86_64-unknown-linux-gnu/release/kong-mesh-cni
fi
[[ -x $binary ]] || { echo "image-build: $binary is not an executable" >&2; exit 1; }

# Debian's busybox-static (scripts/host-deps.sh installs it): static, so it runs in a
# FROM scratch image.
busybox=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/bin/busybox$' || true)
[[ -x $busybox ]] || { echo "image-build: Debian's busybox-static is not installed (run scripts/host-deps.sh)" >&2; exit 1; }

version=$(awk -F'"' '/^\[workspace.package\]/ {p=1} p && /^version *=/ {print $2; exit}' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
# Reproducible: every timestamp is the commit's (or 0 outside git).
epoch=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 0)}
created=$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
install -D -m 0755 "$binary" "$rootfs/opt/cni/bin/kong-mesh-cni"
ln -s /opt/cni/bin/kong-mesh-cni "$rootfs/install-cni"
# On the PATH too: `kubectl exec ds/kong-mesh-cni -- kong-mesh-cni status`.
install -d -m 0755 "$rootfs/usr" "$rootfs/usr/local" "$rootfs/usr/local/bin"
ln -s /opt/cni/bin/kong-mesh-cni "$rootfs/usr/local/bin/kong-mesh-cni"
install -D -m 0755 "$busybox" "$rootfs/bin/busybox"
# What the charts run in the image: Kuma's `sh -c "sleep N && exec /install-cni"` and
# `cat /tmp/ready`, ours `/bin/sleep` and `/bin/cat`.
for cmd in sh sleep cat; do ln -s busybox "$rootfs/bin/$cmd"; done
mkdir -p -m 1777 "$rootfs/tmp"

tar --create --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" --format=posix \
	--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime -C "$rootfs" -f "$work/layer.tar" .
diff_id=$(sha256sum "$work/layer.tar" | cut -d' ' -f1)
level=${KMC_IMAGE_GZIP:-9}
[[ $level =~ ^[1-9]$ ]] || { echo "image-build: KMC_IMAGE_GZIP=$level is not a level from 1 to 9" >&2; exit 2; }
gzip -n "-$level" <"$work/layer.tar" >"$work/layer.tar.gz"

rm -rf "$out"
mkdir -p "$out/blobs/sha256"
# Stores a blob and prints its descriptor fields: digest size.
blob() {
	local digest size
	digest=$(sha256sum "$1" | cut -d' ' -f1)
	size=$(stat -c %s "$1")
	cp "$1" "$out/blobs/sha256/$digest"
	echo "$digest $size"
}
read -r layer_digest layer_size < <(blob "$work/layer.tar.gz")

labels=$(printf '"org.opencontainers.image.%s":"%s",' \
	title kong-mesh-cni \
	description "Kong Mesh CNI (Rust): installer, plugin and controller in one static binary" \
	version "$version" \
	revision "$revision" \
	source "https://github.com/Kong/kong-mesh-cni" \
	licenses "Apache-2.0" \
	created "$created")
printf '{"created":"%s","architecture":"amd64","os":"linux","config":{"User":"65532:65532","Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Entrypoint":["/install-cni"],"Labels":{%s}},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]},"history":[{"created":"%s","created_by":"scripts/image-build.sh"}]}' \
	"$created" "${labels%,}" "$diff_id" "$created" >"$work/config.json"
read -r config_digest config_size < <(blob "$work/config.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:%s","size":%s}],"annotations":{%s}}' \
	"$config_digest" "$config_size" "$layer_digest" "$layer_size" "${labels%,}" >"$work/manifest.json"
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
	"$manifest_digest" "$manifest_size" "$version" >"$out/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$out/oci-layout"

echo "image-build: $out: kong-mesh-cni:$version, layer $((layer_size / 1024)) KiB compressed" >&2
echo "$out"
