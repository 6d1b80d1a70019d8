"""Dispatch a composed config to its stage's ``run(cfg)``; what `alignpipe` calls."""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from stages.core.schema import ConfigError

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
        raise ConfigError(f"stage.name={name!r} is not one of {sorted(STAGE_MODULES)}")
    if cfg.get("dry_run"):  # the plan only: no stage module (torch, trl) is even imported
        from stages.core.plan import DryRunBlocked, build_plan

        plan = build_plan(cfg)
        print(plan.render(), flush=True)
        if plan.blockers:
            raise DryRunBlocked("\n".join(plan.blockers))
        return {}
    module = importlib.import_module(STAGE_MODULES[name])
    return module.run(cfg)
