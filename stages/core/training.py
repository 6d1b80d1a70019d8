"""One way to run a TRL trainer in every stage (SFT, RM, DPO).

Adds what each stage needs around ``trainer.train()``: the checkpoint-completeness marker
(``CheckpointCompletion``), one readable log line per logging step, the check that the
trainer holds exactly the rows the data accounting kept, the resume from the stage's last
complete checkpoint, early stopping and the validation record (``stages.core.validation``),
and training metrics computed from the whole log history (the same after a resume as without
one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers import Trainer

from stages.core.checkpoints import CheckpointCompletion, logged_training_loss
from stages.core.data_accounting import check_trainer_rows
from stages.core.trainer_args import loss_curve, readable_progress
from stages.core.validation import early_stopping, record_validation

if TYPE_CHECKING:
    from stages.core.lifecycle import StageRun


def train_resumably(
    stage: StageRun, trainer: Trainer, *, expected_rows: int, args: Any = None
) -> dict[str, Any]:
    """Train (resuming if the stage found a checkpoint) and return the common metrics:
    ``train/loss`` over the whole run, the loss curve, steps and runtime. Stage-specific
    trends come from ``trainer.state.log_history`` afterwards."""
    trainer.add_callback(CheckpointCompletion())
    stopper = early_stopping(stage.cfg.stage)  # None unless validation and patience are on
    if stopper is not None:
        trainer.add_callback(stopper)
    readable_progress(trainer, stage.name)  # one line per logging step, no raw dicts
    check_trainer_rows(trainer.train_dataset, expected_rows, stage.name, args)
    resume = str(stage.resume_checkpoint) if stage.resume_checkpoint else None
    with stage.phase("train"):
        output = trainer.train(resume_from_checkpoint=resume)
    history = trainer.state.log_history
    return {
        "train/loss": logged_training_loss(history),  # whole run, also after a resume
        **loss_curve(history),
        "train/steps": trainer.state.global_step,
        "train/runtime_s": output.metrics.get("train_runtime"),
        # The curve, best step and early stop into the manifest's `validation` (if on).
        **record_validation(stage, trainer),
    }
