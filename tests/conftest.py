"""Shared test fixtures: Hydra composition against the real conf/ tree, tiny fast settings."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from stages.registry import register_configs

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
FIXTURES = Path(__file__).resolve().parent / "fixtures"

register_configs()

# Small but real: enough steps for the loss to fall, few enough for seconds on 2 cores.
FAST = [
    "tracking=none",
    "data.toy.num_train=512",
    "data.toy.num_eval=16",
    "data.toy.num_reversal_train=64",
    "data.toy.num_reversal_eval=8",
    "stage.max_steps=12",
    "stage.per_device_batch_size=8",
    "stage.logging_steps=2",
    "stage.save_steps=6",
]


@pytest.fixture(scope="session")
def builtin_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny base model per test session, shared by every test."""
    return tmp_path_factory.mktemp("builtin")


ComposeFn = Callable[..., DictConfig]


@pytest.fixture
def compose_cfg(tmp_path: Path, builtin_models_dir: Path) -> Iterator[ComposeFn]:
    """compose_cfg(*overrides, fast=True) -> the composed config with runs under tmp_path."""

    def _compose(*overrides: str, fast: bool = True) -> DictConfig:
        base = [
            f"paths.runs_root={tmp_path / 'runs'}",
            f"paths.builtin_models={builtin_models_dir}",
        ]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(
                config_name="config", overrides=[*base, *(FAST if fast else []), *overrides]
            )

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def sft_runs(tmp_path_factory: pytest.TempPathFactory, builtin_models_dir: Path):
    """sft_runs(peft) -> a finished short SFT run dir for that peft kind (trained once per
    session; tests copy it into their own runs root)."""
    root = tmp_path_factory.mktemp("sft_parents")
    done: dict[str, Path] = {}

    def get(peft: str) -> Path:
        if peft not in done:
            from stages.sft import (
                recipe as sft,  # heavy (torch, trl): only for the tests that need it
            )

            overrides = [
                f"paths.runs_root={root / peft}",
                f"paths.builtin_models={builtin_models_dir}",
                *FAST,
                f"peft={peft}",
            ]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                sft.run(compose(config_name="config", overrides=overrides))
            done[peft] = root / peft / "toy" / "sft"
        return done[peft]

    return get


@pytest.fixture(scope="session")
def default_sft(tmp_path_factory: pytest.TempPathFactory, builtin_models_dir: Path) -> Path:
    """The default `make sft` run (full config, tracking off), trained once per session for
    the slow end-to-end tests; they copy it to runs/toy/sft under their own tmp_path."""
    from stages.sft import recipe as sft  # heavy (torch, trl): only for the tests that need it

    root = tmp_path_factory.mktemp("default_sft")
    overrides = [
        f"paths.runs_root={root}",
        f"paths.builtin_models={builtin_models_dir}",
        "tracking=none",
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sft.run(compose(config_name="config", overrides=overrides))
    return root / "toy" / "sft"


def saved_tensors(directory: Path) -> dict:
    """Every tensor of every *.safetensors file in a saved model / adapter directory."""
    from safetensors.torch import load_file

    tensors: dict = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    assert tensors, f"no safetensors in {directory}"
    return tensors


def copy_run(run_dir: Path, runs_root: Path, stage: str, experiment: str = "toy") -> Path:
    """Place a finished run at <runs_root>/<experiment>/<stage> (parents resolve from there)."""
    import shutil

    target = runs_root / experiment / stage
    shutil.copytree(run_dir, target)
    return target
