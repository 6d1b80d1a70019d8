"""Forgetting: how much of what SFT taught a later stage still knows, next to its parent.

Two measures, each for the stage's policy and its parent (and the SFT's own figure where the
SFT recorded one), on data the stage never trained on:

- **retained skills** (`Task.retained_skills`): greedy held-out accuracy on a skill SFT
  taught that the stage's own data never touches (the embedded task's ``What is A - B?``).
  ``forgetting/<skill>`` = parent's accuracy - policy's (points lost; > 0 = forgotten).
- **held-out SFT replies** (any data, a user's own file included): mean per-token
  log-likelihood of the replies in the SFT stage's validation rows (``validation.jsonl`` in
  its run dir, written when ``stage.validation_fraction > 0``).
  ``forgetting/sft_replies`` = parent's - policy's (nats per reply token; > 0 = forgotten).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from stages.core.comparison import response_logprobs, tokenize_completion
from stages.core.handoff import ParentStage, resolve_parent
from stages.core.schema import ModelConfig
from stages.core.task import RetainedSkill, Task
from stages.core.task_eval import greedy_replies
from stages.core.validation import VALIDATION_ROWS

log = logging.getLogger(__name__)

PREFIX = "forgetting"
SFT_STAGE = "sft"
SFT_REPLIES = "sft_replies"
# Held-out SFT replies scored per model: enough for a stable mean, cheap next to the eval.
MAX_SFT_REPLIES = 256

Messages = list[dict[str, str]]


def skill_accuracy(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    skill: RetainedSkill,
    model_cfg: ModelConfig,
) -> float:
    """Greedy accuracy of ``model`` on ``skill``'s held-out prompts."""
    replies = greedy_replies(model, tokenizer, skill.prompts, model_cfg)
    scores = skill.judge.score_all([p.messages for p in skill.prompts], replies)
    return sum(s == 1.0 for s in scores) / max(len(scores), 1)


def sft_heldout_conversations(sft_dir: Path, limit: int | None = MAX_SFT_REPLIES) -> list[Messages]:
    """The first ``limit`` (None: all) conversations of the SFT's validation rows (its
    validation.jsonl) that end in a reply."""
    path = sft_dir / VALIDATION_ROWS
    if not path.is_file():
        return []
    rows: list[Messages] = []
    for line in path.read_text().splitlines():
        if line.strip():
            messages = json.loads(line).get("messages") or []
            if len(messages) >= 2 and messages[-1].get("role") == "assistant":
                rows.append(messages)
        if limit is not None and len(rows) >= limit:
            break
    return rows


def reply_loglikelihood(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages]
) -> float:
    """Mean log-likelihood per reply token of each conversation's last reply given the rest,
    tokenised as TRL's trainers do (chat template, generation prompt)."""
    split = [tokenize_completion(tokenizer, c[:-1], c[-1:]) for c in conversations]
    logps = response_logprobs(
        model, [p for p, _ in split], [r for _, r in split], pad_token_id=tokenizer.pad_token_id
    )
    tokens = sum(len(x) for x in logps)
    return float(sum(x.sum() for x in logps) / max(tokens, 1))


def lineage_stage(parent: ParentStage, name: str, runs_root: str, experiment: str) -> ParentStage:
    """``name`` in ``parent``'s lineage: ``parent`` itself or the ancestor its manifests name."""
    current = parent
    while current.stage != name:
        ref = current.manifest.get("parent") or {}
        if not ref.get("stage"):
            raise LookupError(f"no '{name}' stage in the lineage of {parent.run_dir}")
        current = resolve_parent(runs_root, experiment, ref["stage"], child=parent.stage)
    return current


def lineage_sft(parent: ParentStage, runs_root: str, experiment: str) -> ParentStage | None:
    """The SFT stage of ``parent``'s lineage (``parent`` itself, usually); None without one."""
    try:
        return lineage_stage(parent, SFT_STAGE, runs_root, experiment)
    except LookupError:
        return None  # a lineage that starts from the base model


def forgetting_metrics(
    policy: torch.nn.Module,
    parent_policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | None,
    model_cfg: ModelConfig,
    sft: ParentStage | None,
) -> tuple[dict[str, float], list[tuple[str, Any, Any]]]:
    """``forgetting/*`` metrics of ``policy`` next to ``parent_policy`` (see the module
    docstring) and their comparison-table rows. ``sft``: the SFT stage of the lineage, whose
    recorded skill accuracies and held-out replies are read (None: neither)."""
    m: dict[str, float] = {}
    rows: list[tuple[str, Any, Any]] = []
    sft_metrics = sft.manifest.get("metrics", {}) if sft is not None else {}
    for skill in task.retained_skills() if task is not None else []:
        key = f"{PREFIX}/{skill.name}"
        mine = skill_accuracy(policy, tokenizer, skill, model_cfg)
        theirs = skill_accuracy(parent_policy, tokenizer, skill, model_cfg)
        m.update({f"{key}/accuracy": mine, f"{key}/parent_accuracy": theirs, key: theirs - mine})
        if f"{key}/accuracy" in sft_metrics:
            m[f"{key}/sft_accuracy"] = float(sft_metrics[f"{key}/accuracy"])
        rows.append((f"{skill.name} accuracy (not trained here)", theirs, mine))
    conversations = sft_heldout_conversations(sft.run_dir) if sft is not None else []
    if conversations:
        key = f"{PREFIX}/{SFT_REPLIES}"
        mine = reply_loglikelihood(policy, tokenizer, conversations)
        theirs = reply_loglikelihood(parent_policy, tokenizer, conversations)
        m.update(
            {
                f"{key}/loglik_per_token": mine,
                f"{key}/parent_loglik_per_token": theirs,
                f"{key}/count": float(len(conversations)),
                key: theirs - mine,
            }
        )
        rows.append(("held-out SFT replies loglik/token", theirs, mine))
    elif sft is not None:
        log.info(
            "forgetting on held-out SFT replies not measured: %s has no %s (train the SFT with "
            "stage.validation_fraction > 0)",
            sft.run_dir,
            VALIDATION_ROWS,
        )
    return m, rows


def skill_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | None,
    model_cfg: ModelConfig,
) -> dict[str, float]:
    """``forgetting/<skill>/accuracy`` of one model (the SFT's, which later stages read)."""
    return {
        f"{PREFIX}/{skill.name}/accuracy": skill_accuracy(model, tokenizer, skill, model_cfg)
        for skill in (task.retained_skills() if task is not None else [])
    }
