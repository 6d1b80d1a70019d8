"""Eval stage knobs: which finished stage to compare with its parent, and how."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    target: str = "dpo"  # stage to evaluate; it is compared with its own parent
    # Policy samples used to estimate KL(policy || parent): more = tighter, slower.
    num_kl_samples: int = 64
    temperature: float = 1.0  # sampling temperature for the KL estimate

    BOUNDS = {**StageConfig.BOUNDS, "num_kl_samples": at_least(1), "temperature": positive()}
