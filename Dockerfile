# One image for both services: `fedgradnorm aggregator` and `fedgradnorm edge-node`.
#
# On any machine with a registry and the internet (torch as the CPU build from the PyTorch CPU wheel
# index, never a multi-GB CUDA build; everything else from PyPI):
#
#   docker build -t ghcr.io/fedgradnorm/fedgradnorm:0.1.0 .      # or podman build
#
# Without the internet, from wheels in the build context (what `make image`, scripts/build-image.sh,
# does: it fills build/wheels/ and builds on a locally made Debian base image):
#
#   podman build --build-arg WHEELS=local --build-arg BASE=localhost/bookworm:latest -t fedgradnorm:0.1.0 .
#
# Build arguments: BASE, any Debian bookworm image (its python3 is 3.11); WHEELS, "index" (default)
# or "local" (build/wheels/torch, build/wheels/deps, build/wheels/requirements.txt); TORCH_INDEX_URL,
# the index torch comes from (a mirror of https://download.pytorch.org/whl/cpu); PIP_INDEX_URL, the
# index of the other dependencies (default PyPI).
ARG BASE=docker.io/library/debian:bookworm-slim
ARG WHEELS=index

# --- python: python3 and an empty virtual environment ------------------------------------------------
FROM ${BASE} AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fedgradnorm
ENV PATH=/opt/fedgradnorm/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# --- deps-index: torch (CPU) and the dependencies from package indexes (the default) ---------------
FROM python AS deps-index
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_INDEX_URL=https://pypi.org/simple
# torch in a layer of its own: it is the big one and changes least. The exact local version +cpu
# exists only on the CPU index, so no CUDA build can come in; its own dependencies come from either.
RUN pip install --index-url "$TORCH_INDEX_URL" --extra-index-url "$PIP_INDEX_URL" "torch==2.13.0+cpu"
# The project's runtime dependencies from pyproject.toml (torch is already there), and the build
# backend for the project's wheel, so that this layer is rebuilt only when pyproject.toml changes.
COPY pyproject.toml /src/pyproject.toml
RUN python3 -c "import tomllib; deps = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('torch')))" >/tmp/requirements.txt \
    && pip install --index-url "$PIP_INDEX_URL" -r /tmp/requirements.txt "setuptools>=68" wheel \
    && rm /tmp/requirements.txt

# --- deps-local: the same from build/wheels, no index (WHEELS=local; scripts/build-image.sh) -------
FROM python AS deps-local
COPY build/wheels/torch/ /wheels/torch/
RUN pip install --no-index --find-links /wheels/torch "torch==2.13.0+cpu"
COPY build/wheels/deps/ /wheels/deps/
COPY build/wheels/requirements.txt /wheels/requirements.txt
RUN pip install --no-index --find-links /wheels/torch --find-links /wheels/deps -r /wheels/requirements.txt \
        "setuptools>=68" wheel \
    && rm -rf /wheels

# --- deps: one of the two, by WHEELS --------------------------------------------------------------
FROM deps-${WHEELS} AS deps

# --- build: the project's own wheel (no index: the build backend is in the environment) -----------
FROM deps AS build
COPY pyproject.toml README.md /src/
COPY proto/ /src/proto/
COPY fedgradnorm/ /src/fedgradnorm/
RUN pip wheel --no-index --no-deps --no-build-isolation --wheel-dir /dist /src

# --- runtime: python3, the virtual environment, a non-root user -------------------------------------
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
    && groupadd --gid 10001 fedgradnorm \
    && useradd --uid 10001 --gid 10001 --home-dir /var/lib/fedgradnorm --no-create-home \
        --shell /usr/sbin/nologin fedgradnorm \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/fedgradnorm /var/cache/fedgradnorm
COPY --from=deps /opt/fedgradnorm /opt/fedgradnorm
COPY --from=build /dist/ /tmp/dist/
RUN /opt/fedgradnorm/bin/pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check /tmp/dist/*.whl \
    && rm -rf /tmp/dist \
    && /opt/fedgradnorm/bin/python3 -c "import torch; assert torch.version.cuda is None, torch.__version__" \
    && /opt/fedgradnorm/bin/python3 -c "import fedgradnorm.cli, fedgradnorm.services.aggregator.server, fedgradnorm.services.edge_node.main"
# State (aggregator-state.pt, edge identity and personal model) under /var/lib/fedgradnorm and the
# generated synthetic data under /var/cache/fedgradnorm: mount volumes there (the Kubernetes
# manifests do), and a writable /tmp when the root filesystem is read-only.
ENV PATH=/opt/fedgradnorm/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/fedgradnorm \
    MPLCONFIGDIR=/tmp/matplotlib \
    FEDGRADNORM_CACHE_DIR=/var/cache/fedgradnorm \
    FEDGRADNORM_LOG_FORMAT=json
WORKDIR /var/lib/fedgradnorm
LABEL org.opencontainers.image.title="fedgradnorm" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.description="FedGradNorm aggregator and edge node (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
USER 10001:10001
# gRPC of the aggregator, its metrics, an edge node's metrics.
EXPOSE 50051 9464 9465
ENTRYPOINT ["fedgradnorm"]
CMD ["--help"]
