"""Preference data formats: detection and normalisation to TRL `prompt`/`chosen`/`rejected` rows.

Owns: the preference formats we accept (`standard`, `conversational`, `hh_rlhf`,
`ultrafeedback`), `detect_preference_format`, `normalize_preference_row`,
`load_preference_file` (-> `PreferenceData` with a content hash for the run manifest), and the
dedup + hash helpers that the on-policy pair generator reuses.

Normalised rows are either all strings (`standard`) or all conversational: `prompt` is a list
of messages ending on a user turn and `chosen`/`rejected` hold only the assistant reply. trl
1.16's DPOTrainer and RewardTrainer decide "conversational or not" from whichever of these keys
`is_conversational` pops first from a set, so a row mixing a string prompt with message lists
(raw UltraFeedback) is tokenised one way or the other at random and fails; a `messages` column
next to prompt/chosen/rejected also breaks `apply_chat_template`. Hence only these columns, plus
an optional float `margin` (RewardTrainer subtracts it inside the loss).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import datasets

from data_recipes.accounting import RowAccount
from data_recipes.formats import (
    check_detected,
    describe_formats,
    is_message_list,
    unknown_format_error,
    validate_messages,
)
from data_recipes.rows import DataFormatError, iter_rows

PREFERENCE_FORMATS: dict[str, str] = {
    "standard": '{"prompt": str, "chosen": str, "rejected": str}',
    "conversational": '{"prompt": [messages ending on a user turn], "chosen": [assistant '
    'message(s)], "rejected": [assistant message(s)]}, or without "prompt": full '
    "chosen/rejected conversations that share their opening turns",
    "hh_rlhf": '{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": the same '
    "transcript with a different last Assistant turn} (no prompt column)",
    "ultrafeedback": '{"prompt": str, "chosen": [{"role": "user", ...}, {"role": "assistant", '
    '...}], "rejected": [...], "score_chosen": number (optional), "score_rejected": number '
    "(optional)}",
}
# Shown with every format error: the column is accepted by all formats.
MARGIN_NOTE = 'any format may add a numeric "margin" column'
STAT_KEYS: tuple[str, ...] = (
    "rows_read",
    "duplicates_dropped",
    "identical_chosen_rejected_dropped",
)

# HH transcripts separate turns with a blank line and a speaker tag.
_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass(frozen=True)
class PreferenceData:
    """A loaded preference file: normalised rows plus what the run manifest records."""

    dataset: datasets.Dataset
    format: str
    content_hash: str
    stats: dict[str, int] = field(default_factory=dict)
    account: RowAccount | None = None  # rows read / kept / dropped by reason


def _looks_hh(text: str) -> bool:
    return bool(re.search(r"(^|\n\n)Human:", text)) and "\n\nAssistant:" in text


def detect_preference_format(row: dict[str, Any]) -> str | None:
    """Name of the preference format `row` looks like, or None when it fits none."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    prompt = row.get("prompt")
    if is_message_list(chosen) and is_message_list(rejected):
        if isinstance(prompt, str):
            return "ultrafeedback"
        if prompt is None or is_message_list(prompt):
            return "conversational"
        return None
    if isinstance(chosen, str) and isinstance(rejected, str):
        if isinstance(prompt, str):
            return "standard"
        # An implicit prompt is only recoverable from text when the speaker tags mark it.
        if prompt is None and _looks_hh(chosen) and _looks_hh(rejected):
            return "hh_rlhf"
    return None


def normalize_preference_row(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """Turn one row of format `fmt` into a TRL preference row, validating it.

    Returns `prompt`, `chosen`, `rejected` and, when the row has one, a float `margin`.
    Raises `DataFormatError` without a location (the file loader adds file and row).
    """
    if fmt not in PREFERENCE_FORMATS:
        raise unknown_format_error(fmt, PREFERENCE_FORMATS)
    if fmt == "standard":
        out: dict[str, Any] = {k: _need_str(row, k, fmt) for k in ("prompt", "chosen", "rejected")}
    elif fmt == "conversational":
        out = _conversational(row)
    elif fmt == "hh_rlhf":
        out = _hh_rlhf(row)
    else:
        out = _ultrafeedback(row)
    margin = _margin(row, fmt)
    if margin is not None:
        out["margin"] = margin
    return out


def _need_str(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataFormatError(
            f"{key!r} is {got}, not a string", expected=f"{fmt}: {PREFERENCE_FORMATS[fmt]}"
        )
    return value


def _assistant_only(messages: Any, what: str) -> list[dict[str, str]]:
    clean = validate_messages(messages, what)
    roles = {m["role"] for m in clean}
    if roles != {"assistant"}:
        raise DataFormatError(
            f"{what} has non-assistant turns {sorted(roles - {'assistant'})}",
            expected=f"{what} to hold only the assistant reply; earlier turns belong in prompt",
            hint="move the shared turns into 'prompt', or drop 'prompt' to have them split off",
        )
    return clean


def _check_prompt(prompt: list[dict[str, str]]) -> list[dict[str, str]]:
    # The reply is generated after the prompt: it must end on the user's turn.
    if prompt[-1]["role"] != "user":
        raise DataFormatError(
            f"prompt ends with a {prompt[-1]['role']!r} turn",
            expected="the prompt's last message from the user",
        )
    return prompt


def _split_reply(conversation: list[dict[str, str]], what: str) -> tuple[list, list]:
    """Split a full conversation into (prompt turns, trailing assistant reply)."""
    cut = len(conversation)
    while cut > 0 and conversation[cut - 1]["role"] == "assistant":
        cut -= 1
    if cut == len(conversation):
        raise DataFormatError(
            f"{what} ends with a {conversation[-1]['role']!r} turn",
            expected=f"{what} to end with the assistant reply being compared",
        )
    if cut == 0:
        raise DataFormatError(
            f"{what} has no prompt turn before the assistant reply",
            expected=f"{what} to start with the user turn(s) the reply answers",
        )
    return _check_prompt(conversation[:cut]), conversation[cut:]


def _split_shared(chosen: list, rejected: list) -> tuple[list, list, list]:
    prompt, chosen_reply = _split_reply(chosen, "chosen")
    rejected_prompt, rejected_reply = _split_reply(rejected, "rejected")
    if prompt != rejected_prompt:
        raise DataFormatError(
            "chosen and rejected have different prompt turns",
            expected="chosen and rejected to differ only in the final assistant reply",
            hint="check that the pair belongs together",
        )
    return prompt, chosen_reply, rejected_reply


def _conversational(row: dict[str, Any]) -> dict[str, Any]:
    if row.get("prompt") is None:  # implicit prompt: the shared opening turns
        chosen = validate_messages(row.get("chosen"), "chosen")
        rejected = validate_messages(row.get("rejected"), "rejected")
        prompt, chosen, rejected = _split_shared(chosen, rejected)
    else:
        prompt = _check_prompt(validate_messages(row.get("prompt"), "prompt"))
        chosen = _assistant_only(row.get("chosen"), "chosen")
        rejected = _assistant_only(row.get("rejected"), "rejected")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _ultrafeedback(row: dict[str, Any]) -> dict[str, Any]:
    text = _need_str(row, "prompt", "ultrafeedback")
    chosen = validate_messages(row.get("chosen"), "chosen")
    rejected = validate_messages(row.get("rejected"), "rejected")
    if all(m["role"] == "assistant" for m in chosen + rejected):
        # Lists that already hold only the reply: the prompt column is the user turn.
        prompt = [{"role": "user", "content": text}]
    else:
        prompt, chosen, rejected = _split_shared(chosen, rejected)
        if prompt[-1]["content"].strip() != text.strip():
            raise DataFormatError(
                "'prompt' differs from the last user turn inside chosen/rejected",
                expected="the prompt string to be the user turn that chosen/rejected answer",
                hint="check that prompt and pair belong together",
            )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _hh_turns(text: str, what: str) -> list[dict[str, str]]:
    if text.startswith(("Human:", "Assistant:")):  # tolerate a missing leading blank line
        text = "\n\n" + text
    parts = _HH_TURN.split(text)
    expected = f"hh_rlhf: {PREFERENCE_FORMATS['hh_rlhf']}"
    if parts[0].strip():
        raise DataFormatError(
            f"{what} has text before the first speaker tag: {parts[0].strip()!r:.60}",
            expected=expected,
        )
    turns = [
        {"role": _HH_ROLES[speaker], "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2])
    ]
    if not turns or turns[-1]["role"] != "assistant":
        raise DataFormatError(
            f"{what} transcript does not end with an Assistant turn", expected=expected
        )
    return turns


def _hh_rlhf(row: dict[str, Any]) -> dict[str, Any]:
    chosen = _hh_turns(_need_str(row, "chosen", "hh_rlhf"), "chosen")
    rejected = _hh_turns(_need_str(row, "rejected", "hh_rlhf"), "rejected")
    prompt, chosen, rejected = _split_shared(chosen, rejected)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _number(value: Any, what: str) -> float:
    # bool is an int subclass; a True margin is a data bug, not 1.0.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataFormatError(f"{what} is {value!r}", expected=f"{what} as a finite number")
    return float(value)


def _margin(row: dict[str, Any], fmt: str) -> float | None:
    if row.get("margin") is not None:
        return _number(row["margin"], "margin")
    if fmt == "ultrafeedback" and row.get("score_chosen") is not None:
        chosen = _number(row["score_chosen"], "score_chosen")
        return chosen - _number(row.get("score_rejected"), "score_rejected")
    return None


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(rows: Iterable[dict[str, Any]]) -> str:
    """sha256 hex of the canonical JSON list of `rows`, in order.

    Canonical: sorted keys, no whitespace, UTF-8, i.e. equal to
    `sha256(json.dumps(list(rows), sort_keys=True, separators=(",", ":"), ensure_ascii=False))`,
    computed streaming so a large dataset need not be held twice.
    """
    digest = hashlib.sha256(b"[")
    for i, row in enumerate(rows):
        if i:
            digest.update(b",")
        digest.update(_canonical(row).encode("utf-8"))
    digest.update(b"]")
    return digest.hexdigest()


def dedupe_preference_rows(
    rows: Iterable[dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Drop pairs with chosen == rejected and repeats of a (prompt, chosen, rejected) triple.

    Keeps the first occurrence and the input order. A pair with nothing to prefer carries no
    signal, and duplicates silently up-weight some prompts. Stats keys: `STAT_KEYS`.
    """
    kept: list[dict[str, Any]] = []
    seen: set[str] = set()
    stats = dict.fromkeys(STAT_KEYS, 0)
    for row in rows:
        stats["rows_read"] += 1
        if row["chosen"] == row["rejected"]:
            stats["identical_chosen_rejected_dropped"] += 1
            continue
        key = _canonical([row["prompt"], row["chosen"], row["rejected"]])
        if key in seen:
            stats["duplicates_dropped"] += 1
            continue
        seen.add(key)
        kept.append(row)
    return kept, stats


def load_preference_file(path: str | os.PathLike[str], format: str = "auto") -> PreferenceData:
    """Load a local preference file, normalised, deduplicated and hashed.

    `format="auto"` detects the format from the first row and requires every later row to
    fit it too. `margin` must be on every row or on none (RewardTrainer batches it).
    """
    if format != "auto" and format not in PREFERENCE_FORMATS:
        raise unknown_format_error(format, PREFERENCE_FORMATS)
    fmt = None if format == "auto" else format
    rows = []
    has_margin: bool | None = None
    empty = 0
    for row_number, row in iter_rows(path):
        if format == "auto":
            found = detect_preference_format(row)
            fmt = check_detected(found, fmt, PREFERENCE_FORMATS, path, row_number, MARGIN_NOTE)
        try:
            normalized = normalize_preference_row(row, fmt)
        except DataFormatError as err:
            raise err.at(path, row_number) from None
        if has_margin is None:
            has_margin = "margin" in normalized
        elif has_margin != ("margin" in normalized):
            which = "lacks a margin" if has_margin else "has a margin"
            raise DataFormatError(
                f"row {which}, unlike the first row",
                path=path,
                row=row_number,
                expected="a numeric margin on every row or on none",
                hint="fill in the missing margins or drop the column",
            )
        if not reply_text(normalized["chosen"]).strip():
            empty += 1  # preferring an empty reply teaches the model to say nothing
            continue
        rows.append(normalized)
    kept, stats = dedupe_preference_rows(rows)
    account = RowAccount(str(path), read=stats["rows_read"] + empty)
    account.drop("empty", empty)
    account.drop("identical_pair", stats["identical_chosen_rejected_dropped"])
    account.drop("duplicate", stats["duplicates_dropped"])
    if not account.read:
        raise DataFormatError(
            "file has no rows",
            path=path,
            expected=describe_formats(PREFERENCE_FORMATS, MARGIN_NOTE),
            hint="check the file",
        )
    if not kept:
        raise account.no_rows_left("check that chosen and rejected differ and chosen is not empty")
    return PreferenceData(
        dataset=datasets.Dataset.from_list(kept),
        format=fmt,
        content_hash=content_hash(kept),
        stats={**stats, "rows_read": account.read},  # empty-reply drops: in `account`
        account=account,
    )


def reply_text(reply: str | list[dict[str, str]]) -> str:
    """The text of a chosen / rejected reply: the string, or its messages' contents."""
    if isinstance(reply, str):
        return reply
    return "".join(m["content"] for m in reply)
