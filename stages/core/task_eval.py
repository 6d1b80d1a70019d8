"""Held-out task evaluation on the embedded toy task: greedy accuracy by the rule judge.

Every training stage ends with this; the eval stage builds comparisons on top of it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from data_recipes import toy
from stages.core.generation import generate_replies
from stages.core.schema import ModelConfig, ToyTaskConfig

log = logging.getLogger(__name__)


def greedy_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    problems: list[toy.AdditionProblem],
    model_cfg: ModelConfig,
) -> list[str]:
    replies = generate_replies(
        model,
        tokenizer,
        [p.messages() for p in problems],
        max_new_tokens=model_cfg.max_new_tokens,
        max_prompt_length=model_cfg.max_prompt_length,
        progress="eval (greedy)",
    )
    return [r[0] for r in replies]


def toy_task_metrics(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    toy_cfg: ToyTaskConfig,
    model_cfg: ModelConfig,
    *,
    num_samples_logged: int = 4,
    prefix: str = "eval",
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy accuracy, evasive rate and mean reply length on the held-out prompts, plus
    every (prompt, reply, correct) sample so others can re-score them."""
    problems = toy.eval_prompts(toy_cfg)
    replies = greedy_replies(model, tokenizer, problems, model_cfg)
    correct = [toy.judge(p, r) for p, r in zip(problems, replies)]
    for p, r, c in list(zip(problems, replies, correct))[:num_samples_logged]:
        log.info("sample | %s -> %r (%s)", p.prompt, r, "correct" if c else "wrong")
    n = max(len(problems), 1)
    samples = [
        {"prompt": p.prompt, "reply": r, "correct": bool(c)}
        for p, r, c in zip(problems, replies, correct)
    ]
    metrics = {
        f"{prefix}/accuracy": sum(correct) / n,
        f"{prefix}/evasive_rate": sum(r.strip() == toy.EVASIVE_REPLY for r in replies) / n,
        f"{prefix}/response_chars": sum(len(r) for r in replies) / n,
        f"{prefix}/num_prompts": len(problems),
    }
    return metrics, samples
