"""RLOO stage knobs: GRPO's online-RL knobs (`stages.grpo.config.OnlineRLStageConfig`) with
RLOO's advantage: each reply's reward minus the mean of the OTHER replies to its prompt."""

from __future__ import annotations

from dataclasses import dataclass

from stages.grpo.config import OnlineRLStageConfig


@dataclass
class RLOOStageConfig(OnlineRLStageConfig):
    name: str = "rloo"
    beta: float = 0.05  # KL coefficient (TRL's RLOO default); see OnlineRLStageConfig.beta
    # Rescale the leave-one-out advantages to unit variance per batch: steadier steps when
    # rewards have an arbitrary scale (an RM), nothing to gain with 0/1 rule rewards.
    normalize_advantages: bool = False
