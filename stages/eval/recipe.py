"""Eval stage: compare a finished stage (`stage.target`, default dpo) with its parent's output,
or with the experiment's base model (`stage.against=base`, or `base_fewshot`: the base prompted
with `stage.num_shots` SFT demonstrations; stages/eval/baseline.py).

Recipe: resolve the target stage and, from its manifest, the parent it was trained from ->
load the target and what it is compared with, frozen -> `compare_with_parent` on the task's
held-out prompts and the target's held-out pairs (same prompts, chat template and judge for
every baseline) -> print the table -> runs/<exp>/eval/ (a baseline: runs/<exp>/eval/vs_base/,
runs/<exp>/eval/vs_base_fewshot/, so it never replaces the parent eval) with metrics.json, the
manifest (the target by manifest sha256; ``compared_with``: the parent's, or the base's
identity as the target's manifest records it, and the shots), eval_samples.jsonl, DONE.

final/ holds the report (the table and the two checkpoints' identities), not a model: eval
trains nothing. A finished eval is a no-op only while it describes the same target
checkpoint with the same config, compared with the same thing; evaluating another target, a
target that was re-trained, another `stage.against` or other settings runs again. A target whose parent was re-run since it was trained is
stale: eval refuses to compare it with a parent it was not trained from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from stages.core import handoff
from stages.core.comparison import PromptView, compare_with_parent, with_rows
from stages.core.forgetting import forgetting_metrics, lineage_sft
from stages.core.handoff import HandoffError, ParentStage, StaleStageError
from stages.core.lifecycle import StageRun, finished_for_target
from stages.core.models import BaseModelRef, load_stage_model, load_tokenizer
from stages.core.schema import Config, ModelConfig, validate_config
from stages.core.stage_steps import HELDOUT_PAIRS
from stages.core.task import Task, stage_task
from stages.eval.baseline import (
    choose_shots,
    fewshot_model_cfg,
    fewshot_prompt_length,
    load_base_model,
    resolve_target_base,
)

log = logging.getLogger(__name__)

REPORT = "comparison.txt"


def _resolve_target(runs_root: str, experiment: str, target: str) -> ParentStage:
    return handoff.resolve_parent(runs_root, experiment, target, child="eval")


def with_run_variant(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the eval's own run-dir variant (`EvalStageConfig.run_variant`)."""
    typed = validate_config(cfg)
    variant = typed.stage.run_variant(typed.paths.variant)
    if variant == typed.paths.variant:
        return cfg
    cfg = cfg.copy()
    cfg.paths.variant = variant
    return cfg


def _trained_from(c: Config, target: ParentStage) -> ParentStage | None:
    """The parent stage ``target`` was trained from (None for a stage without one, which only
    a baseline eval accepts), refused when it was re-run since."""
    parent_ref = target.manifest.get("parent")
    if not parent_ref:
        if c.stage.against == "parent":
            fix = handoff.make_target(
                "eval", c.experiment_name, f"stage.target={target.stage} stage.against=base"
            )
            raise HandoffError(
                f"stage '{target.stage}' ({target.run_dir}) has no parent stage to compare with; "
                f"compare it with the base model instead: `{fix}`"
            )
        return None
    parent = handoff.resolve_parent(
        c.paths.runs_root, c.experiment_name, parent_ref["stage"], child="eval"
    )
    if parent.manifest_sha256 != parent_ref["manifest_sha256"]:
        # Comparing with a parent it was not trained from would measure nothing real.
        fix = handoff.make_target(target.stage, c.experiment_name, "rerun_stale=true")
        raise StaleStageError(
            f"{target.run_dir} is STALE: its parent '{parent.stage}' ({parent.run_dir}) was "
            f"re-run after it was trained from it (parent manifest sha256 "
            f"{parent.manifest_sha256[:12]}... vs recorded "
            f"{str(parent_ref['manifest_sha256'])[:12]}...), so there is nothing fair to "
            f"compare it with. Re-run it first: `{fix}`."
        )
    return parent


@dataclass(frozen=True)
class Baseline:
    """What the target is compared with, and how it is named in the table and manifest."""

    name: str  # the table's column
    title: str  # the report's title, after "<exp>: <target> vs "
    manifest_ref: dict[str, Any]  # the manifest's ``compared_with``
    model_cfg: ModelConfig  # generation settings (a few-shot prompt needs a longer prompt limit)
    base: BaseModelRef | None = None  # the base model to load; None: the parent's final/
    view: PromptView | None = None  # how the baseline sees each prompt (few-shot turns)


def _baseline(
    c: Config,
    target: ParentStage,
    parent: ParentStage | None,
    task: Task | None,
    tokenizer: PreTrainedTokenizerBase,
) -> Baseline:
    """Resolve what ``target`` is compared with (stage.against), before any weights load."""
    against = c.stage.against
    if against == "parent":
        assert parent is not None  # _trained_from refuses a parent eval without one
        ref = {**parent.as_manifest_ref(), "against": "parent"}
        return Baseline(parent.stage, f"its parent {parent.stage}", ref, c.model)
    base = resolve_target_base(c, target)
    ref = {
        "against": against,
        "stage": None,
        # The identity the target's manifest records, and where this eval loaded it from.
        "base_model": {**target.base_model, "path": base.path, "revision": base.revision},
    }
    if against == "base":
        return Baseline("base", f"the base model {base.id}", ref, c.model, base)
    shots = choose_shots(c.data, task, c.stage.num_shots, c.seed)
    longest = fewshot_prompt_length(c, shots, task, tokenizer)
    ref.update({"num_shots": c.stage.num_shots, "shots": shots.as_manifest()})
    return Baseline(
        f"base {c.stage.num_shots}-shot",
        f"the base model {base.id} prompted with {c.stage.num_shots} SFT demonstrations",
        ref,
        fewshot_model_cfg(c, longest),
        base,
        shots.view,
    )


def _already_evaluated(cfg: DictConfig) -> bool:
    """True when the eval dir is DONE for exactly the current target checkpoint, compared
    with the same thing (`stage.against`)."""
    recorded = finished_for_target(cfg, "eval")
    against = validate_config(cfg).stage.against
    return (
        recorded is not None
        and (recorded.get("compared_with") or {}).get("against", "parent") == against
    )


def _check_base_before_start(cfg: DictConfig) -> None:
    """A baseline eval whose model config names another base fails before its run dir is
    reset, so a finished eval there survives the mistake."""
    typed = validate_config(cfg)
    if typed.stage.against == "parent" or cfg.get("dry_run"):
        return
    target = _resolve_target(typed.paths.runs_root, typed.experiment_name, typed.stage.target)
    resolve_target_base(typed, target)


def run(cfg: DictConfig) -> dict[str, Any]:
    cfg = with_run_variant(cfg)
    _check_base_before_start(cfg)
    if not cfg.get("force") and not _already_evaluated(cfg):
        cfg = cfg.copy()
        cfg.force = True  # a stale eval of another (or an older) checkpoint is replaced
    stage = StageRun.begin(cfg, "eval")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage

    with stage:
        # 1. The target and, through its manifest, the parent it was trained from.
        target = _resolve_target(c.paths.runs_root, c.experiment_name, knobs.target)
        parent = _trained_from(c, target)
        stage.add_upstream(target)
        if parent is not None:
            stage.add_upstream(parent)
        task = stage_task(stage, parent)  # a user's task: judged by the RM trained on parent

        # 2. The target's held-out pairs (if it has any), read before any weights load, then
        #    the target and what it is compared with, frozen.
        heldout_path = target.run_dir / HELDOUT_PAIRS
        heldout = (
            [json.loads(line) for line in heldout_path.read_text().splitlines() if line.strip()]
            if heldout_path.is_file()
            else []
        )
        tokenizer = load_tokenizer(target.final_dir, c.model)
        baseline = _baseline(c, target, parent, task, tokenizer)
        with stage.phase("load"):
            policy = load_stage_model(target, c.model, None, stage.precision)
            other = (
                load_stage_model(parent, c.model, None, stage.precision)
                if baseline.base is None
                else load_base_model(c, target, baseline.base, stage.precision)
            )

        # 3. Compare and report.
        with stage.phase("eval"):
            comparison = compare_with_parent(
                policy,
                other,
                tokenizer,
                task=task,
                model_cfg=baseline.model_cfg,
                heldout_pairs=heldout,
                num_kl_samples=knobs.num_kl_samples,
                temperature=knobs.temperature,
                seed=c.seed,
                policy_name=knobs.target,
                parent_name=baseline.name,
                parent_view=baseline.view,
            )
            if knobs.against == "parent" and parent is not None:  # what it kept of SFT's skills
                sft = lineage_sft(parent, c.paths.runs_root, c.experiment_name)
                extra, rows = forgetting_metrics(policy, other, tokenizer, task, c.model, sft)
                comparison = with_rows(comparison, extra, rows, knobs.target, baseline.name)
        report = f"{c.experiment_name}: {knobs.target} vs {baseline.title}\n{comparison.table}\n"
        print(report, flush=True)
        stage.manifest_extra.update(
            {"target": target.as_manifest_ref(), "compared_with": baseline.manifest_ref}
        )

        def save(final_dir: Path) -> None:
            final_dir.mkdir(parents=True, exist_ok=True)
            (final_dir / REPORT).write_text(report)
            (stage.run_dir / REPORT).write_text(report)

        stage.finish(
            kind="eval",
            base_model=target.base_model,
            metrics=comparison.metrics,
            data={"heldout_pairs": str(heldout_path) if heldout else None, "n": len(heldout)},
            save=save,
            eval_samples=comparison.samples,
        )
    return stage.metrics
