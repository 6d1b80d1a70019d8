# alignpipe — every target creates .venv and installs the project on first use.
#
#   make sft dpo                 SFT, then DPO, on the embedded default (EXP=toy)
#   make sft rm ppo              SFT, reward model, PPO
#   make eval                    compare a stage with its parent (ARGS="stage.target=ppo")
#   make sft dpo EXP=toy_qlora   another experiment bundle from conf/experiment/
#   make dpo ARGS="stage.beta=0.05 force=true"
#   make test                    the test suite (fast tier); make test-all adds end-to-end runs
#
#   make sweep SWEEP=dpo_beta    a named Hydra multirun from conf/sweep/ (dpo_beta, ppo_kl, dpo_optuna)
#   make compare                 table + PNGs of every finished run of EXP (runs/$(EXP)/_compare/)
#   make frontier                DPO-beta + PPO-kl_coef sweeps -> docs/frontier.png + .md
#
# Scale-out: LAUNCH=accelerate ACC=ddp|fsdp|zero2|zero3|single NPROC=8 runs the same stage
# under `accelerate launch` with conf/accelerate/$(ACC).yaml (NPROC: processes, one per GPU;
# default: the config's num_processes). On a machine without GPUs, ACC=ddp runs NPROC CPU
# processes over gloo. Slurm: ARGS="hydra/launcher=slurm ..." with `make sweep`, see README.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned: an unpinned torch pulls a multi-GB CUDA build even on CPU-only machines. On a
# GPU box PyPI's torch==2.13.0 wheel is the CUDA build; set TORCH_PIP_ARGS to use another
# index (e.g. a CPU-only wheel index) if you need one.
TORCH_VERSION ?= 2.13.0
TORCH_PIP_ARGS ?=
# optuna: Optuna sweeps (conf/sweep/dpo_optuna.yaml); slurm: the submitit Slurm launcher.
EXTRAS ?= dev,optuna,slurm
EXP ?= toy
ARGS ?=
SWEEP ?= dpo_beta
LAUNCH ?= python
ACC ?= ddp
NPROC ?=
PYTEST_ARGS ?=

ifeq ($(LAUNCH),accelerate)
  ifeq ($(wildcard conf/accelerate/$(ACC).yaml),)
    $(error ACC=$(ACC): no conf/accelerate/$(ACC).yaml (one of: $(basename $(notdir $(wildcard conf/accelerate/*.yaml)))))
  endif
  RUN = $(BIN)/accelerate launch --config_file conf/accelerate/$(ACC).yaml \
        $(if $(NPROC),--num_processes $(NPROC),) -m stages
else ifeq ($(LAUNCH),python)
  RUN = $(BIN)/python -m stages
else
  $(error LAUNCH=$(LAUNCH): use LAUNCH=python (default) or LAUNCH=accelerate)
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

# Sweeps run one job after another in this process (or as Slurm jobs with
# ARGS="hydra/launcher=slurm"); each job gets runs/$(EXP)/<stage>/<its overrides>/.
sweep: $(VENV)/.installed
	@test -f conf/sweep/$(SWEEP).yaml || { echo "SWEEP=$(SWEEP): no conf/sweep/$(SWEEP).yaml (one of: $(basename $(notdir $(wildcard conf/sweep/*.yaml))))" >&2; exit 2; }
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
