"""Shared mapping from our stage knobs to transformers/TRL training arguments.

Precision is chosen per device (fp32 on CPU: TRL's default bf16 runs CPU autocast ~8x
slower), gradient checkpointing is off by default (not worth it for small models; turn it on
through stage.trainer_overrides for big ones), and checkpoints land in the stage run dir.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.core.runtime import use_cpu

if TYPE_CHECKING:
    from stages.core.lifecycle import StageRun


def trainer_arguments(stage: StageRun) -> dict[str, Any]:
    """Keyword arguments common to SFTConfig, DPOConfig and RewardConfig."""
    knobs = stage.cfg.stage
    args: dict[str, Any] = {
        "output_dir": str(stage.run_dir),
        "seed": stage.cfg.seed,
        "data_seed": stage.cfg.seed,
        "learning_rate": knobs.learning_rate,
        "max_steps": knobs.max_steps,
        "per_device_train_batch_size": knobs.per_device_batch_size,
        "gradient_accumulation_steps": knobs.gradient_accumulation_steps,
        "lr_scheduler_type": knobs.lr_scheduler,
        "warmup_steps": int(knobs.warmup_ratio * knobs.max_steps),
        "weight_decay": knobs.weight_decay,
        "max_grad_norm": knobs.max_grad_norm,
        "logging_steps": knobs.logging_steps,
        "save_strategy": "steps",
        "save_steps": knobs.save_steps,
        "save_total_limit": knobs.save_total_limit,
        "report_to": stage.tracker.report_to,
        "run_name": stage.tracker.name,
        "use_cpu": use_cpu(),
        "activation_checkpointing": False,
        "dataloader_num_workers": 0,
        "disable_tqdm": False,
        **stage.precision.trainer_flags,
    }
    args.update(knobs.trainer_overrides)
    return args


def first_and_last(log_history: list[dict[str, Any]], key: str, name: str) -> dict[str, float]:
    """``{name}_first`` / ``{name}_last``: a logged trainer metric at the start and the end."""
    values = [float(entry[key]) for entry in log_history if key in entry]
    return {f"{name}_first": values[0], f"{name}_last": values[-1]} if values else {}


def loss_curve(log_history: list[dict[str, Any]], key: str = "loss") -> dict[str, float]:
    """First and last logged training loss: the evidence that a stage learned."""
    return first_and_last(log_history, key, "train/loss")
