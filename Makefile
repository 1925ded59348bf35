# Targets shared by the README and .ci/run. `make help` lists them.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: help setup test test-slow test-gpu lint bench reproduce-cpu clean

help:  ## list the targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / {printf "  %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/kfcrun: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	@touch $@

setup: $(BIN)/kfcrun  ## create .venv and install kfcrun with its test tools

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

reproduce-cpu: setup  ## CPU-sized reproduction on data/cifar10 or KFCRUN_CIFAR10_DIR (about an hour)
	bash scripts/reproduce_cpu.sh

clean:  ## remove build artifacts (keeps .venv and outputs/)
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
