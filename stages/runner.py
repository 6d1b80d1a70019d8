"""Dispatch a composed config to its stage's ``run(cfg)``; what `alignpipe` calls."""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

STAGE_MODULES = {
    "sft": "stages.sft",
    "rm": "stages.rm",
    "ppo": "stages.ppo.stage",
    "dpo": "stages.dpo",
    "eval": "stages.eval",
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage named by ``cfg.stage.name`` and return its metrics."""
    name = cfg.stage.name
    if name not in STAGE_MODULES:
        raise ValueError(f"stage.name={name!r} is not one of {sorted(STAGE_MODULES)}")
    module = importlib.import_module(STAGE_MODULES[name])
    return module.run(cfg)
