"""Batched, KV-cached generation of chat replies: the one sampling path every stage uses.

Prompts are chat messages; they are rendered with the tokenizer's chat template
(``add_generation_prompt=True``), left-padded, and passed to ``model.generate`` in batches.
Replies stop at EOS and are decoded without special tokens.

Prompt + reply always fit the model's context (`context_length`, read from its config): when
they would not, prompts are left-truncated and/or the reply budget capped (`fit_to_context`),
and one log line says so. Scoring paths fit whole sequences the same way (`fit_sequence`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from stages.core.model_sources import CONTEXT_KEYS
from stages.core.runtime import is_main_process

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

_already_logged: set[tuple[object, ...]] = set()


def context_length(model: torch.nn.Module) -> int | None:
    """The most tokens (prompt + reply) ``model`` can attend over, from its config; None when
    the config names no limit. Works through PeftModel and multimodal (text) configs."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in CONTEXT_KEYS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _log_once(key: tuple[object, ...], message: str, *args: object) -> None:
    # Every eval calls the generator several times with the same budgets: say it once.
    if key not in _already_logged:
        _already_logged.add(key)
        log.warning(message, *args)


def fit_to_context(
    longest_prompt: int, max_new_tokens: int, context: int | None
) -> tuple[int, int]:
    """(prompt tokens to keep, new tokens to generate) so that prompt + reply fit ``context``.

    Unchanged when they already fit (or the context is unknown). Otherwise the prompt gives
    way first (its start is dropped: the question and the generation prompt are at its end),
    but the reply never takes more than what the prompt leaves or half the context, whichever
    is more; both keep at least one token. Logs once per distinct adjustment.
    """
    if context is None or longest_prompt + max_new_tokens <= context:
        return longest_prompt, max_new_tokens
    if context < 2:
        raise ValueError(f"a context of {context} position(s) leaves no room for a reply")
    new_tokens = max(1, min(max_new_tokens, max(context - longest_prompt, context // 2)))
    prompt_tokens = min(longest_prompt, context - new_tokens)
    _log_once(
        ("generate", context, longest_prompt, max_new_tokens),
        "the model's context is %d positions but prompt + reply need %d + %d: keeping the last "
        "%d prompt tokens and generating at most %d new tokens. To avoid this, set "
        "model.max_prompt_length + model.max_new_tokens <= %d",
        context, longest_prompt, max_new_tokens, prompt_tokens, new_tokens, context,
    )  # fmt: skip
    return prompt_tokens, new_tokens


def fit_sequence(
    prompt: Sequence[int], response: Sequence[int], context: int | None
) -> tuple[list[int], list[int]]:
    """``(prompt, response)`` cut to fit ``context`` for scoring: the prompt is left-truncated
    (down to one token, which predicts the first response token), then the response's end is
    cut. Callers score only the response tokens returned. Logs once per context."""
    prompt, response = list(prompt), list(response)
    if context is None or len(prompt) + len(response) <= context:
        return prompt, response
    keep_prompt = max(1, context - len(response))
    prompt = prompt[-keep_prompt:] if prompt else prompt
    response = response[: context - len(prompt)]
    _log_once(
        ("score", context),
        "a scored sequence is longer than the model's context of %d positions: its prompt is "
        "left-truncated and, if still too long, its response's end is not scored",
        context,
    )
    return prompt, response


def chat_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool = False
) -> list[int]:
    """Token ids of chat messages rendered with the tokenizer's chat template: the one
    chat-tokenisation path of generation, scoring, comparison and PPO."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=True
    )
    return list(encoded["input_ids"])


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: Messages | str) -> list[int]:
    """Token ids a reply is generated after: chat messages with the generation prompt, or a
    plain-text prompt tokenised as is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    return chat_ids(tokenizer, prompt, add_generation_prompt=True)


def render_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages], max_prompt_length: int
) -> list[list[int]]:
    """Token ids of each chat prompt, keeping its *last* max_prompt_length tokens."""
    return [prompt_ids(tokenizer, messages)[-max_prompt_length:] for messages in prompts]


def left_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each row's tokens at the right end: for
    generation, which continues from the last column."""
    return _pad(batch, pad_id, side="left")


def right_pad(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each row starting at position 0, as in training:
    for scoring whole sequences (log-probs, rewards)."""
    return _pad(batch, pad_id, side="right")


def _pad(
    batch: Sequence[Sequence[int]], pad_id: int, *, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [torch.tensor(list(ids), dtype=torch.long) for ids in batch]
    input_ids = pad(rows, padding_value=pad_id, padding_side=side)
    attention = pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side=side)
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
    after its first EOS (kept). For callers that score exactly the sampled tokens. Prompt +
    response fit the model's context (see `fit_to_context`); the prompt ids returned are the
    ones generated from.

    Sampling is seeded per call (``seed``) so the same inputs give the same samples.
    """
    was_training = model.training
    model.eval()  # dropout off
    device = next(model.parameters()).device
    encoded = render_prompts(tokenizer, prompts, max_prompt_length)
    longest = max((len(ids) for ids in encoded), default=0)
    # Left-padded batches put the longest prompt's last token at position longest - 1, so
    # longest + max_new_tokens must fit the model's positions.
    keep, max_new_tokens = fit_to_context(longest, max_new_tokens, context_length(model))
    if keep < longest:
        encoded = [ids[-keep:] for ids in encoded]
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
