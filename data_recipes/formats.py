"""SFT data formats: detection and normalisation to TRL conversational `messages` rows.

Owns: the SFT formats we accept (`messages`, `prompt_completion`, `alpaca`, `sharegpt`),
`detect_sft_format`, `normalize_sft_row` and `load_sft_file`, which yields a
`datasets.Dataset` with a single `messages` column of `{"role", "content"}` dicts that
SFTTrainer takes as is. Every row is validated, and a bad one fails with its file and row.
"""

from __future__ import annotations

import os
from typing import Any

import datasets

from data_recipes.accounting import RowAccount
from data_recipes.rows import DataFormatError, iter_rows

# Name -> the keys a row needs; used for detection errors so a user sees what would fit.
SFT_FORMATS: dict[str, str] = {
    "messages": '{"messages": [{"role": ..., "content": ...}, ...]} '
    '(or the same list under "conversations")',
    "prompt_completion": '{"prompt": ..., "completion": ...} (strings or lists of messages)',
    "alpaca": '{"instruction": str, "input": str (optional), "output": str}',
    "sharegpt": '{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}',
}
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})
# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
}


def describe_formats(formats: dict[str, str], note: str | None = None) -> str:
    """One line per format with the keys it needs (for error messages)."""
    lines = [f"  - {name}: {keys}" for name, keys in formats.items()]
    return "one of these formats:\n" + "\n".join(lines) + (f"\n  ({note})" if note else "")


def is_message_list(value: Any, keys: tuple[str, str] = ("role", "content")) -> bool:
    """True when `value` looks like a list of chat messages with these keys.

    Looks only at the first message, as TRL does: this is detection, validation comes later.
    """
    return (
        isinstance(value, list)
        and len(value) > 0
        and isinstance(value[0], dict)
        and all(k in value[0] for k in keys)
    )


def detect_sft_format(row: dict[str, Any]) -> str | None:
    """Name of the SFT format `row` looks like, or None when it fits none."""
    if is_message_list(row.get("messages")):
        return "messages"
    conversations = row.get("conversations")
    if is_message_list(conversations):
        return "messages"
    if is_message_list(conversations, keys=("from", "value")):
        return "sharegpt"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def validate_messages(messages: Any, what: str = "messages") -> list[dict[str, str]]:
    """Check a list of chat messages and return it as plain `{"role", "content"}` dicts.

    Extra keys (name, weight, ...) are dropped so every row has the same Arrow schema.
    """
    expected = f'{what} as a non-empty list of {{"role": one of {sorted(ROLES)}, "content": str}}'
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f"{what} is empty or not a list", expected=expected)
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataFormatError(
                f"{what}[{i}] is not a {{role, content}} object: {message!r:.80}",
                expected=expected,
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise DataFormatError(f"{what}[{i}] has unknown role {role!r}", expected=expected)
        if not isinstance(content, str):
            raise DataFormatError(
                f"{what}[{i}] content is {type(content).__name__}, not a string",
                expected=expected,
            )
        clean.append({"role": role, "content": content})
    return clean


def _check_conversation(messages: list[dict[str, str]]) -> None:
    # SFT learns from assistant turns: a conversation without one, or ending on a user turn,
    # has nothing (or a dangling question) to learn from.
    if not any(m["role"] == "assistant" for m in messages):
        raise DataFormatError(
            "conversation has no assistant turn",
            expected="at least one assistant turn, and the last turn from the assistant",
            hint="drop this row or add the assistant's reply",
        )
    if messages[-1]["role"] != "assistant":
        raise DataFormatError(
            f"conversation ends with a {messages[-1]['role']!r} turn",
            expected="the last turn from the assistant",
            hint="drop the trailing turn(s) or add the assistant's reply",
        )


def _as_messages(value: Any, role: str, what: str) -> list[dict[str, str]]:
    # prompt/completion may be plain strings (one turn) or lists of messages.
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return validate_messages(value, what)


def _need_str(row: dict[str, Any], key: str, fmt: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        got = "missing" if key not in row else f"a {type(value).__name__}"
        raise DataFormatError(
            f"{key!r} is {got}, not a string", expected=f"{fmt}: {SFT_FORMATS[fmt]}"
        )
    return value


def normalize_sft_row(row: dict[str, Any], fmt: str) -> dict[str, list[dict[str, str]]]:
    """Turn one row of format `fmt` into `{"messages": [...]}`, validating it.

    Raises `DataFormatError` without a location (the file loader adds file and row).
    """
    if fmt not in SFT_FORMATS:
        raise unknown_format_error(fmt, SFT_FORMATS)
    if fmt == "messages":
        key = "messages" if "messages" in row else "conversations"
        messages = validate_messages(row.get(key), key)
    elif fmt == "prompt_completion":
        messages = _as_messages(row.get("prompt"), "user", "prompt") + _as_messages(
            row.get("completion"), "assistant", "completion"
        )
    elif fmt == "alpaca":
        instruction = _need_str(row, "instruction", fmt)
        extra = _need_str(row, "input", fmt, optional=True)
        # Alpaca's own prompt puts the input after the instruction as a separate paragraph.
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _need_str(row, "output", fmt)},
        ]
    else:  # sharegpt
        messages = _sharegpt_messages(row)
    _check_conversation(messages)
    return {"messages": messages}


def _sharegpt_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    turns = row.get("conversations")
    expected = f"sharegpt: {SFT_FORMATS['sharegpt']}"
    if not isinstance(turns, list) or not turns:
        raise DataFormatError("'conversations' is empty or not a list", expected=expected)
    messages = []
    # Some ShareGPT exports keep the system prompt in its own column.
    system = row.get("system")
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataFormatError(
                f"conversations[{i}] is not a {{from, value}} object: {turn!r:.80}",
                expected=expected,
            )
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower() if isinstance(speaker, str) else speaker)
        if role is None:
            raise DataFormatError(
                f"conversations[{i}] has unknown speaker {speaker!r}",
                expected=f"'from' one of {sorted(SHAREGPT_ROLES)}",
                hint="map it to one of these or drop the row",
            )
        if not isinstance(turn["value"], str):
            raise DataFormatError(
                f"conversations[{i}] value is {type(turn['value']).__name__}, not a string",
                expected=expected,
            )
        messages.append({"role": role, "content": turn["value"]})
    return messages


def unknown_format_error(fmt: str, formats: dict[str, str]) -> DataFormatError:
    """Error for a `format=` override that names no known format."""
    return DataFormatError(
        f"unknown data format {fmt!r}",
        expected="'auto' or " + describe_formats(formats),
        hint="fix the format name in the data config",
    )


def load_sft_file(
    path: str | os.PathLike[str], format: str = "auto", account: RowAccount | None = None
) -> datasets.Dataset:
    """Load a local SFT file as a Dataset with one `messages` column.

    `format="auto"` detects the format from the first row and requires every later row to
    fit it too (a file mixing formats is almost always a mistake). Rows whose assistant
    replies are all blank are dropped (reason ``empty``) and counted into ``account``.
    """
    if format != "auto" and format not in SFT_FORMATS:
        raise unknown_format_error(format, SFT_FORMATS)
    fmt = None if format == "auto" else format
    account = account if account is not None else RowAccount(str(path))
    rows = []
    for row_number, row in iter_rows(path):
        account.read += 1
        if format == "auto":
            fmt = check_detected(detect_sft_format(row), fmt, SFT_FORMATS, path, row_number)
        try:
            normalized = normalize_sft_row(row, fmt)
        except DataFormatError as err:
            raise err.at(path, row_number) from None
        if has_blank_replies_only(normalized["messages"]):
            account.drop("empty")  # teaches only to stop: nothing a user meant to train
            continue
        rows.append(normalized)
    if not account.read:
        raise DataFormatError(
            "file has no rows", path=path, expected="at least one row", hint="check the file"
        )
    if not rows:
        raise account.no_rows_left("fill in the assistant replies, or point at another file")
    return datasets.Dataset.from_list(rows)


def has_blank_replies_only(messages: list[dict[str, str]]) -> bool:
    """True when every assistant turn of the conversation is empty or whitespace."""
    return all(not m["content"].strip() for m in messages if m["role"] == "assistant")


def check_detected(
    found: str | None,
    file_format: str | None,
    formats: dict[str, str],
    path: str | os.PathLike[str],
    row_number: int,
    note: str | None = None,
) -> str:
    """Format of this row under auto-detection: the file's format, fixed by its first row."""
    if found is None:
        raise DataFormatError(
            "row fits no known format" + (f" (file is {file_format!r})" if file_format else ""),
            path=path,
            row=row_number,
            expected=describe_formats(formats, note),
            hint="fix or drop the row, or pass the format explicitly",
        )
    if file_format is not None and found != file_format:
        raise DataFormatError(
            f"row looks like format {found!r}, but the file's first row is {file_format!r}",
            path=path,
            row=row_number,
            expected=f"every row in format {file_format!r}: {formats[file_format]}",
            hint="split the file by format, or fix the row",
        )
    return found
