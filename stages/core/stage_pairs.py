"""The preference pairs a training stage (DPO, RM) uses: a local file, or its parent policy's
own samples on the task's training prompts, judged by rule or by this experiment's reward
model, generated once per experiment and cached (`stages.core.on_policy_pairs`)."""

from __future__ import annotations

import dataclasses
import gc
from typing import TYPE_CHECKING, Any

from data_recipes import pairs as pair_recipes
from stages.core.data_accounting import preference_pairs_to_train
from stages.core.handoff import ParentStage, pairs_cache_root
from stages.core.models import load_stage_model
from stages.core.on_policy_pairs import generate_pairs
from stages.core.reward_scoring import resolve_reward_stage, reward_model_judge
from stages.core.schema import ConfigError
from stages.core.task import JUDGE_REWARD_STAGE, Task, resolve_task

if TYPE_CHECKING:
    import torch

    from stages.core.lifecycle import StageRun


def pair_judge_stage(stage: StageRun) -> ParentStage | None:
    """The RM stage that judges on-policy pairs (``data.pairs.judge=reward_model``), else None.

    Call it before any weights load: a missing RM, or one trained on another SFT output,
    fails here with the command to run.
    """
    c, parent = stage.cfg, stage.parent
    if c.data.pairs.source == "file" or c.data.pairs.judge != "reward_model":
        return None
    assert parent is not None  # preference stages always have a parent
    return resolve_reward_stage(
        c.paths.runs_root, c.experiment_name, JUDGE_REWARD_STAGE, parent, child=stage.name
    )


def stage_preference_pairs(
    stage: StageRun,
    tokenizer: Any,
    policy: torch.nn.Module | None = None,
    task: Task | None = None,
    *,
    sampled_by: dict[str, Any] | None = None,
    seed: int | None = None,
) -> pair_recipes.PairSet:
    """Train / held-out pairs for ``stage`` from ``data.pairs``, without the train pairs
    longer than ``model.max_length`` (counted, logged, and recorded in the manifest).

    On-policy pairs sample the parent stage's policy on ``task``'s training prompts (default:
    the task of ``data.prompts``): pass the policy as ``policy`` when the stage keeps it
    anyway (DPO's reference); otherwise it is loaded here and freed afterwards. The
    reward-model judge, if configured, is loaded here and freed afterwards too. No pair, from
    a file or sampled, has one of the task's held-out prompts.

    ``sampled_by`` (with ``policy``) names another checkpoint than the parent, e.g. a round of
    iterative DPO identified by its weights' sha256: it keys the cache instead of the parent's
    manifest. ``seed`` replaces ``data.pairs.seed`` (a round's own prompts and samples).
    """
    c = stage.cfg
    task = task if task is not None else resolve_task(c)
    with stage.phase("data"):  # sampling on-policy pairs included
        pairs = _source_pairs(stage, tokenizer, policy, task, sampled_by, seed)
        # The trainer's limit: stage.trainer_overrides win over model.max_length, as in its args.
        max_length = c.stage.trainer_overrides.get("max_length", c.model.max_length)
        return preference_pairs_to_train(
            pairs, tokenizer, max_length, stage.name, c.data.max_dropped_fraction
        )


def _source_pairs(
    stage: StageRun,
    tokenizer: Any,
    policy: torch.nn.Module | None,
    task: Task | None,
    sampled_by: dict[str, Any] | None = None,
    seed: int | None = None,
) -> pair_recipes.PairSet:
    c, parent = stage.cfg, stage.parent
    assert parent is not None  # preference stages always have a parent
    assert sampled_by is None or policy is not None, "sampled_by names the policy passed"
    pairs_cfg = c.data.pairs if seed is None else dataclasses.replace(c.data.pairs, seed=seed)
    if pairs_cfg.source == "file":
        return pair_recipes.file_pairs(pairs_cfg, task.heldout_keys() if task else set())
    if task is None:
        raise ConfigError(
            "data.pairs.source=on_policy samples the task's training prompts, but "
            "data.prompts.source=none: set data.prompts.path=<your prompt file> (or "
            "data.prompts.source=toy), or use data.pairs.source=file"
        )
    judge_stage = pair_judge_stage(stage)
    judge = None
    if judge_stage is not None:
        judge = reward_model_judge(judge_stage, c.model, stage.precision)
    sampler = policy if policy is not None else load_stage_model(
        parent, c.model, c.peft, stage.precision
    )  # fmt: skip
    try:
        return generate_pairs(
            sampler,
            tokenizer,
            pairs_cfg=pairs_cfg,
            task=task,
            model_cfg=c.model,
            policy_id=sampled_by if sampled_by is not None else parent.as_manifest_ref(),
            cache_root=pairs_cache_root(c.paths.runs_root, c.experiment_name),
            judge=judge,
        )
    finally:
        if policy is None:
            del sampler  # done sampling: free it before the stage's own model loads
        del judge
        gc.collect()
