"""Validation during training, early stopping and the best checkpoint as ``final/`` (SFT, RM,
DPO, KTO), on HF Trainer's own machinery.

- ``ValidationKnobs``: the knobs, inherited by the stage schemas that support them (one place
  for their defaults, comments and checks; a stage class may override a default).
- ``validation_trainer_arguments``: ``eval_strategy="steps"``, ``load_best_model_at_end``,
  ``metric_for_best_model`` ... A checkpoint is written at every evaluation, so the best one
  is always on disk; transformers' rotation (``save_total_limit``) never deletes
  ``state.best_model_checkpoint``, and a resume restores ``best_metric`` /
  ``best_global_step`` from the checkpoint's trainer_state.json and the early-stopping
  counter from its ``stateful_callbacks``.
- ``hold_out_validation``: the seeded, prompt-grouped split (``data_recipes.validation_split``)
  of the rows a stage would train on, recorded in the manifest's ``validation``.
- ``early_stopping`` / ``record_validation``: the callback, and the curve, best step and
  whether the run stopped early, for the manifest, metrics.json and one log line.

The stage schemas import this module, and ``--help`` must not load torch: transformers and the
run-dir helpers are imported where they are used.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from stages.core.bounds import Bound, at_least
from stages.core.schema import ConfigError, check_choice, report_problem

if TYPE_CHECKING:
    from transformers import EarlyStoppingCallback, Trainer

    from stages.core.lifecycle import StageRun

log = logging.getLogger(__name__)

Rows = TypeVar("Rows")

# The stage's validation rows, as it would have trained on them (SFT: `messages` rows; RM /
# DPO: preference pairs; KTO: labelled replies): later stages measure forgetting on SFT's.
VALIDATION_ROWS = "validation.jsonl"

# Our metric names -> (the key the TRL trainer logs at evaluation, higher is better).
METRICS: dict[str, tuple[str, bool]] = {
    "loss": ("eval_loss", False),
    "token_accuracy": ("eval_mean_token_accuracy", True),  # SFTTrainer; DPO: chosen replies
    "pairwise_accuracy": ("eval_accuracy", True),  # RewardTrainer: r(chosen) > r(rejected)
    "reward_accuracy": ("eval_rewards/accuracies", True),  # DPOTrainer
}

VALIDATION_BOUNDS = {
    # Below 1: something must be left to train on; a split is by prompt, so ceil() of it.
    "validation_fraction": Bound(low=0, high=1, high_inclusive=False),
    "eval_steps": at_least(1, nullable=True),
    "early_stopping_patience": at_least(0),
    "early_stopping_threshold": at_least(0),
}


@dataclass
class ValidationKnobs:
    """Validation knobs of a stage schema: ``class XStageConfig(ValidationKnobs, StageConfig)``,
    with ``BOUNDS = {**StageConfig.BOUNDS, **VALIDATION_BOUNDS}``."""

    # Share of the stage's training prompts (all their rows) held out, seeded by `seed`, to
    # evaluate during training and pick final/: more = a steadier curve but fewer rows to
    # learn from; 0 = no validation (final/ = the last step).
    validation_fraction: float = 0.0
    # Evaluate every N steps, with a checkpoint at each (the best must be on disk; with
    # validation on this replaces stage.save_steps); null = every stage.save_steps. Smaller
    # = a finer best step, more eval time and checkpoint writes.
    eval_steps: int | None = None
    # Stop after this many evaluations in a row without improvement; 0 = train max_steps.
    # Small stops soon after overfitting starts, but may stop on a noisy plateau.
    early_stopping_patience: int = 0
    # Least improvement of the metric (absolute) that resets the patience: higher stops sooner.
    early_stopping_threshold: float = 0.0
    # What picks final/ and drives early stopping: loss (lower is better), or an accuracy the
    # stage logs (SFT token_accuracy, RM pairwise_accuracy, DPO reward_accuracy or
    # token_accuracy; higher wins).
    validation_metric: str = "loss"

    # The metrics this stage can choose by (a class attribute, not a knob: no annotation).
    VALIDATION_METRICS = ("loss",)

    def __post_init__(self) -> None:
        super().__post_init__()  # type: ignore[misc]  # StageConfig's checks first
        check_choice("stage.validation_metric", self.validation_metric, self.VALIDATION_METRICS)
        for problem in validation_problems(self):
            report_problem(problem)


def validation_problems(knobs: Any) -> list[str]:
    """Knob combinations that cannot work, each naming its keys and the fix."""
    problems: list[str] = []
    fraction, patience = knobs.validation_fraction, knobs.early_stopping_patience
    if not isinstance(fraction, (int, float)) or not isinstance(patience, int):
        return problems  # bounds already reported
    if fraction == 0:
        if patience > 0:
            problems.append(
                f"stage.early_stopping_patience={patience} needs a validation split to watch, "
                "but stage.validation_fraction=0: set stage.validation_fraction=0.05 (or "
                "stage.early_stopping_patience=0)"
            )
        if knobs.eval_steps is not None:
            problems.append(
                f"stage.eval_steps={knobs.eval_steps} evaluates on the validation split, but "
                "stage.validation_fraction=0: set stage.validation_fraction=0.05 (or drop "
                "stage.eval_steps)"
            )
        return problems
    if knobs.early_stopping_threshold > 0 and patience == 0:
        problems.append(
            f"stage.early_stopping_threshold={knobs.early_stopping_threshold} only counts with "
            "early stopping: set stage.early_stopping_patience=3 (or "
            "stage.early_stopping_threshold=0)"
        )
    steps = effective_eval_steps(knobs)
    if steps >= 1 and knobs.logging_steps >= 1 and steps % knobs.logging_steps:
        fit = -(-steps // knobs.logging_steps) * knobs.logging_steps
        key = "stage.eval_steps" if knobs.eval_steps is not None else "stage.save_steps"
        problems.append(
            f"{key}={steps} (with validation on, a checkpoint at each evaluation) must be a "
            f"multiple of stage.logging_steps={knobs.logging_steps}, so that a resumed run "
            f"reports the same training metrics: e.g. {key}={fit}"
        )
    # An explicit eval_steps past the end is a mistake; the default (save_steps) past it on a
    # short run only evaluates once, at the last step (transformers evaluates there anyway).
    if knobs.eval_steps is not None and knobs.eval_steps > knobs.max_steps:
        problems.append(
            f"stage.eval_steps={knobs.eval_steps} > stage.max_steps={knobs.max_steps}: "
            "validation would run only once, at the end, and could choose nothing: set "
            f"stage.eval_steps={max(knobs.max_steps // 4, 1)} or lower"
        )
    return problems


def effective_eval_steps(knobs: Any) -> int:
    """Steps between evaluations (and checkpoints) when validation is on."""
    return knobs.eval_steps if knobs.eval_steps is not None else knobs.save_steps


def validation_on(knobs: Any) -> bool:
    """True for a stage schema with validation knobs and a non-zero split."""
    return bool(getattr(knobs, "validation_fraction", 0) or 0)


def validation_trainer_arguments(knobs: Any) -> dict[str, Any]:
    """The TrainingArguments of validation (none when it is off): evaluate and checkpoint
    every ``eval_steps``, keep and reload the best checkpoint by the chosen metric."""
    if not validation_on(knobs):
        return {}
    steps = effective_eval_steps(knobs)
    metric, greater = METRICS[knobs.validation_metric]
    return {
        "eval_strategy": "steps",
        "eval_steps": steps,
        "save_steps": steps,  # a checkpoint at every evaluation: the best one always exists
        "load_best_model_at_end": True,
        "metric_for_best_model": metric,
        "greater_is_better": greater,
        "per_device_eval_batch_size": knobs.per_device_batch_size,
        # Our metrics come from the trainers' own logs: gathering logits costs vocab x tokens.
        "prediction_loss_only": True,
        # A resume restores the early-stopping counter with the best-so-far.
        "restore_callback_states_from_checkpoint": True,
    }


def hold_out_validation(
    stage: StageRun, rows: Rows, prompt_of: Callable[[Any], str]
) -> tuple[Rows, Rows | None]:
    """(train, validation) rows of ``stage``: the seeded prompt-grouped split when validation
    is on (recorded in the manifest's ``validation``, the rows written to ``VALIDATION_ROWS``
    in the run dir), else (``rows``, None). ``rows``: a list of dicts or a
    ``datasets.Dataset``."""
    knobs = stage.cfg.stage
    if not validation_on(knobs):
        return rows, None
    from data_recipes.validation_split import split_validation

    try:  # a Dataset is a sequence of row dicts too
        train_idx, val_idx = split_validation(
            rows,
            knobs.validation_fraction,
            stage.cfg.seed,
            prompt_of,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise ConfigError(
            f"stage.validation_fraction={knobs.validation_fraction}: {error}. Add rows, or run "
            f"without validation: alignpipe stage={stage.name} stage.validation_fraction=0"
        ) from error
    if isinstance(rows, list):
        train, validation = [rows[i] for i in train_idx], [rows[i] for i in val_idx]
    else:
        train, validation = rows.select(train_idx), rows.select(val_idx)  # type: ignore[attr-defined]
    metric, _ = METRICS[knobs.validation_metric]
    from stages.core.handoff import write_jsonl_atomic
    from stages.core.runtime import is_main_process

    if is_main_process():
        if isinstance(validation, list):
            rows_out = validation
        else:  # the rows as data: without the token columns added for the trainer
            from stages.core.data_accounting import PRETOKENIZED

            tokens = [c for c in PRETOKENIZED if c in validation.column_names]  # type: ignore[attr-defined]
            rows_out = validation.remove_columns(tokens).to_list()  # type: ignore[attr-defined]
        write_jsonl_atomic(stage.run_dir / VALIDATION_ROWS, rows_out)
    stage.manifest_extra["validation"] = {
        "path": str(stage.run_dir / VALIDATION_ROWS),
        "fraction": knobs.validation_fraction,
        "rows": len(val_idx),
        "train_rows": len(train_idx),
        "seed": stage.cfg.seed,
        "metric": metric,
        "eval_steps": effective_eval_steps(knobs),
        "early_stopping_patience": knobs.early_stopping_patience,
        "early_stopping_threshold": knobs.early_stopping_threshold,
        # A rerun that reuses a saved final/ keeps the curve its training recorded.
        **(stage.manifest_extra.get("validation") or {}),
    }
    log.info(
        "%s: %d of %d rows held out for validation (stage.validation_fraction=%g, by prompt); "
        "%s every %d steps picks final/",
        stage.name, len(val_idx), len(train_idx) + len(val_idx), knobs.validation_fraction, metric,
        effective_eval_steps(knobs),
    )  # fmt: skip
    return train, validation  # type: ignore[return-value]


def best_checkpoint_reloaded(stage: StageRun) -> bool:
    """True when training ended by reloading the best checkpoint into the trainer's model.
    That in-memory copy can differ numerically from final/ (measured with QLoRA: other
    greedy replies), so the stage evaluates final/ as the next stage will load it."""
    record = stage.manifest_extra.get("validation") or {}
    if record.get("best_step") is None:
        return False
    from stages.core.runtime import world_size  # torch: not at import (--help)

    if world_size() > 1:  # rank 0 wrote final/; every rank loads it only after that
        from accelerate import PartialState

        PartialState().wait_for_everyone()
    return True


def early_stopping(knobs: Any) -> EarlyStoppingCallback | None:
    """transformers' EarlyStoppingCallback for the knobs, or None (patience 0 / no split)."""
    if not validation_on(knobs) or knobs.early_stopping_patience == 0:
        return None
    from transformers import EarlyStoppingCallback

    return EarlyStoppingCallback(
        early_stopping_patience=knobs.early_stopping_patience,
        early_stopping_threshold=knobs.early_stopping_threshold,
    )


def record_validation(stage: StageRun, trainer: Trainer) -> dict[str, Any]:
    """After training: the manifest's ``validation`` gains the curve, best step and value,
    whether training stopped early and the steps trained (all from the trainer state, which a
    resume restores); logs one line; returns the metrics for metrics.json."""
    record = stage.manifest_extra.get("validation")
    if record is None:
        return {}
    knobs, state, args = stage.cfg.stage, trainer.state, trainer.args
    metric = args.metric_for_best_model
    curve = [
        {"step": int(entry["step"]), "value": float(entry[metric])}
        for entry in state.log_history
        if metric in entry and "step" in entry
    ]
    patience = knobs.early_stopping_patience
    stopped_early = patience > 0 and state.global_step < state.max_steps
    best_step = state.best_global_step if state.best_model_checkpoint else None
    best_value = float(state.best_metric) if best_step is not None else None
    record.update(
        curve=curve,
        best_step=best_step,
        best_value=best_value,
        best_checkpoint=state.best_model_checkpoint,
        stopped_early=stopped_early,
        steps_trained=state.global_step,
    )
    best = f"step {best_step} ({metric} {best_value:.4g})" if best_step else "the last step"
    if stopped_early:
        log.info(
            "%s stopped early at step %d/%d: %s did not improve by >= %g for %d evals; "
            "final/ = %s",
            stage.name, state.global_step, state.max_steps, metric,
            knobs.early_stopping_threshold, patience, best,
        )  # fmt: skip
    else:
        log.info(
            "%s validation: %d evals, final/ = %s of %d", stage.name, len(curve), best,
            state.global_step,
        )  # fmt: skip
    metrics: dict[str, Any] = {"validation/stopped_early": float(stopped_early)}
    if best_step is not None:
        metrics.update({"validation/best_step": best_step, "validation/best_value": best_value})
    return metrics
