#!/usr/bin/env bash
# Build the container executor's test image as an OCI layout, once:
#
#   $CACHE/sandbox-oci:bookworm = the Debian base root (deploy/image/base-rootfs.sh)
#                                 + a venv at /opt/venv with pytest and pytest-xdist
#                                 + /work owned by nobody (65534), PATH with the venv first
#
# No registry and no container engine: `umoci new` makes an empty image, the base tarball
# is unpacked into its bundle, pip runs in a chroot of it (in a mount namespace of its
# own, so /proc and /dev go away with it) and `umoci repack` makes that a layer.
# Nothing is done when the tag exists already. Needs root, umoci and debootstrap (for a
# missing base tarball; both installed with apt-get when missing) and PyPI (or the pip
# index the environment names).
# Usage: deploy/image/sandbox-image.sh   (or `make sandbox-image`); prints the reference.
set -euo pipefail
cd "$(dirname "$0")/../.."

CACHE=${TANGRAM_IMAGE_CACHE:-/var/cache/tangram-image}
SUITE=${TANGRAM_IMAGE_SUITE:-bookworm}
OUT=${TANGRAM_SANDBOX_OCI:-$CACHE/sandbox-oci}
TAG=$SUITE
PACKAGES=${TANGRAM_SANDBOX_PACKAGES:-pytest pytest-xdist}

say() { echo "[sandbox-image] $*" >&2; }
if [ "$(id -u)" != 0 ]; then
    echo "sandbox-image: needs root (chroot, umoci unpack with owners)" >&2
    exit 1
fi
missing=()
command -v umoci >/dev/null 2>&1 || missing+=(umoci)
[ -s "$CACHE/base-$SUITE.tar" ] || command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 \
        || { echo "sandbox-image: ${missing[*]} missing and no apt-get to install them" >&2; exit 1; }
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

if umoci stat --image "$OUT:$TAG" >/dev/null 2>&1; then
    echo "oci:$OUT:$TAG"
    exit 0
fi

mkdir -p "$CACHE"
tarball=$(deploy/image/base-rootfs.sh)
work=$(mktemp -d "$CACHE/sandbox-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "unpacking $tarball into a new image"
umoci init --layout "$work/oci"
umoci new --image "$work/oci:$TAG"
umoci unpack --image "$work/oci:$TAG" "$work/bundle" >/dev/null
root="$work/bundle/rootfs"
tar -C "$root" -xf "$tarball"

say "pip install $PACKAGES into /opt/venv (chroot)"
cp /etc/resolv.conf "$root/etc/resolv.conf"   # name resolution for pip, removed below
unshare --mount --propagation private -- sh -euc '
    root=$1; shift
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    chroot "$root" /usr/bin/python3 -m venv /opt/venv
    chroot "$root" /opt/venv/bin/pip install -q --no-cache-dir "$@"
' sh "$root" $PACKAGES > "$work/pip.log" 2>&1 || { tail -30 "$work/pip.log" >&2; exit 1; }
: > "$root/etc/resolv.conf"
mkdir -p "$root/work"
chown 65534:65534 "$root/work"

say "repacking"
umoci repack --image "$work/oci:$TAG" "$work/bundle"
umoci config --image "$work/oci:$TAG" \
    --config.env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env LANG=C.UTF-8 \
    --config.workingdir /work --config.user 65534:65534 --config.cmd python3
umoci gc --layout "$work/oci"
rm -rf "$OUT"
mv "$work/oci" "$OUT"
say "built $OUT:$TAG"
echo "oci:$OUT:$TAG"
