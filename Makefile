# Targets shared by the README and .ci/run. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help setup test test-slow test-gpu lint bench bench-omega bench-peers bench-gpu reproduce-cpu clean

help:  ## list the targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/kfcrun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,cluster]"
	@touch $@

setup: $(BIN)/kfcrun  ## create .venv and install kfcrun with its test tools and the Slurm launcher

test: setup  ## run the default test suite (CPU, no downloads; skips `slow` and `gpu` tests)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: setup  ## run the slow tests (real CIFAR-10 training, minutes)
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-gpu: setup  ## run the tests that need a CUDA device
	$(BIN)/python -m pytest -m gpu $(PYTEST_ARGS)

lint: setup  ## ruff check, ruff format --check, import-linter contracts, mypy
	$(BIN)/ruff check kfcrun tests scripts
	$(BIN)/ruff format --check kfcrun tests scripts
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: setup  ## step-time benchmark: SGD vs KFC-pre (writes outputs/bench_step.json)
	$(BIN)/python scripts/bench_step.py

bench-omega: setup  ## conv Omega per layer: row lags vs the patch GEMM (writes outputs/bench_omega.json)
	$(BIN)/python scripts/bench_omega.py

bench-peers: setup  ## factor statistics: kfcrun vs ASDL, curvlinops, BackPACK (installs the `bench` extra)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python scripts/bench_peers.py

bench-gpu: setup  ## bench_step and bench_peers on CUDA (writes outputs/*_gpu.json)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python scripts/bench_step.py --device cuda --out outputs/bench_step_gpu.json
	$(BIN)/python scripts/bench_peers.py --device cuda --out outputs/bench_peers_gpu.json

reproduce-cpu: setup  ## CPU-sized reproduction on data/cifar10 or KFCRUN_CIFAR10_DIR (about an hour)
	bash scripts/reproduce_cpu.sh

clean:  ## remove build artifacts (keeps .venv and outputs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
