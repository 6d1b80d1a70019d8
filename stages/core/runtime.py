"""Process-level runtime: seeding, precision per device, and main-process checks.

Everything that depends on *where* a stage runs (CPU or GPU, rank 0 or not) is decided here,
so stage recipes stay device-agnostic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from transformers import set_seed


def is_main_process() -> bool:
    """Rank 0 of an `accelerate launch` / torchrun job, or a plain single process."""
    return int(os.environ.get("RANK", "0")) == 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch. Call *before* building a model: on CPU that makes two
    runs of the same command bit-identical, across processes and across a resume."""
    set_seed(seed)


@dataclass(frozen=True)
class Precision:
    """Training precision resolved for this machine."""

    name: str  # fp32 | bf16 | fp16
    torch_dtype: torch.dtype

    @property
    def trainer_flags(self) -> dict[str, bool]:
        """bf16/fp16 flags for transformers TrainingArguments (TRL defaults bf16=True)."""
        return {"bf16": self.name == "bf16", "fp16": self.name == "fp16"}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(requested: str) -> Precision:
    """auto -> fp32 on CPU (CPU bf16 autocast measured ~8x slower), bf16 on GPUs that
    support it, fp16 on older GPUs."""
    name = requested
    if requested == "auto":
        if not torch.cuda.is_available():
            name = "fp32"
        elif torch.cuda.is_bf16_supported():
            name = "bf16"
        else:
            name = "fp16"
    return Precision(name=name, torch_dtype=_DTYPES[name])


def use_cpu() -> bool:
    return not torch.cuda.is_available()
