# replandscape: `make demo` runs the whole pipeline offline on CPU; `make test` runs the tests.
# Both create or reuse .venv (scripts/bootstrap.sh installs what is missing, idempotently).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_NO_ADVISORY_WARNINGS := 1
export TOKENIZERS_PARALLELISM := false
export OMPI_ALLOW_RUN_AS_ROOT := 1
export OMPI_ALLOW_RUN_AS_ROOT_CONFIRM := 1
export OMPI_MCA_rmaps_base_oversubscribe := 1
DEMO_OUT ?= outputs/demo
PYTEST_ARGS ?=

.PHONY: help setup demo demo-slurm test test-fast lint format bench gpu-check cluster-start cluster-stop clean

help:
	@echo "make setup   - create/refresh .venv (and Debian packages when root)"
	@echo "make demo    - run the whole pipeline on the bundled data (offline, CPU) into $(DEMO_OUT)"
	@echo "make test    - run the test suite (starts the local Slurm cluster when needed)"
	@echo "make lint    - ruff + mypy"
	@echo "make bench   - run the benchmarks (see BENCHMARKS.md)"
	@echo "make gpu-check - on one CUDA GPU (< 10 min): every CUDA path checked, Llama-3-8B-shape speeds; table for BENCHMARKS.md, JSON in outputs/gpu_check.json"

setup:
	@bash scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/replandscape demo --out $(DEMO_OUT)

demo-slurm: setup
	bash slurm/cluster.sh start
	eval "$$(bash slurm/cluster.sh env)" && \
		$(VENV)/bin/replandscape demo --out $(DEMO_OUT)-slurm cluster=local-slurm

test: setup
	$(PY) -m pytest -q -ra $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -q -ra -m "not slow and not slurm" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests analysis jobs benchmarks
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format src tests analysis jobs benchmarks

gpu-check: setup
	$(PY) benchmarks/gpu_check.py --json outputs/gpu_check.json

cluster-start:
	bash slurm/cluster.sh start

cluster-stop:
	bash slurm/cluster.sh stop

clean:
	rm -rf outputs .pytest_cache .ruff_cache .mypy_cache
