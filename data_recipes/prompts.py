"""Prompts from the user's own file: the training and held-out prompts of a task, pure and seeded.

Owns `load_prompt_file`: reads a local JSONL / JSON / Parquet file (`data_recipes.rows`) of

- prompt-only rows: ``{"prompt": "..."}`` or ``{"prompt": [{"role": "user", ...}, ...]}``;
- any SFT format (`data_recipes.formats`): the conversation before its last assistant turn;
- any preference format (`data_recipes.preference_formats`): the shared prompt,

normalises every prompt to chat messages, drops duplicates (same last user turn), and splits
them into train and held-out prompts by a keyed hash of each prompt (`split_prompts`), so the
held-out set depends only on (seed, prompt), never on the order or the other rows. A bad row
fails with its file and row number.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from data_recipes.accounting import RowAccount
from data_recipes.formats import (
    SFT_FORMATS,
    check_detected,
    detect_sft_format,
    is_message_list,
    normalize_sft_row,
    unknown_format_error,
    validate_messages,
)
from data_recipes.preference_formats import (
    PREFERENCE_FORMATS,
    content_hash,
    detect_preference_format,
    normalize_preference_row,
)
from data_recipes.rows import DataFormatError, iter_rows

Messages = list[dict[str, str]]

PROMPT_ONLY = {"prompt": '{"prompt": str or [{"role": "user", "content": ...}, ...]}'}
# Every format a prompt file may be in: prompt-only rows, or the prompts of SFT / preference rows.
PROMPT_FORMATS: dict[str, str] = {**PROMPT_ONLY, **SFT_FORMATS, **PREFERENCE_FORMATS}


def prompt_key(prompt: Messages | str) -> str:
    """Normalised text of the last user turn: what dedup, decontamination and splits compare."""
    if not isinstance(prompt, str):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        prompt = users[-1] if users else ""
    return re.sub(r"\s+", " ", prompt).strip().casefold()


def detect_prompt_format(row: dict[str, Any]) -> str | None:
    """Name of the format ``row`` looks like (`PROMPT_FORMATS`), or None when it fits none."""
    if "prompt" in row and not {"completion", "chosen", "rejected"} & row.keys():
        return "prompt"
    return detect_sft_format(row) or detect_preference_format(row)


def prompt_of_row(row: dict[str, Any], fmt: str) -> Messages:
    """The prompt of one row of format ``fmt`` as chat messages ending with a user turn."""
    if fmt == "prompt":
        value = row["prompt"]
        if isinstance(value, str):
            messages = [{"role": "user", "content": value}]
        elif is_message_list(value):
            messages = validate_messages(value, "prompt")
        else:
            raise DataFormatError(
                f"'prompt' is {type(value).__name__}",
                expected=PROMPT_ONLY["prompt"],
                hint="write the prompt as a string or a list of chat messages",
            )
    elif fmt in SFT_FORMATS:
        conversation = normalize_sft_row(row, fmt)["messages"]
        last_reply = max(
            (i for i, m in enumerate(conversation) if m["role"] == "assistant"), default=None
        )
        messages = conversation if last_reply is None else conversation[:last_reply]
    elif fmt in PREFERENCE_FORMATS:
        prompt = normalize_preference_row(row, fmt)["prompt"]
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    else:
        raise unknown_format_error(fmt, PROMPT_FORMATS)
    if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
        raise DataFormatError(
            "row has no prompt (no non-empty user turn before the reply)",
            expected="a prompt ending with a non-empty user message",
            hint="fill in the prompt, or drop the row",
        )
    return [dict(m) for m in messages]


@dataclass
class PromptSet:
    """Distinct prompts of a file, split into train and held-out, plus what manifests record."""

    train: list[Messages]
    heldout: list[Messages]
    path: str
    format: str
    content_hash: str  # of every kept prompt, in file order: a changed file is a new task
    account: RowAccount = field(default_factory=lambda: RowAccount("prompts"))

    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "content_hash": self.content_hash,
            "train": len(self.train),
            "heldout": len(self.heldout),
        }


def split_prompts(
    prompts: Sequence[Messages], num_heldout: int, seed: int
) -> tuple[list[Messages], list[Messages]]:
    """(train, held-out): the ``num_heldout`` prompts with the smallest keyed hash are held out
    (in that hash order); the rest train, in their own order."""

    def rank(prompt: Messages) -> bytes:
        return hashlib.sha256(f"alignpipe-prompts:{seed}:{prompt_key(prompt)}".encode()).digest()

    held = set(sorted(range(len(prompts)), key=lambda i: rank(prompts[i]))[:num_heldout])
    heldout = sorted((prompts[i] for i in held), key=rank)
    return [p for i, p in enumerate(prompts) if i not in held], heldout


def load_prompt_file(
    path: str | os.PathLike[str], *, format: str = "auto", num_heldout: int, seed: int
) -> PromptSet:
    """The distinct prompts of a local file, split into train / held-out (see the module doc).

    ``format="auto"`` detects the format from the first row and requires every later row to
    fit it too. Fails (file, row) on a bad row, and when fewer than ``num_heldout + 1``
    distinct prompts are left (training needs at least one).
    """
    if format != "auto" and format not in PROMPT_FORMATS:
        raise unknown_format_error(format, PROMPT_FORMATS)
    fmt = None if format == "auto" else format
    account = RowAccount(str(path))
    seen: dict[str, Messages] = {}
    for row_number, row in iter_rows(path):
        account.read += 1
        if format == "auto":
            fmt = check_detected(detect_prompt_format(row), fmt, PROMPT_FORMATS, path, row_number)
        assert fmt is not None
        try:
            prompt = prompt_of_row(row, fmt)
        except DataFormatError as err:
            raise err.at(path, row_number) from None
        key = prompt_key(prompt)
        if key in seen:
            account.drop("duplicate")
            continue
        seen[key] = prompt
    if not account.read:
        raise DataFormatError(
            "file has no rows",
            path=path,
            expected="one prompt per row, in " + ", ".join(PROMPT_FORMATS) + " format",
            hint="check the file",
        )
    prompts = list(seen.values())
    if len(prompts) <= num_heldout:
        raise DataFormatError(
            f"{len(prompts)} distinct prompt(s), but data.prompts.num_heldout={num_heldout} are "
            "held out and training needs at least one more",
            path=path,
            expected=f"more than {num_heldout} distinct prompts",
            hint=f"add prompts, or lower it: data.prompts.num_heldout={max(len(prompts) - 1, 0)}",
        )
    train, heldout = split_prompts(prompts, num_heldout, seed)
    digest = content_hash({"prompt": prompt} for prompt in prompts)  # the rows' one hasher
    return PromptSet(train, heldout, str(path), fmt or format, digest, account)
