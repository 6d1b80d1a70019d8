"""Compare a stage's policy with its parent on held-out data: the eval every stage ends with.

Owns `compare_with_parent` (used by the eval stage and at the end of each training stage)
and the log-prob helpers it is built from:

- on the task's held-out prompts (`stages.core.task`), greedy replies of both models scored by
  the task's judge: mean score (``policy_reward`` / ``parent_reward``: the RM's reward on a
  user's task), win rate (policy reply vs parent reply per prompt, ties counted), and
  accuracy where the judge tells correct from incorrect (the embedded addition task);
- mean per-token KL(policy || parent) on the policy's own samples: sample at temperature T,
  then sum over response tokens of ``logp_policy - logp_parent`` (both at T) / token count;
- mean response length (characters and tokens) of the greedy replies;
- preference accuracy and mean log-prob margin (chosen - rejected, summed over the response
  tokens) on held-out pairs, for both models, plus the implicit-reward accuracy of the policy
  against the parent (what DPO's ``rewards/accuracies`` reports at train time).

Responses are tokenised exactly as TRL's preference trainers do: the prompt rendered with the
chat template and the generation prompt, the completion = (prompt + reply) minus that prefix,
so the margins here are the quantities DPO optimises.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.core.generation import (
    chat_ids,
    context_length,
    fit_sequence,
    generate_ids,
    render_prompts,
    right_pad,
)
from stages.core.runtime import is_main_process
from stages.core.schema import ModelConfig
from stages.core.task import HeldoutPrompt, Task
from stages.core.task_eval import greedy_replies

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
# How the parent side sees a prompt (None: as the policy does); the eval stage's few-shot base
# gets earlier demonstration turns before each prompt (stages/eval/baseline.py).
PromptView = Callable[[Messages], Messages]


@dataclass
class Comparison:
    """Metrics of a policy vs its parent, the printable table, and per-prompt samples."""

    metrics: dict[str, float]
    table: str
    samples: list[dict[str, Any]] = field(default_factory=list)
    rows: list[tuple[str, Any, Any]] = field(default_factory=list)  # (metric, parent, policy)


def with_rows(
    comparison: Comparison,
    metrics: dict[str, float],
    rows: list[tuple[str, Any, Any]],
    policy_name: str,
    parent_name: str,
) -> Comparison:
    """``comparison`` plus more metrics and table rows (e.g. `stages.core.forgetting`'s)."""
    all_rows = [*comparison.rows, *rows]
    return replace(
        comparison,
        metrics={**comparison.metrics, **metrics},
        table=_table(all_rows, policy_name, parent_name),
        rows=all_rows,
    )


# ------------------------------------------------------------------------- log-probs


def tokenize_completion(
    tokenizer: PreTrainedTokenizerBase,
    prompt: Messages | str,
    completion: Messages | str,
) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) the way TRL's DPOTrainer tokenises a preference row."""
    if isinstance(prompt, str):
        completion_text = completion if isinstance(completion, str) else completion[-1]["content"]
        if not completion_text.endswith(tokenizer.eos_token):
            completion_text += tokenizer.eos_token  # TRL appends EOS to plain-text completions
        prompt_ids = tokenizer(prompt)["input_ids"]
        full_ids = tokenizer(prompt + completion_text)["input_ids"]
    else:
        reply = completion if isinstance(completion, list) else [
            {"role": "assistant", "content": completion}
        ]  # fmt: skip
        prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
        full_ids = chat_ids(tokenizer, [*prompt, *reply])
    # commonprefix compares any sequences element by element, token ids included.
    cut = len(os.path.commonprefix([prompt_ids, full_ids]))  # noqa: RUF071
    return full_ids[:cut], full_ids[cut:]


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """Per-token log-probs (fp32) of each response given its prompt, at ``temperature``.

    Right-padded batches: every sequence starts at position 0, as in training. A sequence
    longer than the model's context is fitted to it (`generation.fit_sequence`: prompt
    left-truncated, then the response's end unscored), so its tensor may be shorter than
    its response.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    context = context_length(model)
    out: list[torch.Tensor] = []
    for start in range(0, len(prompt_ids), batch_size):
        fitted = [
            fit_sequence(p, r, context)
            for p, r in zip(
                prompt_ids[start : start + batch_size], response_ids[start : start + batch_size]
            )
        ]
        prompts, responses = [f[0] for f in fitted], [f[1] for f in fitted]
        seqs = [list(p) + list(r) for p, r in zip(prompts, responses)]
        input_ids, attention = right_pad(seqs, pad_token_id)
        logits = model(
            input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False
        ).logits.float()
        logps = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
        targets = input_ids[:, 1:].to(device)
        token_logps = logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        for row, (p, r) in enumerate(zip(prompts, responses)):
            # Token t of the sequence is predicted at position t - 1.
            out.append(token_logps[row, len(p) - 1 : len(p) - 1 + len(r)])
    model.train(was_training)
    return out


def sample_responses(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    *,
    temperature: float,
    max_new_tokens: int,
    max_prompt_length: int,
    seed: int,
    batch_size: int = 64,
) -> tuple[list[list[int]], list[list[int]]]:
    """One sampled response per prompt, as token ids (cut after the first EOS, inclusive):
    the KL estimate must score exactly the tokens that were sampled."""
    prompt_ids, responses = generate_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        max_prompt_length=max_prompt_length,
        batch_size=batch_size,
        do_sample=True,
        temperature=temperature,
        seed=seed,
    )
    return prompt_ids, [rows[0] for rows in responses]


def kl_per_token(
    policy: torch.nn.Module,
    parent: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    model_cfg: ModelConfig,
    *,
    temperature: float = 1.0,
    seed: int = 0,
    parent_view: PromptView | None = None,
) -> dict[str, float]:
    """Monte-Carlo KL(policy || parent) per response token on the policy's own samples
    (scored by the parent after ``parent_view(prompt)`` when given)."""
    prompt_ids, responses = sample_responses(
        policy,
        tokenizer,
        prompts,
        temperature=temperature,
        max_new_tokens=model_cfg.max_new_tokens,
        max_prompt_length=model_cfg.max_prompt_length,
        seed=seed,
    )
    kept = [(p, r) for p, r in zip(prompt_ids, responses) if r]
    if not kept:
        return {"kl_per_token": float("nan"), "kl_tokens": 0.0}
    p_ids, r_ids = [k[0] for k in kept], [k[1] for k in kept]
    parent_ids = p_ids
    if parent_view is not None:
        viewed = [parent_view(m) for m, r in zip(prompts, responses) if r]
        parent_ids = render_prompts(tokenizer, viewed, model_cfg.max_prompt_length)
    pad = tokenizer.pad_token_id
    on_policy = response_logprobs(policy, p_ids, r_ids, pad_token_id=pad, temperature=temperature)
    on_parent = response_logprobs(
        parent, parent_ids, r_ids, pad_token_id=pad, temperature=temperature
    )
    total = sum(float((a - b).sum()) for a, b in zip(on_policy, on_parent))
    tokens = sum(len(a) for a in on_policy)  # the tokens scored (all, when they fit)
    return {
        "kl_per_token": total / tokens,
        "kl_per_sequence": total / len(r_ids),
        "kl_tokens": float(tokens),
    }


def preference_logps(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[dict[str, Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs of chosen and of rejected, one entry per pair."""
    chosen = [tokenize_completion(tokenizer, p["prompt"], p["chosen"]) for p in pairs]
    rejected = [tokenize_completion(tokenizer, p["prompt"], p["rejected"]) for p in pairs]
    pad = tokenizer.pad_token_id
    lc = response_logprobs(model, [c[0] for c in chosen], [c[1] for c in chosen], pad_token_id=pad)
    lr = response_logprobs(
        model, [r[0] for r in rejected], [r[1] for r in rejected], pad_token_id=pad
    )
    return torch.stack([x.sum() for x in lc]), torch.stack([x.sum() for x in lr])


# ------------------------------------------------------------------------ comparison


def _table(rows: list[tuple[str, Any, Any]], policy_name: str, parent_name: str) -> str:
    def fmt(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    header = ("metric", parent_name, policy_name, "delta")
    body = []
    for name, parent_value, policy_value in rows:
        delta = None
        if isinstance(parent_value, float) and isinstance(policy_value, float):
            delta = policy_value - parent_value
        body.append((name, fmt(parent_value), fmt(policy_value), fmt(delta)))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    line = "-+-".join("-" * w for w in widths)
    render = [
        " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in [header, *body]
    ]
    return "\n".join([render[0], line, *render[1:]])


def _task_comparison(
    m: dict[str, float],
    policy: torch.nn.Module,
    parent: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    prompts: list[HeldoutPrompt],
    model_cfg: ModelConfig,
    prefix: str,
    parent_view: PromptView | None = None,
) -> tuple[list[tuple[str, Any, Any]], list[dict[str, Any]]]:
    """Greedy replies of both models on the task's held-out prompts, judged: mean score, win /
    tie / loss per prompt, accuracy where the task tells correct replies, reply traits and
    lengths. Adds the metrics to ``m``; returns the table rows and the per-prompt samples."""
    mine = greedy_replies(policy, tokenizer, prompts, model_cfg)
    parent_prompts = prompts
    if parent_view is not None:
        parent_prompts = [replace(p, messages=parent_view(p.messages)) for p in prompts]
    theirs = greedy_replies(parent, tokenizer, parent_prompts, model_cfg)
    judge = task.judge()
    messages = [p.messages for p in prompts]
    s_mine = judge.score_all(messages, mine)
    s_theirs = judge.score_all(messages, theirs)
    del judge  # a reward model: free it before the KL forward passes
    n = max(len(prompts), 1)
    wins = sum(a > b for a, b in zip(s_mine, s_theirs))
    ties = sum(a == b for a, b in zip(s_mine, s_theirs))
    losses = sum(a < b for a, b in zip(s_mine, s_theirs))
    judged = [task.correct(s) for s in s_mine]
    judges_correctness = bool(prompts) and None not in judged
    rows: list[tuple[str, Any, Any]] = []
    if judges_correctness:
        c_mine = [bool(task.correct(s)) for s in s_mine]
        c_theirs = [bool(task.correct(s)) for s in s_theirs]
        m.update(
            {
                f"{prefix}/policy_accuracy": sum(c_mine) / n,
                f"{prefix}/parent_accuracy": sum(c_theirs) / n,
                f"{prefix}/accuracy_delta": (sum(c_mine) - sum(c_theirs)) / n,
            }
        )
        rows.append(
            ("greedy accuracy", m[f"{prefix}/parent_accuracy"], m[f"{prefix}/policy_accuracy"])
        )
    m.update(
        {
            f"{prefix}/win_rate": wins / n,
            f"{prefix}/tie_rate": ties / n,
            f"{prefix}/loss_rate": losses / n,
        }
    )
    for flag, has_it in task.reply_flags().items():
        m[f"{prefix}/policy_{flag}_rate"] = sum(map(has_it, mine)) / n
        m[f"{prefix}/parent_{flag}_rate"] = sum(map(has_it, theirs)) / n
        rows.append(
            (f"{flag} rate", m[f"{prefix}/parent_{flag}_rate"], m[f"{prefix}/policy_{flag}_rate"])
        )
    tok = [len(tokenizer(r)["input_ids"]) for r in mine]
    tok_parent = [len(tokenizer(r)["input_ids"]) for r in theirs]
    m.update(
        {
            f"{prefix}/policy_response_chars": sum(map(len, mine)) / n,
            f"{prefix}/parent_response_chars": sum(map(len, theirs)) / n,
            f"{prefix}/policy_response_tokens": sum(tok) / n,
            f"{prefix}/parent_response_tokens": sum(tok_parent) / n,
            f"{prefix}/num_prompts": float(len(prompts)),
            # The judge's mean score (the RM's reward on a user's task; the toy's accuracy).
            f"{prefix}/policy_reward": sum(s_mine) / n,
            f"{prefix}/parent_reward": sum(s_theirs) / n,
        }
    )
    if not judges_correctness:
        rows.append(
            ("mean reward (judge)", m[f"{prefix}/parent_reward"], m[f"{prefix}/policy_reward"])
        )
    rows += [
        (
            "response length (chars)",
            m[f"{prefix}/parent_response_chars"],
            m[f"{prefix}/policy_response_chars"],
        ),
        (
            "response length (tokens)",
            m[f"{prefix}/parent_response_tokens"],
            m[f"{prefix}/policy_response_tokens"],
        ),
        ("win / tie / loss", None, f"{wins} / {ties} / {losses} of {len(prompts)}"),
    ]
    if judges_correctness:
        samples = [
            {
                "prompt": p.text,
                **p.fields,
                "reply": a,
                "correct": bool(task.correct(sa)),
                "parent_reply": b,
                "parent_correct": bool(task.correct(sb)),
            }
            for p, a, b, sa, sb in zip(prompts, mine, theirs, s_mine, s_theirs)
        ]
    else:
        samples = [
            {
                "prompt": p.text,
                **p.fields,
                "reply": a,
                "score": sa,
                "parent_reply": b,
                "parent_score": sb,
            }
            for p, a, b, sa, sb in zip(prompts, mine, theirs, s_mine, s_theirs)
        ]
    return rows, samples


def compare_with_parent(
    policy: torch.nn.Module,
    parent: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    task: Task | None,
    model_cfg: ModelConfig,
    heldout_pairs: Sequence[dict[str, Any]] = (),
    num_kl_samples: int = 64,
    temperature: float = 1.0,
    seed: int = 0,
    policy_name: str = "policy",
    parent_name: str = "parent",
    prefix: str = "compare",
    parent_view: PromptView | None = None,
) -> Comparison:
    """Score ``policy`` against ``parent`` (see the module docstring); nothing is trained.

    ``task=None`` skips the task metrics (reward, win rate, accuracy; the KL prompts come from
    the held-out pairs then); ``heldout_pairs`` empty skips the preference metrics.
    ``parent_view`` rewrites each prompt the parent sees (greedy replies, KL, pairs); the
    judge still scores the reply against the plain prompt.
    """
    m: dict[str, float] = {}
    rows: list[tuple[str, Any, Any]] = []
    samples: list[dict[str, Any]] = []
    steps = ["greedy", "kl", "pairs"]
    bar = tqdm(steps, desc=f"compare {policy_name} vs {parent_name}", disable=not is_main_process())
    kl_prompts: list[Messages] = []
    for step in bar:
        if step == "greedy" and task is not None:
            prompts = task.heldout_prompts()
            task_rows, samples = _task_comparison(
                m, policy, parent, tokenizer, task, prompts, model_cfg, prefix, parent_view
            )
            rows += task_rows
            kl_prompts = [p.messages for p in prompts]
        elif step == "kl" and num_kl_samples > 0:
            if not kl_prompts:
                kl_prompts = [
                    p["prompt"] for p in heldout_pairs if not isinstance(p["prompt"], str)
                ]
            if kl_prompts:
                chosen = [kl_prompts[i % len(kl_prompts)] for i in range(num_kl_samples)]
                kl = kl_per_token(
                    policy,
                    parent,
                    tokenizer,
                    chosen,
                    model_cfg,
                    temperature=temperature,
                    seed=seed,
                    parent_view=parent_view,
                )
                m.update({f"{prefix}/{k}": v for k, v in kl.items()})
                rows.append(
                    (f"KL(policy||parent)/token @T={temperature:g}", None, kl["kl_per_token"])
                )
        elif step == "pairs" and heldout_pairs:
            pol_c, pol_r = preference_logps(policy, tokenizer, heldout_pairs)
            parent_pairs = heldout_pairs
            if parent_view is not None:
                parent_pairs = [
                    p if isinstance(p["prompt"], str) else {**p, "prompt": parent_view(p["prompt"])}
                    for p in heldout_pairs
                ]
            par_c, par_r = preference_logps(parent, tokenizer, parent_pairs)
            pol_margin, par_margin = pol_c - pol_r, par_c - par_r
            implicit = (pol_c - par_c) - (pol_r - par_r)
            m.update(
                {
                    f"{prefix}/heldout_pairs": float(len(heldout_pairs)),
                    f"{prefix}/policy_pref_accuracy": float((pol_margin > 0).float().mean()),
                    f"{prefix}/parent_pref_accuracy": float((par_margin > 0).float().mean()),
                    f"{prefix}/policy_logp_margin": float(pol_margin.mean()),
                    f"{prefix}/parent_logp_margin": float(par_margin.mean()),
                    f"{prefix}/implicit_reward_accuracy": float((implicit > 0).float().mean()),
                }
            )
            rows += [
                (
                    f"held-out pref. accuracy (n={len(heldout_pairs)})",
                    m[f"{prefix}/parent_pref_accuracy"],
                    m[f"{prefix}/policy_pref_accuracy"],
                ),
                (
                    "held-out logp margin (chosen-rejected)",
                    m[f"{prefix}/parent_logp_margin"],
                    m[f"{prefix}/policy_logp_margin"],
                ),
                ("implicit reward accuracy", None, m[f"{prefix}/implicit_reward_accuracy"]),
            ]
    table = _table(rows, policy_name, parent_name)
    return Comparison(metrics=m, table=table, samples=samples, rows=rows)
