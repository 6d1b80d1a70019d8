"""Batched, KV-cached generation of chat replies: the one sampling path every stage uses.

Prompts are chat messages; they are rendered with the tokenizer's chat template
(``add_generation_prompt=True``), left-padded, and passed to ``model.generate`` in batches.
Replies stop at EOS and are decoded without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from stages.core.runtime import is_main_process

Messages = list[dict[str, str]]


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages], max_prompt_length: int
) -> list[list[int]]:
    """Token ids of each chat prompt, keeping its *last* max_prompt_length tokens."""
    rendered = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, tokenize=True, add_generation_prompt=True, return_dict=False
        )
        if isinstance(ids, dict):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        rendered.append(list(ids)[-max_prompt_length:])
    return rendered


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each row's tokens at the right end: for
    generation, which continues from the last column."""
    return _pad(batch, pad_id, left=True)


def right_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each row starting at position 0, as in training:
    for scoring whole sequences (log-probs, rewards)."""
    return _pad(batch, pad_id, left=False)


def _pad(
    batch: Sequence[Sequence[int]], pad_id: int, *, left: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            columns = slice(width - len(ids), width) if left else slice(0, len(ids))
            input_ids[row, columns] = torch.tensor(list(ids), dtype=torch.long)
            attention[row, columns] = 1
    return input_ids, attention


@torch.no_grad()
def generate_ids(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    max_prompt_length: int,
    batch_size: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    seed: int | None = None,
    progress: str | None = None,
) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Rendered prompt ids, and per prompt ``num_return_sequences`` response ids, each cut
    after its first EOS (kept). For callers that score exactly the sampled tokens.

    Sampling is seeded per call (``seed``) so the same inputs give the same samples.
    """
    was_training = model.training
    model.eval()  # dropout off
    device = next(model.parameters()).device
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_k=0 if do_sample else None,
        top_p=1.0 if do_sample else None,
        num_return_sequences=num_return_sequences,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    encoded = render_prompts(tokenizer, prompts, max_prompt_length)
    responses: list[list[list[int]]] = []
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    starts = range(0, len(encoded), batch_size)
    bar = tqdm(starts, desc=progress, disable=progress is None or not is_main_process())
    with rng:
        if seed is not None:
            torch.manual_seed(seed)
        for start in bar:
            input_ids, attention = left_pad(
                encoded[start : start + batch_size], tokenizer.pad_token_id
            )
            out = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                generation_config=generation_config,
            )
            new_tokens = out[:, input_ids.shape[1] :].tolist()
            rows = [_cut_after(row, tokenizer.eos_token_id) for row in new_tokens]
            for i in range(0, len(rows), num_return_sequences):
                responses.append(rows[i : i + num_return_sequences])
    model.train(was_training)
    return encoded, responses


def _cut_after(ids: list[int], eos_token_id: int | None) -> list[int]:
    # generate() pads a finished row with pad tokens after its EOS.
    return ids[: ids.index(eos_token_id) + 1] if eos_token_id in ids else ids


def generate_replies(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[Messages],
    **generation: Any,
) -> list[list[str]]:
    """`generate_ids` (same keywords) decoded without special tokens: one list of replies per
    prompt."""
    _, responses = generate_ids(model, tokenizer, prompts, **generation)
    return [tokenizer.batch_decode(rows, skip_special_tokens=True) for rows in responses]
