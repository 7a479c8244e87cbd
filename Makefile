# fedgradnorm: every target creates .venv and installs what it needs by itself.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/main

.PHONY: help venv run test test-busy test-faults lint fmt proto bench bench-peers reproduce clean

help:
	@echo "make run    - the main job: FedGradNorm vs FedRep on synthetic MTFL, landmark loss x100 (loopback, no downloads)"
	@echo "make test   - the test suite"
	@echo "make test-busy - the test suite beside two CPU burners (a busy machine)"
	@echo "make lint   - ruff (incl. the layering rule) and mypy --strict"
	@echo "make proto  - regenerate gRPC stubs from proto/"
	@echo "make test-faults - the long tests: fault loops, heavy abuse and retry checks (CI runs them)"
	@echo "make bench  - benchmarks -> docs/benchmarks.md"
	@echo "make bench-peers - Flower 1.42 side by side on the same workload -> docs/benchmarks.md (installs flwr)"
	@echo "make reproduce - the paper's experiments -> docs/results.md"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU wheel of torch lies on local disk; pin it first so nothing pulls a CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)
	$(BIN)/fedgradnorm demo --out $(RUN_DIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# `make test` while two busy loops take CPU from it; the loops are killed however pytest ends.
test-busy: $(STAMP)
	@burners=(); \
	for i in 1 2; do sh -c 'while :; do :; done' & burners+=($$!); done; \
	trap 'kill $${burners[@]} 2>/dev/null; wait $${burners[@]} 2>/dev/null' EXIT; \
	echo "CPU burners: $${burners[*]}"; \
	$(BIN)/python -m pytest -q

# ruff (style, and the layering: the library core never imports grpc, the services or the CLI),
# mypy --strict over fedgradnorm/ (library, services, CLI).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

proto: $(STAMP)
	$(BIN)/python -m fedgradnorm.protogen

# The long tests (repeated SIGKILLs, partitions, heavy abuse and retry checks); `make test` runs the rest.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q -m long

# Benchmarks of the system against its limits; rewrites docs/benchmarks.md from one run.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --doc docs/benchmarks.md

# Flower 1.42's deployment runtime side by side with fedgradnorm on the round-overhead workload, in one
# run (benchmarks/peers.py); rewrites only the "Side by side with Flower" block of docs/benchmarks.md.
# Flower lives in a venv of its own, .venv-peers (flwr from the package index, the local CPU torch wheel;
# its grpcio/protobuf pins differ from the project's). No package index: one "skipped" line, exit 0.
# Not part of `make test`.
PEERS_VENV := .venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_PIP_LOG := runs/peers-pip.log
PEERS_ARGS ?=

bench-peers: $(STAMP)
	@mkdir -p runs; \
	if [ ! -f $(PEERS_STAMP) ]; then \
	  rm -rf $(PEERS_VENV); \
	  $(PY) -m venv $(PEERS_VENV) || exit 1; \
	  if ! { $(PEERS_VENV)/bin/pip install --retries 2 --timeout 30 torch==2.13.0 && \
	         $(PEERS_VENV)/bin/pip install --retries 2 --timeout 30 flwr==1.42.0 numpy; } > $(PEERS_PIP_LOG) 2>&1; then \
	    rm -rf $(PEERS_VENV); \
	    echo "skipped: pip could not install flwr==1.42.0 into $(PEERS_VENV) (package index unreachable?); pip's output: $(PEERS_PIP_LOG)"; \
	    exit 0; \
	  fi; \
	  touch $(PEERS_STAMP); \
	fi; \
	$(BIN)/python -m benchmarks.peers --doc docs/benchmarks.md $(PEERS_ARGS)

# The paper's experiments on synthetic data; rewrites docs/results.md and docs/img/results-*.png.
# 57 runs, about 8-10 CPU-hours (4-5 h with the default two runs at a time); resumable: finished runs in
# runs/reproduce are kept (--fresh retrains them, --only PREFIX,... trains some experiments).
reproduce: $(STAMP)
	$(BIN)/python -m experiments.reproduce --doc docs/results.md

clean:
	rm -rf $(VENV) $(PEERS_VENV) runs .pytest_cache .ruff_cache

# --- deployment (deploy/, Dockerfile, docs/operations.md) ---------------------------------------
.PHONY: image dashboard dashboard-png test-deploy

# The container image of both services, with podman (base image made locally by debootstrap).
image: $(STAMP)
	scripts/build-image.sh

# deploy/grafana/fedgradnorm.json and its ConfigMap deploy/k8s/40-grafana-dashboard.yaml, from one source.
dashboard: $(STAMP)
	$(BIN)/python scripts/dashboard.py

# deploy/k8s/29-prometheus-rules.yaml and deploy/prometheus/fedgradnorm-prometheusrule.yaml, from
# deploy/prometheus/fedgradnorm-rules.yml (tests/test_alert_rules.py fails when they are out of date).
.PHONY: alerts
alerts: $(STAMP)
	$(BIN)/python scripts/alert_rules.py

# A local Prometheus on 127.0.0.1:9090 scraping the by-hand services, with the shipped rules
# (scripts/local_prometheus.py --help; e.g. make prometheus PROMETHEUS_ARGS="--edge-node m=127.0.0.1:9465").
.PHONY: prometheus
prometheus:
	$(PY) scripts/local_prometheus.py $(PROMETHEUS_ARGS)

# docs/img/dashboard.png: the dashboard's panels drawn from a real Prometheus scraping a loopback run.
dashboard-png: $(STAMP)
	$(BIN)/python scripts/render_dashboard.py --out docs/img/dashboard.png

# Build the image and run the kustomized RadCom manifests (tests/deploy/overlay: deploy/overlays/kind)
# with `podman kube play`, adding a pod and an edge node outside the pod network at runtime.
test-deploy: $(STAMP)
	$(BIN)/python tests/deploy/podman_deploy.py

# deploy/k8s/01-tls-secrets.yaml: the DEVELOPMENT PKI (private keys public, in git; 10 years) the manifests mount.
.PHONY: k8s-secrets
k8s-secrets: $(STAMP)
	$(BIN)/fedgradnorm certs --k8s-secrets deploy/k8s/01-tls-secrets.yaml --development --days 3650
