# alignpipe — every target creates .venv and installs the project on first use.
#
#   make sft dpo                 SFT, then DPO, on the embedded default (EXP=toy)
#   make sft rm ppo              SFT, reward model, PPO
#   make sft kto                 SFT, then KTO (replies labelled desirable / undesirable)
#   make eval                    compare a stage with its parent (ARGS="stage.target=ppo")
#   make export                  merge a stage into one plain model (ARGS="stage.target=dpo")
#   make sft dpo EXP=toy_qlora   another experiment bundle from conf/experiment/
#   make dpo ARGS="stage.beta=0.05 force=true"
#   make test                    the test suite (fast tier); make test-all adds end-to-end runs
#   make soak SOAK_CYCLES=20     kill -9 / rerun `make sft dpo`, compare with an uninterrupted run
#
#   make sweep SWEEP=dpo_beta    a named Hydra multirun from conf/sweep/ (dpo_beta, ppo_kl, kto_beta, dpo_optuna)
#   make compare                 table + PNGs of every finished run of EXP (runs/$(EXP)/_compare/)
#   make frontier                every method's sweep -> runs/$(EXP)/_frontier/frontier{,_proxy}.png + .md
#                                (ARGS="--out docs" regenerates the committed docs/frontier.*)
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
SOAK_CYCLES ?= 20
SOAK_SEED ?= 0

# ARGS, PYTEST_ARGS, EXP and SWEEP reach the recipes through the environment, raw ($(value)
# skips make's own expansion), never pasted into a shell line: ARGS='x=`cmd`' must not run
# cmd. stages/make_args.py splits ARGS like a shell (quotes group words) and execs.
export ALIGNPIPE_ARGS = $(value ARGS)
export ALIGNPIPE_PYTEST_ARGS = $(value PYTEST_ARGS)
export ALIGNPIPE_EXP = $(value EXP)
export ALIGNPIPE_SWEEP = $(value SWEEP)
export ALIGNPIPE_SOAK_CYCLES = $(value SOAK_CYCLES)
export ALIGNPIPE_SOAK_SEED = $(value SOAK_SEED)
WITH_ARGS = $(BIN)/python -m stages.make_args ALIGNPIPE_ARGS --
WITH_PYTEST_ARGS = $(BIN)/python -m stages.make_args ALIGNPIPE_PYTEST_ARGS --

ifeq ($(LAUNCH),accelerate)
  ifeq ($(wildcard conf/accelerate/$(ACC).yaml),)
    $(error ACC=$(ACC): no conf/accelerate/$(ACC).yaml (one of: $(basename $(notdir $(wildcard conf/accelerate/*.yaml)))))
  endif
  # NPROC goes into the shell line: digits only.
  ifneq ($(subst 0,,$(subst 1,,$(subst 2,,$(subst 3,,$(subst 4,,$(subst 5,,$(subst 6,,$(subst 7,,$(subst 8,,$(subst 9,,$(value NPROC))))))))))),)
    $(error NPROC=$(value NPROC): must be a number of processes, e.g. NPROC=8)
  endif
  RUN = $(BIN)/accelerate launch --config_file conf/accelerate/$(ACC).yaml \
        $(if $(NPROC),--num_processes $(NPROC),) -m stages
else ifeq ($(LAUNCH),python)
  RUN = $(BIN)/python -m stages
else
  $(error LAUNCH=$(LAUNCH): use LAUNCH=python (default) or LAUNCH=accelerate)
endif

# One target per stage: conf/stage/<name>.yaml, which tests/test_registry.py checks against
# the stage registry (stages/registry.py). A new stage's YAML is all `make <name>` needs.
STAGE_TARGETS := $(sort $(basename $(notdir $(wildcard conf/stage/*.yaml))))

.PHONY: setup $(STAGE_TARGETS) sweep compare frontier test test-slow test-all soak soak-disk-full bench bench-ppo-scale bench-overhead bench-memory gpu-check lint format clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

$(STAGE_TARGETS): $(VENV)/.installed
	$(WITH_ARGS) $(RUN) stage=$@ "experiment=$$ALIGNPIPE_EXP"

# Sweeps run one job after another in this process (or as Slurm jobs with
# ARGS="hydra/launcher=slurm"); each job gets runs/$(EXP)/<stage>/<its overrides>/.
sweep: $(VENV)/.installed
	@test -f "conf/sweep/$$ALIGNPIPE_SWEEP.yaml" || { echo "SWEEP=$$ALIGNPIPE_SWEEP: no conf/sweep/$$ALIGNPIPE_SWEEP.yaml (one of: $(basename $(notdir $(wildcard conf/sweep/*.yaml))))" >&2; exit 2; }
	$(WITH_ARGS) $(BIN)/python -m stages -m "+sweep=$$ALIGNPIPE_SWEEP" "experiment=$$ALIGNPIPE_EXP"

compare: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python -m stages.compare --runs "runs/$$ALIGNPIPE_EXP"

frontier: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python -m stages.frontier --experiment "$$ALIGNPIPE_EXP"

test: $(VENV)/.installed
	$(WITH_PYTEST_ARGS) $(BIN)/python -m pytest -m "not slow"

test-slow: $(VENV)/.installed
	$(WITH_PYTEST_ARGS) $(BIN)/python -m pytest -m slow

test-all: $(VENV)/.installed
	$(WITH_PYTEST_ARGS) $(BIN)/python -m pytest

# Kill -9 soak of `make sft dpo` against an uninterrupted run (bench/soak.py): SOAK_CYCLES
# kills at random moments of training, checkpoint saving and evaluation; ARGS = extra Hydra
# overrides for every run (e.g. ARGS="stage.max_steps=24 stage.logging_steps=4 stage.save_steps=8": short).
# soak-disk-full: `make sft` on a too-small tmpfs (needs root), then space freed and rerun.
soak: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/soak.py --cycles "$$ALIGNPIPE_SOAK_CYCLES" --seed "$$ALIGNPIPE_SOAK_SEED" --exp "$$ALIGNPIPE_EXP" --

soak-disk-full: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/soak.py --disk-full --exp "$$ALIGNPIPE_EXP" --

# Benchmarks (bench/README.md); each writes its report under docs/bench/. Run them alone: on a
# shared machine the timings are noise. ARGS = the script's own flags (e.g. ARGS="--rounds 1").
#   make bench              our PPO vs trl 1.12.0 at the yardstick shape (ppo_vs_trl.md)
#   make bench-ppo-scale    the same at 3 model shapes x 2 reply lengths (ppo_scaling.md + png)
#   make bench-overhead     `make sft dpo` vs the same work as a plain TRL script (stage_overhead.md)
#   make bench-memory       PPO peak memory per role layout at a ~70M model (ppo_memory.md)
#   make gpu-check          one GPU, ~8 min: every stage x full/LoRA/QLoRA at Qwen2.5-0.5B's shape
#                           (gpu.md); ARGS="--tiny" runs the same path on CPU
bench: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/ppo_vs_trl.py

bench-ppo-scale: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/ppo_vs_trl.py --scale

bench-overhead: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/stage_overhead.py

bench-memory: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/ppo_memory.py

gpu-check: $(VENV)/.installed
	$(WITH_ARGS) $(BIN)/python bench/gpu_check.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf runs outputs multirun wandb .pytest_cache
