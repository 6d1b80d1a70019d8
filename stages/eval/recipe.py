"""Eval stage: compare a finished stage's output with its parent's (`stage.target`, default dpo).

Recipe: resolve the target stage and, from its manifest, the parent it was trained from ->
load both final/ checkpoints frozen -> `compare_with_parent` on the task's held-out prompts and
the target's held-out pairs -> print the table -> runs/<exp>/eval/ with metrics.json, the
manifest (naming both checkpoints by manifest sha256), eval_samples.jsonl, DONE.

final/ holds the report (the table and the two checkpoints' identities), not a model: eval
trains nothing. A finished eval is a no-op only while it describes the same target
checkpoint with the same config; evaluating another target, a target that was re-trained, or
with other settings runs again. A target whose parent was re-run since it was trained is
stale: eval refuses to compare it with a parent it was not trained from.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.core import handoff
from stages.core.comparison import compare_with_parent
from stages.core.handoff import HandoffError, ParentStage, StaleStageError
from stages.core.lifecycle import StageRun
from stages.core.models import load_stage_model, load_tokenizer
from stages.core.schema import validate_config
from stages.core.stage_steps import HELDOUT_PAIRS
from stages.core.task import stage_task

log = logging.getLogger(__name__)

REPORT = "comparison.txt"


def _resolve_target(runs_root: str, experiment: str, target: str) -> ParentStage:
    return handoff.resolve_parent(runs_root, experiment, target, child="eval")


def _already_evaluated(cfg: DictConfig) -> bool:
    """True when the eval dir is DONE for exactly the current target checkpoint."""
    typed = validate_config(cfg)
    run_dir = handoff.stage_dir(
        typed.paths.runs_root, typed.experiment_name, "eval", typed.paths.variant
    )
    if not handoff.is_done(run_dir):
        return False
    try:
        recorded = json.loads((run_dir / handoff.MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    previous = recorded.get("target") or {}
    target_dir = handoff.stage_dir(typed.paths.runs_root, typed.experiment_name, typed.stage.target)
    manifest = target_dir / handoff.MANIFEST
    resolved = OmegaConf.to_container(cfg, resolve=True)
    same_config = recorded.get("fingerprint", {}).get("config_sha256") == handoff.config_sha256(
        handoff.defining_config(resolved)  # type: ignore[arg-type]
    )
    return (
        same_config
        and previous.get("stage") == typed.stage.target
        and manifest.is_file()
        and previous.get("manifest_sha256") == handoff.file_sha256(manifest)
    )


def run(cfg: DictConfig) -> dict[str, Any]:
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
        parent_ref = target.manifest.get("parent")
        if not parent_ref:
            raise HandoffError(
                f"stage '{knobs.target}' ({target.run_dir}) has no parent stage to compare with"
            )
        parent = handoff.resolve_parent(
            c.paths.runs_root, c.experiment_name, parent_ref["stage"], child="eval"
        )
        if parent.manifest_sha256 != parent_ref["manifest_sha256"]:
            # Comparing with a parent it was not trained from would measure nothing real.
            fix = handoff.make_target(knobs.target, c.experiment_name, "rerun_stale=true")
            raise StaleStageError(
                f"{target.run_dir} is STALE: its parent '{parent.stage}' ({parent.run_dir}) was "
                f"re-run after it was trained from it (parent manifest sha256 "
                f"{parent.manifest_sha256[:12]}... vs recorded "
                f"{str(parent_ref['manifest_sha256'])[:12]}...), so there is nothing fair to "
                f"compare it with. Re-run it first: `{fix}`."
            )
        stage.add_upstream(target)
        stage.add_upstream(parent)
        task = stage_task(stage, parent)  # a user's task: judged by the RM trained on parent

        # 2. The target's held-out pairs (if it has any), read before any weights load, then
        #    both checkpoints, frozen.
        heldout_path = target.run_dir / HELDOUT_PAIRS
        heldout = (
            [json.loads(line) for line in heldout_path.read_text().splitlines() if line.strip()]
            if heldout_path.is_file()
            else []
        )
        tokenizer = load_tokenizer(target.final_dir, c.model)
        policy = load_stage_model(target, c.model, None, stage.precision)
        parent_model = load_stage_model(parent, c.model, None, stage.precision)

        # 3. Compare and report.
        comparison = compare_with_parent(
            policy,
            parent_model,
            tokenizer,
            task=task,
            model_cfg=c.model,
            heldout_pairs=heldout,
            num_kl_samples=knobs.num_kl_samples,
            temperature=knobs.temperature,
            seed=c.seed,
            policy_name=knobs.target,
            parent_name=parent.stage,
        )
        title = f"{c.experiment_name}: {knobs.target} vs its parent {parent.stage}"
        report = f"{title}\n{comparison.table}\n"
        print(report, flush=True)
        stage.manifest_extra.update(
            {"target": target.as_manifest_ref(), "compared_with": parent.as_manifest_ref()}
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
