# One image for both services: `fedgradnorm aggregator` and `fedgradnorm edge-node`.
#
# Build it with `make image` (scripts/build-image.sh), which first fills the build context's
# build/wheels/ with the CPU wheel of torch (from the local disk, never a CUDA build) and the other
# dependencies' wheels, so the build itself installs Python packages without any index:
#
#   podman build --build-arg BASE=localhost/bookworm:latest -t fedgradnorm:0.1.0 .
#
# BASE is any Debian bookworm image (its python3 is 3.11); no registry is needed when it is local.
ARG BASE=docker.io/library/debian:bookworm-slim

# --- deps: a virtual environment with torch (CPU) and the dependencies (changes rarely) -------------
FROM ${BASE} AS deps
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/fedgradnorm
ENV PATH=/opt/fedgradnorm/bin:$PATH \
    PIP_NO_INDEX=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch in a layer of its own: it is the big one and changes least.
COPY build/wheels/torch/ /wheels/torch/
RUN pip install --find-links /wheels/torch "torch==2.13.0+cpu"
# The project's runtime dependencies (pyproject.toml's, written out by scripts/build-image.sh), so
# that this layer is rebuilt only when they change.
COPY build/wheels/deps/ /wheels/deps/
COPY build/wheels/requirements.txt /wheels/requirements.txt
RUN pip install --find-links /wheels/torch --find-links /wheels/deps -r /wheels/requirements.txt

# --- build: the project's own wheel ------------------------------------------------------------------
FROM deps AS build
COPY pyproject.toml README.md /src/
COPY proto/ /src/proto/
COPY services/ /src/services/
COPY fedgradnorm/ /src/fedgradnorm/
RUN pip wheel --find-links /wheels/deps --no-deps --wheel-dir /dist /src

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
      org.opencontainers.image.description="FedGradNorm aggregator and edge node (CPU)"
USER 10001:10001
# gRPC of the aggregator, its metrics, an edge node's metrics.
EXPOSE 50051 9464 9465
ENTRYPOINT ["fedgradnorm"]
CMD ["--help"]
