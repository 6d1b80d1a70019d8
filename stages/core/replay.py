"""Replay mixing (``data.mix``): SFT demonstrations kept in a later stage's loss.

A preference or RL stage pushed hard on one task drifts away from what SFT taught (the
forgetting `stages.core.forgetting` measures). Replay adds the language-modelling loss of SFT
demonstrations to the stage's own loss, scaled by ``data.mix.coef``:

- DPO / KTO: ``loss = trl_loss + coef * NLL(replay batch)`` per micro-batch, through
  `with_replay`, a subclass of the TRL trainer that adds the term in ``compute_loss``;
- PPO: the PPO-ptx term of InstructGPT (Ouyang et al., 2022, eq. 2), with SFT
  demonstrations in place of pretraining text: ``stages.ppo.trainer`` adds
  ``coef * NLL(replay batch)`` to each micro-batch's PPO loss.

Owns loading the replay conversations (``source=sft``: this experiment's SFT rows minus the
SFT stage's held-out rows, which forgetting is measured on; ``source=file``: any SFT-format
file), tokenising them as TRL's trainers do (chat template, only the last reply is a target),
and drawing seeded batches laid out like PPO rollouts (left-padded prompts, right-padded
replies), so one layout serves both trainer kinds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedTokenizerBase

from data_recipes.accounting import RowAccount
from data_recipes.rows import DataFormatError
from stages.core.comparison import tokenize_completion
from stages.core.forgetting import lineage_sft, sft_heldout_conversations
from stages.core.generation import left_pad, right_pad
from stages.core.runtime import process_rank

if TYPE_CHECKING:
    from stages.core.lifecycle import StageRun

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


@dataclass
class ReplayBatch:
    """Prompts left-padded, replies right-padded: the rollout layout of `stages.ppo`."""

    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor

    def to(self, device: torch.device | str) -> ReplayBatch:
        return ReplayBatch(*(t.to(device) for t in vars(self).values()))


def _conversation_key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True)


def replay_conversations(stage: StageRun) -> tuple[list[Messages], dict[str, Any]]:
    """The conversations ``stage`` replays (``data.mix``) and what its manifest records."""
    from data_recipes.formats import load_sft_file
    from data_recipes.sft_data import load_sft_rows

    c = stage.cfg
    mix = c.data.mix
    if mix.source == "file":
        account = RowAccount(str(mix.path))
        rows = load_sft_file(mix.path, format=mix.format, account=account)
        held_out: set[str] = set()
    else:  # sft: the SFT's own data, without the rows it held out for validation
        rows = load_sft_rows(c.data).dataset
        held_out = set()
        sft = None
        if stage.parent is not None:
            sft = lineage_sft(stage.parent, c.paths.runs_root, c.experiment_name)
        if sft is not None:  # rows without a final reply are never replayed anyway
            held_out = set(map(_conversation_key, sft_heldout_conversations(sft.run_dir, None)))
    conversations = [
        row["messages"]
        for row in rows
        if row["messages"] and row["messages"][-1].get("role") == "assistant"
        and _conversation_key(row["messages"]) not in held_out
    ]  # fmt: skip
    info = {
        "source": mix.source,
        "path": mix.path,
        "coef": mix.coef,
        "rows_per_step": mix.rows_per_step,
        "conversations": len(conversations),
        "held_out_excluded": len(held_out),
    }
    return conversations, info


TokenRows = list[tuple[list[int], list[int]]]  # (prompt ids, reply ids) per conversation


def tokenise_replay(
    tokenizer: PreTrainedTokenizerBase, conversations: Sequence[Messages], max_length: int
) -> TokenRows:
    """(prompt ids, last-reply ids) of each conversation that fits ``max_length``."""
    rows: TokenRows = []
    for messages in conversations:
        prompt, reply = tokenize_completion(tokenizer, messages[:-1], messages[-1:])
        if reply and len(prompt) + len(reply) <= max_length:
            rows.append((prompt, reply))
    if not rows:
        raise DataFormatError(
            f"data.mix: none of the {len(conversations)} replay conversations fits "
            f"model.max_length={max_length} (or has a reply): raise model.max_length or "
            "replay shorter demonstrations"
        )
    if len(rows) < len(conversations):
        log.info("replay: %d of %d conversations too long, skipped",
                 len(conversations) - len(rows), len(conversations))  # fmt: skip
    return rows


class ReplayBatches:
    """Seeded batches of tokenised replay rows."""

    def __init__(
        self, rows: TokenRows, *, pad_token_id: int, rows_per_step: int, seed: int
    ) -> None:
        self.rows = rows
        self.pad_token_id = pad_token_id
        self.rows_per_step = min(rows_per_step, len(self.rows))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, step: int, micro: int = 0) -> ReplayBatch:
        """The rows of optimiser step ``step``'s ``micro``-th micro-batch: a function of the
        seed and these two numbers only, so a resumed run replays exactly the same rows."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1009 + micro)
        picked = torch.randperm(len(self.rows), generator=generator)[: self.rows_per_step]
        prompts = [self.rows[i][0] for i in picked.tolist()]
        replies = [self.rows[i][1] for i in picked.tolist()]
        query_ids, query_mask = left_pad(prompts, self.pad_token_id)
        response_ids, response_mask = right_pad(replies, self.pad_token_id)
        return ReplayBatch(query_ids, query_mask, response_ids, response_mask)


def replay_layout(batch: ReplayBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of prompt + reply in the rollout layout."""
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    attention = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return ids, attention, positions


def masked_nll(logits: torch.Tensor, batch: ReplayBatch) -> torch.Tensor:
    """Mean NLL per reply token; ``logits`` predict the reply tokens (one row per reply
    position, ``logits[:, t]`` predicting ``response_ids[:, t]``)."""
    logps = torch.log_softmax(logits.float(), dim=-1)
    token = logps.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.response_mask.to(token.dtype)
    return -(token * mask).sum() / mask.sum().clamp(min=1)


def causal_lm_nll(model: torch.nn.Module, batch: ReplayBatch) -> torch.Tensor:
    """`masked_nll` of a transformers causal LM on ``batch`` (with gradients)."""
    ids, attention, positions = replay_layout(batch)
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    width = batch.response_ids.shape[1]
    # Position t predicts token t + 1: the reply's tokens are predicted from one column earlier.
    return masked_nll(logits[:, -width - 1 : -1], batch)


def stage_replay(stage: StageRun, tokenizer: PreTrainedTokenizerBase) -> ReplayBatches | None:
    """``stage``'s replay batches (None when ``data.mix`` is off); records them in the
    manifest. Each process draws its own rows (seed + rank)."""
    mix = stage.cfg.data.mix
    if not mix.enabled:
        return None
    conversations, info = replay_conversations(stage)
    batches = ReplayBatches(
        tokenise_replay(tokenizer, conversations, stage.cfg.model.max_length),
        pad_token_id=int(tokenizer.pad_token_id),
        rows_per_step=mix.rows_per_step,
        seed=stage.cfg.seed + 7919 * (1 + process_rank()),
    )
    stage.manifest_extra["replay"] = {**info, "tokenised": len(batches)}
    log.info(
        "%s replay: %d SFT conversations (%s), coef %g, %d rows per micro-batch",
        stage.name, len(batches), mix.source, mix.coef, batches.rows_per_step,
    )  # fmt: skip
    return batches


def with_replay(trainer_class: type, replay: ReplayBatches | None, coef: float) -> type:
    """``trainer_class`` itself without replay; else a subclass whose training loss adds
    ``coef * NLL`` of one replay batch per micro-batch, logged as ``replay/nll``."""
    if replay is None:
        return trainer_class

    class ReplayTrainer(trainer_class):  # type: ignore[misc, valid-type]
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
            if not model.training:  # evaluation: the stage's own loss only
                return result
            loss = result[0] if return_outputs else result
            step = self.state.global_step
            self._replay_micro = getattr(self, "_replay_micro", -1) + 1
            if getattr(self, "_replay_step", None) != step:
                self._replay_step, self._replay_micro = step, 0
            batch = replay.batch(step, self._replay_micro).to(loss.device)
            nll = causal_lm_nll(model, batch)
            self._metrics["train"]["replay/nll"].append(float(nll.detach()))
            loss = loss + coef * nll
            return (loss, result[1]) if return_outputs else loss

    ReplayTrainer.__name__ = ReplayTrainer.__qualname__ = f"Replay{trainer_class.__name__}"
    return ReplayTrainer
