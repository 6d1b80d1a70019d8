"""Steps the stage recipes share, so each recipe reads as its own story: the stage's trainable
model, the parent policy and the reloaded ``final/``, and the comparison report at the end.

Each helper is one step of a recipe (``stages/<name>/recipe.py``) on a ``StageRun``; none
decides anything a recipe should see.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from stages.core.comparison import Comparison, compare_with_parent, with_rows
from stages.core.forgetting import forgetting_metrics, lineage_sft
from stages.core.handoff import write_jsonl_atomic
from stages.core.models import LoadedModel, load_stage_model, load_trainable_model
from stages.core.runtime import is_main_process
from stages.core.stage_pairs import pair_judge_stage
from stages.core.task import Task, stage_task

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from stages.core.handoff import ParentStage
    from stages.core.lifecycle import StageRun

COMPARISON_TABLE = "comparison.txt"
HELDOUT_PAIRS = "heldout_pairs.jsonl"


def trainable_model(
    stage: StageRun,
    *,
    task: str = "causal_lm",
    pad_token_id: int | None = None,
    start_from: ParentStage | None = None,
) -> LoadedModel:
    """The model ``stage`` trains: the base or its parent's output, full weights, an adapter
    (continued or fresh, ``stage.parent_adapter``) or an adapter on a 4-bit base (``peft``).
    ``start_from``: another finished policy to continue instead of the parent (its adapter
    continued), e.g. the previous round of iterative DPO."""
    c = stage.cfg
    with stage.phase("load"):
        return load_trainable_model(
            model_cfg=c.model,
            peft_cfg=c.peft,
            paths=c.paths,
            precision=stage.precision,
            run_dir=stage.run_dir,
            stage=stage.name,
            task=task,
            parent=stage.parent if start_from is None else start_from,
            parent_adapter=c.stage.parent_adapter if start_from is None else "continue",
            pad_token_id=pad_token_id,
        )


def preference_task(stage: StageRun) -> Task | None:
    """Before any weights load, for a stage trained on preferences of its parent's policy:
    the RM judging its on-policy pairs (if any) and its task's judge, both resolved (a missing
    or stale RM fails with the command to run) and recorded as upstreams. Returns the task."""
    with stage.guard():
        judge_stage = pair_judge_stage(stage)
        if judge_stage is not None:
            stage.add_upstream(judge_stage)
        return stage_task(stage, stage.parent)


def frozen_policy(stage: StageRun, of: ParentStage) -> torch.nn.Module:
    """A finished stage's policy (``of``: the parent, or this stage's own ``final/`` after a
    failure past training), frozen in eval mode."""
    c = stage.cfg
    with stage.phase("load"):
        return load_stage_model(of, c.model, c.peft, stage.precision)


def compare_and_report(
    stage: StageRun,
    policy: torch.nn.Module,
    parent_policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | None,
    metrics: dict[str, Any],
    *,
    heldout_pairs: list[dict[str, Any]] | None = None,
) -> Comparison:
    """The comparison every training stage ends with: ``policy`` against its parent's on the
    task's held-out prompts (and ``heldout_pairs``), reported by `report_comparison`."""
    assert stage.parent is not None  # only stages with a parent compare
    with stage.phase("eval"):
        comparison = compare_with_parent(
            policy,
            parent_policy,
            tokenizer,
            task=task,
            model_cfg=stage.cfg.model,
            heldout_pairs=heldout_pairs,
            seed=stage.cfg.seed,
            policy_name=stage.name,
            parent_name=stage.parent.stage,
        )
        # What the stage kept of the SFT's other skills and held-out replies, next to its parent.
        c = stage.cfg
        sft = lineage_sft(stage.parent, c.paths.runs_root, c.experiment_name)
        forgetting, rows = forgetting_metrics(policy, parent_policy, tokenizer, task, c.model, sft)
        comparison = with_rows(comparison, forgetting, rows, stage.name, stage.parent.stage)
        report_comparison(stage, comparison, metrics, heldout_pairs=heldout_pairs)
        return comparison


def report_comparison(
    stage: StageRun,
    comparison: Comparison,
    metrics: dict[str, Any],
    *,
    heldout_pairs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Add the comparison with the parent to ``metrics`` (and ``eval/accuracy`` where the task
    judges correctness), print its table, and write it (plus the held-out pairs it scored)
    into the run dir. Returns ``metrics``."""
    metrics.update(comparison.metrics)
    if "compare/policy_accuracy" in metrics:
        metrics["eval/accuracy"] = metrics["compare/policy_accuracy"]
    print(comparison.table, flush=True)
    if is_main_process():
        (stage.run_dir / COMPARISON_TABLE).write_text(comparison.table + "\n")
        if heldout_pairs is not None:
            write_jsonl_atomic(stage.run_dir / HELDOUT_PAIRS, heldout_pairs)
    return metrics
