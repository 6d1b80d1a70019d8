"""SFT stage knobs: TRL SFTTrainer arguments on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.schema import StageConfig
from stages.core.validation import VALIDATION_BOUNDS, ValidationKnobs


@dataclass
class SFTStageConfig(ValidationKnobs, StageConfig):
    name: str = "sft"
    # The tiny model learns from scratch and needs a high LR; real models want ~2e-5 full,
    # ~2e-4 LoRA.
    learning_rate: float = 3e-3
    max_steps: int = 800  # the main quality/time knob; the tiny model learns carries by ~600
    per_device_batch_size: int = 64  # rows per micro-batch
    # Learn the replies, not the prompts (needs the chat template's {% generation %} markers).
    assistant_only_loss: bool = True
    packing: bool = False  # pack short rows into max_length blocks: faster, cross-row attention
    # Share of prompts held out to pick final/ (best eval loss); on by default: later stages
    # measure forgetting on these demonstrations (validation.jsonl). 0 = train on all.
    validation_fraction: float = 0.05

    VALIDATION_METRICS = ("loss", "token_accuracy")
    BOUNDS = {**StageConfig.BOUNDS, **VALIDATION_BOUNDS}
