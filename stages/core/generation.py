"""Batched, KV-cached generation of chat replies: the one sampling path every stage uses.

Prompts are chat messages; they are rendered with the tokenizer's chat template
(``add_generation_prompt=True``), left-padded, and passed to ``model.generate`` in batches.
Replies stop at EOS and are decoded without special tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

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
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
    return input_ids, attention


@torch.no_grad()
def generate_replies(
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
) -> list[list[str]]:
    """Generate ``num_return_sequences`` replies per prompt; returns one list per prompt.

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
    replies: list[list[str]] = []
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
            texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
            for i in range(0, len(texts), num_return_sequences):
                replies.append(texts[i : i + num_return_sequences])
    model.train(was_training)
    return replies
