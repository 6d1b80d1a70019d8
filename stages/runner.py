"""Dispatch a composed config to its stage's ``run(cfg)``; what `alignpipe` calls."""

from __future__ import annotations

import importlib
from typing import Any

from omegaconf import DictConfig

from stages.core.schema import ConfigError
from stages.registry import STAGES, stage_spec


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage named by ``cfg.stage.name`` and return its metrics."""
    name = cfg.stage.name
    spec = stage_spec(name)
    if spec is None:
        raise ConfigError(f"stage.name={name!r} is not one of {[s.name for s in STAGES]}")
    if cfg.get("dry_run"):  # the plan only: no stage module (torch, trl) is even imported
        from stages.core.plan import DryRunBlocked, build_plan

        plan = build_plan(cfg)
        print(plan.render(), flush=True)
        if plan.blockers:
            raise DryRunBlocked("\n".join(plan.blockers))
        return {}
    return importlib.import_module(spec.recipe).run(cfg)
