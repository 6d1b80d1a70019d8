"""Shared mapping from our stage knobs to transformers/TRL training arguments.

Precision is chosen per device (fp32 on CPU: TRL's default bf16 runs CPU autocast ~8x
slower), gradient checkpointing is off by default (not worth it for small models; turn it on
through stage.trainer_overrides for big ones), and checkpoints land in the stage run dir.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback

from stages.core.runtime import use_cpu
from stages.core.validation import validation_trainer_arguments

if TYPE_CHECKING:
    from stages.core.lifecycle import StageRun

log = logging.getLogger(__name__)

# What a step line shows, in this order and under these names, when the trainer logged it:
# the loss and optimiser state, then each trainer's own sign of learning (SFT token accuracy,
# DPO reward accuracy and margin, RM pairwise accuracy and margin, the online RL trainers'
# sampled reward and KL). Everything else the
# trainer logs still goes to W&B and the checkpoint's trainer_state.json.
_SHOWN = {
    "loss": "loss",
    "learning_rate": "lr",
    "grad_norm": "grad_norm",
    "mean_token_accuracy": "token_acc",
    "rewards/accuracies": "reward_acc",
    "rewards/margins": "reward_margin",
    "accuracy": "acc",
    "margin": "margin",
    "reward": "reward",
    "kl": "kl",
    # Validation (stages.core.validation): the metric that picks final/ and its companions.
    "eval_loss": "eval_loss",
    "eval_mean_token_accuracy": "eval_token_acc",
    "eval_accuracy": "eval_acc",
    "eval_rewards/accuracies": "eval_reward_acc",
}


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
    # Validation on: evaluate and checkpoint every eval_steps, reload the best at the end.
    args.update(validation_trainer_arguments(knobs))
    args.update(knobs.trainer_overrides)
    return args


def first_and_last(log_history: list[dict[str, Any]], key: str, name: str) -> dict[str, float]:
    """``{name}_first`` / ``{name}_last``: a logged trainer metric at the start and the end."""
    values = [float(entry[key]) for entry in log_history if key in entry]
    return {f"{name}_first": values[0], f"{name}_last": values[-1]} if values else {}


def loss_curve(log_history: list[dict[str, Any]], key: str = "loss") -> dict[str, float]:
    """First and last logged training loss: the evidence that a stage learned."""
    return first_and_last(log_history, key, "train/loss")


class StepLines(TrainerCallback):
    """One readable line per logging step instead of transformers' raw dicts:

        sft step 200/800 | loss 0.512 | lr 2.9e-03 | grad_norm 0.81 | 14.2 steps/s

    and a progress bar only where someone watches it (stderr is a terminal); in a log file
    the lines themselves say how far the run is.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.bar: Any = None
        self._last: tuple[float, int] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            self._last = (time.perf_counter(), state.global_step)
            if sys.stderr.isatty():
                self.bar = tqdm(
                    total=state.max_steps, initial=state.global_step, desc=self.stage,
                    unit="step", dynamic_ncols=True,
                )  # fmt: skip

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = self.format_line(state.global_step, state.max_steps, logs)
        if self.bar is not None:
            self.bar.write(line)  # above the bar, which then redraws below it
        else:
            log.info(line)

    def format_line(self, step: int, max_steps: int, logs: dict[str, Any]) -> str:
        now = time.perf_counter()
        if "train_runtime" in logs:  # the trainer's end-of-training summary
            return (
                f"{self.stage} trained {step}/{max_steps} steps in {logs['train_runtime']:.1f} s"
                f" | mean loss {_number(logs.get('train_loss'))}"
            )
        parts = [f"{self.stage} step {step}/{max_steps}"]
        parts += [f"{name} {_number(logs[key])}" for key, name in _SHOWN.items() if key in logs]
        if self._last is not None and step > self._last[1] and now > self._last[0]:
            parts.append(f"{(step - self._last[1]) / (now - self._last[0]):.3g} steps/s")
        self._last = (now, step)
        return " | ".join(parts)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _number(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return str(value)
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.2e}"


def readable_progress(trainer: Trainer, stage: str) -> Trainer:
    """Swap transformers' progress/printer callback (raw dicts) for ``StepLines``."""
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(StepLines(stage))
    return trainer
