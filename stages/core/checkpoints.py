"""Checkpoints that count only when complete, and metrics that survive a resume.

- ``CheckpointCompletion``: a transformers ``TrainerCallback`` whose ``on_save`` writes the
  completeness marker (``handoff.mark_checkpoint_complete``) into the checkpoint just saved.
  In the installed transformers, ``Trainer._maybe_log_save_evaluate`` calls
  ``_save_checkpoint`` (model, optimizer, scheduler, RNG states, then trainer_state.json, then
  the rotation of old checkpoints) and only afterwards ``callback_handler.on_save``: so the
  marker is the last write, and a kill or a full disk mid-save leaves a checkpoint that resume
  skips instead of failing on it (a 0-byte trainer_state.json used to block every resume).
- ``logged_training_loss``: the mean training loss over the whole run, from the trainer's log
  history (restored from the checkpoint on resume). ``TrainOutput.training_loss`` only covers
  the steps trained since the resume, so a resumed metrics.json would differ from an
  uninterrupted one although the weights are identical.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from stages.core.handoff import mark_checkpoint_complete


class CheckpointCompletion(TrainerCallback):
    """Marks ``checkpoint-N`` complete once the Trainer has written all of it (rank 0)."""

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> TrainerControl:
        # Every rank writes its own rng_state_<rank>.pth: wait for all of them first.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            mark_checkpoint_complete(checkpoint)
        return control


def logged_training_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over all logged steps: each logged ``loss`` (the mean since the
    previous log) weighted by the steps it covers. The same number whether or not the run was
    interrupted and resumed."""
    total, steps, previous = 0.0, 0, 0
    for entry in log_history:
        if "loss" in entry and "step" in entry:
            covered = int(entry["step"]) - previous
            total += float(entry["loss"]) * covered
            steps += covered
            previous = int(entry["step"])
    return total / steps if steps else None
