"""The rollout: sample completions from the policy and score them with the other three roles.

Owns: the prompt batch (left-padded by `stages.core.generation.left_pad`), the KV-cached
temperature sampler (which also returns the log-probs of the sampled tokens at temperature T,
so the rollout needs no extra policy forward), truncation after the first stop token, the missing-EOS penalty, and the ``Rollout``
record the trainer turns into advantages. All of it runs without gradients, with dropout off.

Layout of every sequence tensor: ``[prompt (left-padded) | response (right-padded)]``; the
response part of each row is the sampled tokens up to and including the stop token, then pad.
Masks are explicit booleans: pad ids are never used to infer them, so pad == eos is fine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import nn
from trl.trainer.utils import pad

from stages.core.generation import left_pad
from stages.ppo.advantages import last_token_index
from stages.ppo.config import PPOConfigError

if TYPE_CHECKING:
    from stages.ppo.roles import PPORoles

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- prompts


def left_pad_prompts(
    prompts: Sequence[Sequence[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id lists into ``(ids, mask)``; left padding keeps every prompt's last
    token in the last column, where generation continues from."""
    width = max(len(p) for p in prompts)
    if width == 0:
        raise ValueError("every prompt is empty: PPO needs at least one prompt token")
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} of the batch is empty")
    ids, mask = left_pad(prompts, pad_token_id)
    return ids, mask.bool()


def fit_prompts_to_context(
    prompts: list[list[int]], response_length: int, context: int | None
) -> list[list[int]]:
    """Prompts left-truncated so that prompt + ``response_length`` fits ``context`` positions
    (the policy's, from its config; None = no limit). The end of a prompt is kept: the question
    and the generation prompt are there. Unchanged when everything fits."""
    if context is None:
        return prompts
    room = context - response_length
    if room < 1:
        raise PPOConfigError(
            f"stage.response_length={response_length} leaves no room for a prompt in the "
            f"policy's context of {context} positions: set stage.response_length < {context}"
        )
    longest = max(len(p) for p in prompts)
    if longest <= room:
        return prompts
    cut = sum(len(p) > room for p in prompts)
    log.warning(
        "the policy's context is %d positions: %d of %d PPO prompts (longest %d tokens) keep "
        "only their last %d tokens so that stage.response_length=%d fits. To avoid this, set "
        "model.max_prompt_length <= %d",
        context, cut, len(prompts), longest, room, response_length, room,
    )  # fmt: skip
    return [p[-room:] for p in prompts]


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over the real tokens of each row (pads get 0; they are never attended)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


# --------------------------------------------------------------------------- sampling


@torch.no_grad()
def sample_completions(
    model: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    stop_token_id: int | None,
    pad_token_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample up to ``max_new_tokens`` tokens per row at ``temperature``, KV-cached.

    Returns ``(tokens, logprobs)``, both ``[batch, n]`` with ``n <= max_new_tokens`` (the loop
    stops once every row has emitted the stop token). After a row's stop token its tokens are
    ``pad_token_id`` and its log-probs 0. Log-probs are log softmax(logits / T) of the sampled
    tokens: the "old" log-probs of the PPO ratio, with no second policy forward.

    A hand-rolled loop rather than ``model.generate``: pure temperature sampling (no top-k /
    top-p from the model's generation_config sneaking in and breaking the log-prob at T), the
    log-probs come for free, and for small models it avoids generate's per-step overhead
    (measured in bench/ppo_vs_trl.py).
    """
    batch = query_ids.shape[0]
    device = query_ids.device
    attention = query_mask.long()
    positions = position_ids_from_mask(query_mask)
    out = model(
        input_ids=query_ids,
        attention_mask=attention,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
    )
    next_position = positions[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[torch.Tensor] = []
    logprobs: list[torch.Tensor] = []
    for step in range(max_new_tokens):
        step_logprobs = torch.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)
        token = torch.multinomial(step_logprobs.exp(), 1, generator=generator).squeeze(-1)
        token = token.masked_fill(finished, pad_token_id)
        picked = step_logprobs.gather(-1, token.unsqueeze(-1)).squeeze(-1)
        tokens.append(token)
        logprobs.append(picked.masked_fill(finished, 0.0))
        if stop_token_id is not None:
            finished |= token == stop_token_id
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        attention = torch.cat([attention, attention.new_ones(batch, 1)], dim=1)
        out = model(
            input_ids=token.unsqueeze(-1),
            attention_mask=attention,
            position_ids=next_position,
            cache=out.cache,  # transformers 5 name; `past_key_values` goes in 5.40
            use_cache=True,
        )
        next_position = next_position + 1
    return torch.stack(tokens, dim=1), torch.stack(logprobs, dim=1)


def truncate_after_stop(
    tokens: torch.Tensor, stop_token_id: int | None, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep each row up to and including its first stop token; later tokens become pad.

    Returns ``(tokens, mask, contains_stop)``: ``mask`` marks the kept tokens, and
    ``contains_stop`` says whether the row emitted the stop token at all. With no stop token
    every row is kept whole and ``contains_stop`` is all False.
    """
    length = tokens.shape[1]
    if stop_token_id is None:
        mask = torch.ones_like(tokens, dtype=torch.bool)
        return tokens.clone(), mask, torch.zeros(tokens.shape[0], dtype=torch.bool)
    is_stop = tokens == stop_token_id
    contains_stop = is_stop.any(dim=1)
    # Index of the first stop token, or `length` when there is none.
    first_stop = torch.where(contains_stop, is_stop.int().argmax(dim=1), length)
    columns = torch.arange(length, device=tokens.device)
    mask = columns.unsqueeze(0) <= first_stop.unsqueeze(1)
    return tokens.masked_fill(~mask, pad_token_id), mask, contains_stop


def apply_missing_eos_penalty(
    scores: torch.Tensor, contains_eos: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """scores - penalty for rows that never emitted EOS (a new tensor; None: unchanged)."""
    if penalty is None:
        return scores.clone()
    return scores - penalty * (~contains_eos).to(scores.dtype)


# --------------------------------------------------------------------------- the record


@dataclass
class Rollout:
    """One update's samples and everything PPO needs from the frozen roles, per local rank."""

    query_ids: torch.Tensor  # [B, Q] left-padded prompts
    query_mask: torch.Tensor  # [B, Q] bool
    response_ids: torch.Tensor  # [B, R] truncated after the stop token, then pad
    response_mask: torch.Tensor  # [B, R] bool: tokens up to and including the stop token
    logprobs: torch.Tensor  # [B, R] policy log-probs at T of the sampled tokens (0 off-mask)
    ref_logprobs: torch.Tensor  # [B, R] reference log-probs at T (0 off-mask)
    values: torch.Tensor  # [B, R] value of the state before each response token (0 off-mask)
    scores: torch.Tensor  # [B] RM score at the last real token, minus the missing-EOS penalty
    raw_scores: torch.Tensor  # [B] RM score before the penalty
    contains_eos: torch.Tensor  # [B] bool: the completion emitted the stop token

    def sequences(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, position_ids) of prompt + truncated response."""
        ids = torch.cat([self.query_ids, self.response_ids], dim=1)
        mask = torch.cat([self.query_mask, self.response_mask], dim=1)
        return ids, mask, position_ids_from_mask(mask)

    @property
    def response_lengths(self) -> torch.Tensor:
        return self.response_mask.sum(-1)

    def select(self, rows: torch.Tensor) -> Rollout:
        """The rows ``rows`` of every field (a minibatch)."""
        return Rollout(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    @staticmethod
    def concat(parts: Sequence[Rollout], pad_token_id: int) -> Rollout:
        """Join chunks along the batch. Chunks share the prompt width but may stop sampling
        at different lengths, so responses are right-padded (pad id, mask False, zeros)."""
        if len(parts) == 1:
            return parts[0]
        merged = {}
        for f in fields(Rollout):
            tensors = [getattr(p, f.name) for p in parts]
            if f.name.startswith("response_") or f.name in ("logprobs", "ref_logprobs", "values"):
                fill = pad_token_id if f.name == "response_ids" else 0
                rows = [row for t in tensors for row in t]  # trl's pad stacks rows, right-padded
                merged[f.name] = pad(rows, padding_value=fill, padding_side="right")
            else:
                merged[f.name] = torch.cat(tensors, dim=0)
        return Rollout(**merged)


# --------------------------------------------------------------------------- collection


@dataclass(frozen=True)
class RolloutSettings:
    """What the rollout needs besides the models (resolved from PPOHyperparams + tokenizer)."""

    response_length: int
    temperature: float
    stop_token_id: int | None
    pad_token_id: int
    eos_token_id: int | None = None  # only used for the EOS flag when stop_token_id is None
    missing_eos_penalty: float | None = None
    forward_batch_size: int | None = None  # rows per no-grad forward (None: all at once)


@torch.no_grad()
def collect_rollout(
    roles: PPORoles,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    settings: RolloutSettings,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one completion per prompt and score it: policy log-probs (from sampling),
    reference log-probs, values, and the RM score of the truncated text at its last token."""
    chunk = settings.forward_batch_size or query_ids.shape[0]
    parts = []
    for start in range(0, query_ids.shape[0], chunk):
        q_ids, q_mask = query_ids[start : start + chunk], query_mask[start : start + chunk]
        with roles.generation_policy() as policy:
            tokens, logprobs = sample_completions(
                policy, q_ids, q_mask,
                max_new_tokens=settings.response_length,
                temperature=settings.temperature,
                stop_token_id=settings.stop_token_id,
                pad_token_id=settings.pad_token_id,
                generator=generator,
            )  # fmt: skip
        response_ids, response_mask, contains_stop = truncate_after_stop(
            tokens, settings.stop_token_id, settings.pad_token_id
        )
        if settings.stop_token_id is None and settings.eos_token_id is not None:
            contains_eos = (tokens == settings.eos_token_id).any(dim=1)
        else:
            contains_eos = contains_stop
        ids = torch.cat([q_ids, response_ids], dim=1)
        mask = torch.cat([q_mask, response_mask], dim=1)
        positions = position_ids_from_mask(mask)
        last_index = q_ids.shape[1] + last_token_index(response_mask)
        ref_logprobs, values, raw_scores = roles.score_rollout(
            ids, mask, positions, response_ids, last_index, settings.temperature
        )
        parts.append(
            Rollout(
                query_ids=q_ids,
                query_mask=q_mask,
                response_ids=response_ids,
                response_mask=response_mask,
                logprobs=logprobs.masked_fill(~response_mask, 0.0),
                ref_logprobs=ref_logprobs.masked_fill(~response_mask, 0.0),
                values=values.float().masked_fill(~response_mask, 0.0),
                scores=apply_missing_eos_penalty(
                    raw_scores.float(), contains_eos, settings.missing_eos_penalty
                ),
                raw_scores=raw_scores.float(),
                contains_eos=contains_eos,
            )
        )
    return Rollout.concat(parts, settings.pad_token_id)
