"""RLOO stage: GRPO's recipe (`stages.grpo.recipe.run_online_rl`: SFT parent, task or RM
reward, sampled groups, KL to SFT, final/, comparison) with TRL's RLOOTrainer, whose advantage
is each reply's reward minus the mean reward of the other replies to the same prompt."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig
from trl import RLOOConfig, RLOOTrainer

from stages.grpo.recipe import OnlineRLAlgorithm, run_online_rl

RLOO = OnlineRLAlgorithm(RLOOTrainer, RLOOConfig, ("normalize_advantages",))


def run(cfg: DictConfig) -> dict[str, Any]:
    return run_online_rl(cfg, "rloo", RLOO)
