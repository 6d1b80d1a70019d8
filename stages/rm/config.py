"""Reward-model stage knobs: TRL RewardTrainer arguments on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    parent: str | None = "sft"
    # continue: a SEQ_CLS adapter initialised from the SFT adapter, on the same base (PPO then
    # shares one 4-bit base); merge: SFT merged into the base, fresh SEQ_CLS adapter.
    parent_adapter: str = "continue"
    learning_rate: float = 1e-3
    max_steps: int = 300
    center_rewards_coefficient: float | None = None  # pull mean reward to 0 (0.01 in the paper)
    use_margin: bool = False  # use a `margin` column in the loss when the data has one
    head_learning_rate: float | None = None  # LR of the new score head; None = learning_rate

    BOUNDS = {
        **StageConfig.BOUNDS,
        "center_rewards_coefficient": at_least(0, nullable=True),
        "head_learning_rate": positive(nullable=True),
    }
