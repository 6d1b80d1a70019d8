"""Reward-model stage knobs: TRL RewardTrainer arguments on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig
from stages.core.validation import VALIDATION_BOUNDS, ValidationKnobs


@dataclass
class RMStageConfig(ValidationKnobs, StageConfig):
    name: str = "rm"
    parent: str | None = "sft"  # the RM starts from the SFT model's weights
    # continue: a SEQ_CLS adapter initialised from the SFT adapter, on the same base (PPO then
    # shares one 4-bit base); merge: SFT merged into the base, fresh SEQ_CLS adapter.
    parent_adapter: str = "continue"
    # Head and body, for the tiny model; real models want ~1e-5 full, ~1e-4 LoRA.
    learning_rate: float = 1e-3
    max_steps: int = 300  # steps of per_device_batch_size pairs
    # Pulls the mean reward towards 0 (e.g. 0.01, as in the paper): helps PPO's value model.
    center_rewards_coefficient: float | None = None
    use_margin: bool = False  # use a `margin` column in the loss when the data has one
    head_learning_rate: float | None = None  # LR of the new score head; None = learning_rate

    VALIDATION_METRICS = ("loss", "pairwise_accuracy")
    BOUNDS = {
        **StageConfig.BOUNDS,
        **VALIDATION_BOUNDS,
        "center_rewards_coefficient": at_least(0, nullable=True),
        "head_learning_rate": positive(nullable=True),
    }
