# alignpipe — every target creates .venv and installs the project on first use.
#
#   make sft dpo                 SFT, then DPO, on the embedded default (EXP=toy)
#   make sft rm ppo              SFT, reward model, PPO
#   make eval                    compare a stage with its parent (ARGS="stage.target=ppo")
#   make sft dpo EXP=toy_qlora   another experiment bundle from conf/experiment/
#   make dpo ARGS="stage.beta=0.05 force=true"
#   make test                    the test suite (fast tier); make test-all adds end-to-end runs
#
# Scale-out: LAUNCH=accelerate ACC=ddp|fsdp|zero2|zero3|single NPROC=8 runs the same stage
# under `accelerate launch` with conf/accelerate/$(ACC).yaml.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned: an unpinned torch pulls a multi-GB CUDA build even on CPU-only machines. On a
# GPU box PyPI's torch==2.13.0 wheel is the CUDA build; set TORCH_PIP_ARGS to use another
# index (e.g. a CPU-only wheel index) if you need one.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
EXTRAS ?= dev,optuna
EXP ?= toy
ARGS ?=
SWEEP ?= dpo_beta
LAUNCH ?= python
ACC ?= ddp
NPROC ?=
PYTEST_ARGS ?=

ifeq ($(LAUNCH),accelerate)
  RUN = $(BIN)/accelerate launch --config_file conf/accelerate/$(ACC).yaml \
        $(if $(NPROC),--num_processes $(NPROC),) -m stages
else
  RUN = $(BIN)/python -m stages
endif

.PHONY: setup sft rm ppo dpo eval sweep compare frontier test test-slow test-all bench lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

sft rm ppo dpo eval: $(VENV)/.installed
	$(RUN) stage=$@ experiment=$(EXP) $(ARGS)

sweep: $(VENV)/.installed
	$(BIN)/python -m stages -m +sweep=$(SWEEP) experiment=$(EXP) $(ARGS)

compare: $(VENV)/.installed
	$(BIN)/python -m stages.compare --runs runs/$(EXP) $(ARGS)

frontier: $(VENV)/.installed
	$(BIN)/python -m stages.frontier --experiment $(EXP) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/ppo_vs_trl.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs outputs multirun wandb .pytest_cache
