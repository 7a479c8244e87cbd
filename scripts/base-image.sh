#!/usr/bin/env bash
# Make the local base image (no image registry is reachable here): a minimal Debian bookworm
# made with debootstrap, imported into podman as $BASE_IMAGE. The root filesystem tarball is
# cached under $DEPLOY_CACHE so that later runs only import it (or do nothing if the image exists).
set -euo pipefail

BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm:latest}
DEPLOY_CACHE=${DEPLOY_CACHE:-/var/tmp/fedgradnorm-deploy}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TARBALL="$DEPLOY_CACHE/bookworm-minbase.tar"

if podman image exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE: present"
    exit 0
fi
mkdir -p "$DEPLOY_CACHE"
if [[ ! -s "$TARBALL" ]]; then
    rootfs=$(mktemp -d "$DEPLOY_CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "base image: debootstrap bookworm into $rootfs"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$DEPLOY_CACHE/debootstrap.log" 2>&1 ||
        { tail -20 "$DEPLOY_CACHE/debootstrap.log"; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -cf "$TARBALL.tmp" .
    mv "$TARBALL.tmp" "$TARBALL"
fi
echo "base image: importing $TARBALL as $BASE_IMAGE"
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' \
    "$TARBALL" "$BASE_IMAGE" >/dev/null
