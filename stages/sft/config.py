"""SFT stage knobs: TRL SFTTrainer arguments on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.schema import StageConfig


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    learning_rate: float = 3e-3
    max_steps: int = 800
    per_device_batch_size: int = 64
    assistant_only_loss: bool = True  # loss on assistant tokens only (needs {% generation %})
    packing: bool = False  # pack short rows into max_length blocks: faster, cross-row attention
