"""Unpaired preference data: single replies labelled desirable or not (KTO's input).

Owns: the labelled-reply format TRL's KTOTrainer reads (``prompt``, ``completion``,
``label: bool``), its detection (`is_labelled_row`), normalisation and file loading
(`load_labelled_file`, failing with file:row), the held-out pairs recovered from labelled
rows (`pairs_from_labelled`), and the desirable / undesirable counts of a set of rows.

Preference *pairs* become unpaired rows through TRL's own ``unpair_preference_dataset`` (the
stage does that); this module only reads files that are unpaired already.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from data_recipes.accounting import RowAccount
from data_recipes.formats import describe_formats, validate_messages
from data_recipes.preference_formats import content_hash, reply_text
from data_recipes.prompts import prompt_key
from data_recipes.rows import DataFormatError, iter_rows

LABELLED_FORMAT = "labelled"
UNPAIRED_FORMATS: dict[str, str] = {
    LABELLED_FORMAT: '{"prompt": str, "completion": str, "label": true|false} (TRL unpaired '
    'preference), or "prompt" a list of messages ending on a user turn and "completion" a '
    "list of assistant message(s)",
}


@dataclass(frozen=True)
class LabelledData:
    """A loaded labelled-reply file: normalised rows plus what the run manifest records."""

    rows: list[dict[str, Any]]
    content_hash: str
    account: RowAccount
    stats: dict[str, int] = field(default_factory=dict)


def is_labelled_row(row: dict[str, Any]) -> bool:
    """True when ``row`` looks like a labelled reply rather than a preference pair."""
    return "completion" in row and "label" in row and "chosen" not in row


def is_labelled_file(path: str | os.PathLike[str], format: str = "auto") -> bool:
    """True when the file at ``path`` holds labelled replies: ``format`` says so, or it is
    ``auto`` and the first row looks like one (a bad file fails here with file:row)."""
    if format != "auto":
        return format == LABELLED_FORMAT
    first = next(iter_rows(path), None)
    return first is not None and is_labelled_row(first[1])


def normalize_labelled_row(row: dict[str, Any]) -> dict[str, Any]:
    """``{"prompt", "completion", "label"}`` of one labelled row, validated.

    Raises `DataFormatError` without a location (the file loader adds file and row).
    """
    expected = f"{LABELLED_FORMAT}: {UNPAIRED_FORMATS[LABELLED_FORMAT]}"
    label = row.get("label")
    # 0/1 or "yes" would be guesses: TRL's collator builds a bool tensor from this column.
    if not isinstance(label, bool):
        got = "missing" if "label" not in row else f"{label!r} ({type(label).__name__})"
        raise DataFormatError(
            f"'label' is {got}, not true/false",
            expected=expected,
            hint="write the label as a JSON boolean: true = desirable reply, false = undesirable",
        )
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "completion": completion, "label": label}
    if isinstance(prompt, list) and isinstance(completion, list):
        messages = validate_messages(prompt, "prompt")
        if messages[-1]["role"] != "user":
            raise DataFormatError(
                f"prompt ends with a {messages[-1]['role']!r} turn",
                expected="the prompt's last message from the user",
            )
        reply = validate_messages(completion, "completion")
        if {m["role"] for m in reply} != {"assistant"}:
            raise DataFormatError(
                "completion has non-assistant turns",
                expected="completion to hold only the assistant reply; earlier turns belong in "
                "prompt",
            )
        return {"prompt": messages, "completion": reply, "label": label}
    kinds = f"prompt {type(prompt).__name__}, completion {type(completion).__name__}"
    raise DataFormatError(
        f"prompt and completion are not both strings or both message lists ({kinds})",
        expected=expected,
    )


def load_labelled_file(path: str | os.PathLike[str]) -> LabelledData:
    """Load a local labelled-reply file (JSONL / JSON / Parquet), deduplicated and hashed.

    Every row must be a labelled reply of the same kind as the first (strings or messages);
    empty replies and repeats of a (prompt, completion, label) row are dropped and counted.
    """
    rows: list[dict[str, Any]] = []
    account = RowAccount(str(path))
    seen: set[str] = set()
    conversational: bool | None = None
    for row_number, row in iter_rows(path):
        account.read += 1
        if not is_labelled_row(row):
            raise DataFormatError(
                f"row has columns {sorted(row)[:8]}, not a labelled reply",
                path=path,
                row=row_number,
                expected=describe_formats(UNPAIRED_FORMATS),
                hint="fix or drop the row; a file of preference pairs (chosen/rejected) is "
                "unpaired by the stage itself, but must not mix with labelled rows",
            )
        try:
            normalized = normalize_labelled_row(row)
        except DataFormatError as err:
            raise err.at(path, row_number) from None
        is_messages = isinstance(normalized["prompt"], list)
        if conversational is None:
            conversational = is_messages
        elif conversational != is_messages:
            raise DataFormatError(
                "row mixes string and message-list columns with the file's first row",
                path=path,
                row=row_number,
                expected="every row as strings, or every row as message lists",
                hint="convert the row to the kind of the first row",
            )
        if not reply_text(normalized["completion"]).strip():
            account.drop("empty")
            continue
        key = content_hash([normalized])
        if key in seen:
            account.drop("duplicate")
            continue
        seen.add(key)
        rows.append(normalized)
    if not account.read:
        raise DataFormatError(
            "file has no rows",
            path=path,
            expected=describe_formats(UNPAIRED_FORMATS),
            hint="check the file",
        )
    if not rows:
        raise account.no_rows_left("fill in the completions, or point at another file")
    return LabelledData(rows, content_hash(rows), account, label_counts(rows))


def label_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """``{"desirable": n, "undesirable": m}`` of labelled rows."""
    labels = [bool(r["label"]) for r in rows]
    return {"desirable": sum(labels), "undesirable": len(labels) - sum(labels)}


def pairs_from_labelled(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference pairs hidden in labelled rows: per prompt, its first desirable reply against
    its first undesirable one (prompts with only one kind give none). The held-out comparison
    measures preference margins on pairs."""
    first: dict[tuple[str, bool], dict[str, Any]] = {}
    order: list[str] = []
    for row in rows:
        key = prompt_key(row["prompt"])
        if (key, True) not in first and (key, False) not in first:
            order.append(key)
        first.setdefault((key, bool(row["label"])), row)
    pairs = []
    for key in order:
        good, bad = first.get((key, True)), first.get((key, False))
        if good is not None and bad is not None:
            pairs.append(
                {
                    "prompt": good["prompt"],
                    "chosen": good["completion"],
                    "rejected": bad["completion"],
                }
            )
    return pairs
