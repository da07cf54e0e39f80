# medtl: `make demo` and `make test` set up everything on a fresh machine.
#
#   make demo   create .venv if missing (the pinned stack and Horovod), then synth -> ingest -> train
#               -> evaluate; the README gives the time of the last measured run
#   make test   the same .venv plus the test tools (pytest, Chromium, kubectl), then the whole suite,
#               slow tests included. The 2-rank tests also run under mpirun; as root they pass OpenMPI's
#               --allow-run-as-root themselves (elsewhere: OMPI_ALLOW_RUN_AS_ROOT=1 and
#               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1).
#
# Versions are pinned in setup.cfg (pip) and here (Horovod, built from source against
# the installed TensorFlow; see docs/stack.md).

PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOROVOD_VERSION := 0.28.1
# Gloo and MPI, as in production: `horovodrun --gloo` for local runs, `mpirun` (OpenMPI) as the
# MPIJob's launcher runs it (k8s/base/train.yaml); the tests run both.
HOROVOD_BUILD_ENV := HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITH_MPI=1 \
	HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
# Horovod's build: every command needs these (OpenMPI's headers and mpicxx before the build, mpirun
# after it).
BUILD_APT_PACKAGES := cmake g++ gcc make libopenmpi-dev openmpi-bin
# Tests only: headless Chromium renders report.html in the report test (tests/test_evaluate_cli.py).
TEST_APT_PACKAGES := chromium
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: all demo test test-fast reliability venv test-venv horovod build-deps test-deps system-deps image clean

all: test

# Debian packages, installed only when missing (root or sudo).
SUDO = $$( [ "$$(id -u)" = 0 ] || echo sudo )
APT_INSTALL = $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq

# What Horovod's build needs (make demo and make test).
build-deps:
	@missing=""; for tool in cmake g++ gcc make mpicxx mpirun; do command -v $$tool >/dev/null || missing=yes; done; \
	if [ -n "$$missing" ]; then echo "installing Debian packages: $(BUILD_APT_PACKAGES)"; \
		$(APT_INSTALL) $(BUILD_APT_PACKAGES); fi

# What only the tests need (make test). kubectl (with kustomize v5 built in) builds the overlays for
# `medtl k8s render` and the k8s/ tests; Debian's own kubernetes-client is too old (kustomize v2), so it
# comes from the kubectl package of a Kubernetes apt source.
test-deps:
	@command -v chromium >/dev/null || { echo "installing Debian packages: $(TEST_APT_PACKAGES)"; \
		$(APT_INSTALL) $(TEST_APT_PACKAGES); }
	@command -v kubectl >/dev/null || { $(SUDO) apt-get install -y -qq kubectl || \
		{ echo "kubectl >= 1.27 is needed by the k8s tests: install it from your Kubernetes apt source"; exit 1; }; }

system-deps: build-deps test-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

# Reinstall when the pinned dependencies change. The test tools only for the commands that run tests.
$(VENV)/.installed: setup.cfg setup.py pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# Horovod compiles against the TensorFlow in the venv (docs/stack.md gives the time; then pip's wheel cache).
# The marker is named after what was built: a venv from before MPI (marker .horovod, Gloo only) has no
# .horovod-gloo-mpi, so its Horovod is checked and rebuilt. pip's wheel cache is keyed by version, not by
# the HOROVOD_* flags: a cached Gloo-only wheel is dropped from it before the rebuild.
HOROVOD_CHECK := import horovod.tensorflow as h; assert h.gloo_built(), 'Horovod built without Gloo'; \
	assert h.mpi_built(), 'Horovod built without MPI'
HOROVOD_PIP = $(HOROVOD_BUILD_ENV) $(BIN)/pip install -q --no-build-isolation
$(VENV)/.horovod-gloo-mpi: $(VENV)/.installed | build-deps
	$(BIN)/python -c "$(HOROVOD_CHECK)" 2>/dev/null || \
		{ $(HOROVOD_PIP) horovod==$(HOROVOD_VERSION) && $(BIN)/python -c "$(HOROVOD_CHECK)" 2>/dev/null; } || \
		{ $(BIN)/pip cache remove horovod 2>/dev/null; \
		  $(HOROVOD_PIP) --force-reinstall --no-deps horovod==$(HOROVOD_VERSION); }
	$(BIN)/python -c "$(HOROVOD_CHECK)"
	touch $@

venv: $(VENV)/.horovod-gloo-mpi
test-venv: $(VENV)/.horovod-gloo-mpi $(VENV)/.installed-test
horovod: $(VENV)/.horovod-gloo-mpi

# The container image for clusters (needs a Docker engine; see docs/kubernetes.md).
IMAGE ?= medtl:$(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' medtl/__init__.py)
image:
	docker build -t $(IMAGE) .

demo: venv
	$(BIN)/medtl demo --out $(DEMO_OUT)

# The whole suite, slow end-to-end tests (real CLI, 2-rank horovodrun and mpirun, headless Chromium) and the
# reliability suite included, on 2 pytest-xdist workers (a test file stays on one worker, so its
# module fixtures are built once), longest files first (tests/conftest.py's FILE_SECONDS; xdist would otherwise
# reorder files by test count). It ends with the reliability summary table.
PYTEST_WORKERS ?= 2
PYTEST_XDIST = -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25
test: test-venv test-deps
	MEDTL_RELIABILITY_REPORT=$(RELIABILITY_SUMMARY) $(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

# Unit tests only (seconds to a few minutes).
test-fast: test-venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info

# The reliability suite alone (faults, bad inputs, leaks; docs/testing.md), then docs/reliability.md
# refreshed from its summary table. `make test` runs the same suite and prints the table, but leaves
# docs/reliability.md alone: CI must not edit tracked files.
RELIABILITY_SUMMARY ?= .reliability-summary.md
RELIABILITY_DOC ?= docs/reliability.md
reliability: test-venv
	MEDTL_RELIABILITY_REPORT=$(RELIABILITY_SUMMARY) $(BIN)/python -m pytest $(PYTEST_XDIST) tests/reliability $(PYTEST_ARGS)
	$(if $(RELIABILITY_DOC),$(BIN)/python tests/reliability/write_doc.py $(RELIABILITY_SUMMARY) $(RELIABILITY_DOC))
