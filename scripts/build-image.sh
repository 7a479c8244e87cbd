#!/usr/bin/env bash
# Build the fedgradnorm image with podman from the Dockerfile.
#
#   scripts/build-image.sh            # tags fedgradnorm:<version> and ghcr.io/fedgradnorm/fedgradnorm:<version>
#
# This is the offline build of this machine (no registry, no PyTorch index): on a machine with both,
# `docker build .` or `podman build .` needs nothing of this (see the Dockerfile). The second tag is the
# name the manifests of deploy/k8s use, so the local image can be loaded into a cluster as it is
# (`kind load docker-image`, or `podman save` + `kind load image-archive`).
#
# 1. the base image (BASE_IMAGE, default localhost/bookworm:latest) is made locally if missing
#    (scripts/base-image.sh, debootstrap; cached under DEPLOY_CACHE);
# 2. build/wheels/torch gets the CPU wheel of torch 2.13.0 and its dependencies, build/wheels/deps the
#    project's other dependencies, all as cp311 manylinux wheels fetched by this machine's pip
#    (torch comes from the local disk); the Dockerfile installs from these folders with no index
#    (--build-arg WHEELS=local);
# 3. podman build, with layers cached between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
PYTHON=${PYTHON:-.venv/bin/python}
VERSION=$("$PYTHON" -c "import tomllib; print(tomllib.load(open('pyproject.toml', 'rb'))['project']['version'])")
IMAGE=${IMAGE:-fedgradnorm:$VERSION}
# The registry-qualified name of deploy/k8s (and of .github/workflows/image.yml for the owner fedgradnorm).
PUBLISHED_IMAGE=${PUBLISHED_IMAGE:-ghcr.io/fedgradnorm/fedgradnorm:$VERSION}
BASE_IMAGE=${BASE_IMAGE:-localhost/bookworm:latest}
export DEPLOY_CACHE=${DEPLOY_CACHE:-/var/tmp/fedgradnorm-deploy}
WHEELS=build/wheels

if [[ -z "${CONTAINERS_CONF:-}" ]]; then
    # runc (crun fails on cgroups here) and ulimits root may set; see docs/operations.md.
    mkdir -p "$DEPLOY_CACHE"
    export CONTAINERS_CONF="$DEPLOY_CACHE/containers.conf"
    printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n[engine]\nruntime = "runc"\n' \
        >"$CONTAINERS_CONF"
fi

BASE_IMAGE=$BASE_IMAGE scripts/base-image.sh

platforms=()
for tag in manylinux_2_36 manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 \
    manylinux_2_17 manylinux2014 manylinux_2_12 manylinux2010 manylinux_2_5 manylinux1 linux; do
    platforms+=(--platform "${tag}_x86_64")
done
download() {
    local out
    if ! out=$("$PIP" download --quiet --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
        "${platforms[@]}" "$@" 2>&1); then
        echo "$out" >&2
        echo "pip download failed" >&2
        return 1
    fi
}
mkdir -p "$WHEELS/torch" "$WHEELS/deps"
if ! compgen -G "$WHEELS/torch/torch-2.13.0+cpu-*.whl" >/dev/null; then
    echo "wheels: torch 2.13.0 (CPU) and its dependencies -> $WHEELS/torch"
    download -d "$WHEELS/torch" "torch==2.13.0+cpu"
fi
"$PYTHON" - >"$WHEELS/requirements.txt" <<'PY'
import tomllib

deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print("\n".join(d for d in deps if not d.startswith("torch")))
PY
echo "wheels: project dependencies -> $WHEELS/deps"
download -d "$WHEELS/deps" -r "$WHEELS/requirements.txt" "setuptools>=68" wheel
compgen -G "$WHEELS/torch/torch-2.13.0+cpu-*.whl" >/dev/null || { echo "no CPU torch wheel in $WHEELS/torch" >&2; exit 1; }
if compgen -G "$WHEELS/torch/nvidia_*" >/dev/null; then
    echo "a CUDA dependency slipped into $WHEELS/torch" >&2
    exit 1
fi

echo "podman build -> $IMAGE, $PUBLISHED_IMAGE (base $BASE_IMAGE, wheels from $WHEELS)"
build_log="$DEPLOY_CACHE/build.log"
if ! podman build --layers --build-arg "BASE=$BASE_IMAGE" --build-arg WHEELS=local \
    -t "$IMAGE" -t "$PUBLISHED_IMAGE" -f Dockerfile . >"$build_log" 2>&1; then
    tail -60 "$build_log"
    echo "podman build failed; full log: $build_log" >&2
    exit 1
fi
echo "podman build: $(grep -c -- '--> Using cache' "$build_log") of $(grep -c 'STEP [0-9]' "$build_log") steps cached (log: $build_log)"
podman run --rm "$IMAGE" --help >/dev/null
echo "built $IMAGE and $PUBLISHED_IMAGE"
