"""Held-out task evaluation of one model: greedy replies on the task's held-out prompts, judged.

The SFT stage ends with this (it has no parent to compare with); the comparison after every
later stage (`stages.core.comparison`) builds on `greedy_replies`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from stages.core.generation import generate_replies
from stages.core.schema import ModelConfig
from stages.core.task import HeldoutPrompt, Task

log = logging.getLogger(__name__)


def greedy_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[HeldoutPrompt],
    model_cfg: ModelConfig,
) -> list[str]:
    replies = generate_replies(
        model,
        tokenizer,
        [p.messages for p in prompts],
        max_new_tokens=model_cfg.max_new_tokens,
        max_prompt_length=model_cfg.max_prompt_length,
        progress="eval (greedy)",
    )
    return [r[0] for r in replies]


def task_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    model_cfg: ModelConfig,
    *,
    num_samples_logged: int = 4,
    prefix: str = "eval",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy accuracy (where the task tells correct replies; else the judge's mean score),
    the task's reply traits (e.g. evasive rate) and mean reply length on the held-out
    prompts, plus every (prompt, reply, correct or score) sample so others can re-score them."""
    prompts = task.heldout_prompts()
    replies = greedy_replies(model, tokenizer, prompts, model_cfg)
    scores = task.judge().score_all([p.messages for p in prompts], replies)
    correct = [task.correct(s) for s in scores]
    n = max(len(prompts), 1)
    if prompts and None not in correct:
        for p, r, c in list(zip(prompts, replies, correct))[:num_samples_logged]:
            log.info("sample | %s -> %r (%s)", p.text, r, "correct" if c else "wrong")
        samples = [
            {"prompt": p.text, "reply": r, "correct": bool(c)}
            for p, r, c in zip(prompts, replies, correct)
        ]
        metrics: dict[str, Any] = {f"{prefix}/accuracy": sum(map(bool, correct)) / n}
    else:
        for p, r, s in list(zip(prompts, replies, scores))[:num_samples_logged]:
            log.info("sample | %s -> %r (score %.3f)", p.text, r, s)
        samples = [
            {"prompt": p.text, "reply": r, "score": s} for p, r, s in zip(prompts, replies, scores)
        ]
        metrics = {f"{prefix}/reward": sum(scores) / n}
    for flag, has_it in task.eval_flags().items():
        metrics[f"{prefix}/{flag}_rate"] = sum(map(has_it, replies)) / n
    metrics[f"{prefix}/response_chars"] = sum(len(r) for r in replies) / n
    metrics[f"{prefix}/num_prompts"] = len(prompts)
    return metrics, samples
