#!/usr/bin/env bash
# Make the Debian base root filesystem tarball both image scripts start from, once:
# debootstrap (minbase) of $SUITE with python3, python3-venv and ca-certificates, plus the
# host's CA bundle, as $CACHE/base-$SUITE.tar. Nothing is done when the tarball exists.
# Prints the tarball's path on stdout. Needs root and debootstrap.
# Used by deploy/image/test-image.sh and deploy/image/sandbox-image.sh.
set -euo pipefail

CACHE=${TANGRAM_IMAGE_CACHE:-/var/cache/tangram-image}
SUITE=${TANGRAM_IMAGE_SUITE:-bookworm}          # bookworm's python3 is 3.11
MIRROR=${TANGRAM_IMAGE_MIRROR:-http://deb.debian.org/debian}
tarball="$CACHE/base-$SUITE.tar"

mkdir -p "$CACHE"
if [ ! -s "$tarball" ]; then
    echo "base-rootfs: debootstrap $SUITE (python3, python3-venv) into $CACHE" >&2
    root="$CACHE/root-$SUITE"
    rm -rf "$root"
    # minbase: no init, no apt recommends; passwd (useradd) is in it. python3-venv
    # brings ensurepip, which `python3 -m venv` needs.
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        "$SUITE" "$root" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    # The host's CA bundle, so that pip inside a build trusts what the host trusts
    # (a TLS-intercepting proxy in front of PyPI, as on the test machines).
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
    tar -C "$root" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
fi
echo "$tarball"
