"""Tests for data_recipes.rows (file reading) and data_recipes.formats (SFT formats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_recipes.formats import (
    SFT_FORMATS,
    detect_sft_format,
    load_sft_file,
    normalize_sft_row,
)
from data_recipes.rows import DataFormatError, iter_rows

FIXTURES = Path(__file__).parent / "fixtures"


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---- rows.py -------------------------------------------------------------------------------


def test_jsonl_rows_are_numbered_by_line_and_blank_lines_skipped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n\n')
    assert list(iter_rows(path)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_jsonl_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataFormatError) as info:
        list(iter_rows(path))
    assert (info.value.path, info.value.row) == (str(path), 3)
    assert "broken.jsonl, row 3: line is not valid JSON" in str(info.value)
    assert "one JSON object per line" in str(info.value)


def test_jsonl_non_object_line_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataFormatError, match=r"list\.jsonl, row 2: line holds a JSON list"):
        list(iter_rows(path))


@pytest.mark.parametrize("key", ["data", "train"])
def test_json_list_may_be_wrapped(tmp_path: Path, key: str) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({key: [{"a": 1}, {"a": 2}]}))
    assert list(iter_rows(path)) == [(1, {"a": 1}), (2, {"a": 2})]


def test_json_object_without_rows_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataFormatError, match="none of \\['data', 'train'\\]"):
        list(iter_rows(path))


def test_json_lines_in_a_json_file_hint_at_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('{"a": 1}\n{"a": 2}\n')
    with pytest.raises(DataFormatError, match=r"rename the file to \.jsonl"):
        list(iter_rows(path))


def test_unknown_extension_lists_supported_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b\n")
    with pytest.raises(DataFormatError) as info:
        iter_rows(path)  # fails at call time, not at the first next()
    assert "unsupported file extension '.csv'" in str(info.value)
    assert ".jsonl, .json, .parquet" in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*nope\.jsonl"):
        iter_rows(tmp_path / "nope.jsonl")


def test_parquet_rows_are_numbered_and_nested_structs_become_dicts() -> None:
    rows = list(iter_rows(FIXTURES / "sft_messages.parquet"))
    assert [number for number, _ in rows] == [1, 2, 3, 4]
    # Parquet gives every struct the union of keys: "name" (set on one message) is None elsewhere.
    assert rows[0][1] == {
        "messages": [
            {"role": "user", "content": "What is 23 + 45?", "name": None},
            {"role": "assistant", "content": "68.", "name": None},
        ]
    }


# ---- formats.py: detection -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("sft_messages.jsonl", "messages"),
        ("sft_messages.parquet", "messages"),
        ("sft_prompt_completion.jsonl", "prompt_completion"),
        ("sft_alpaca.json", "alpaca"),
        ("sft_sharegpt.jsonl", "sharegpt"),
    ],
)
def test_detect_first_row_of_each_fixture(fixture: str, expected: str) -> None:
    _, first = next(iter_rows(FIXTURES / fixture))
    assert detect_sft_format(first) == expected


def test_detect_conversations_column_with_roles_is_messages() -> None:
    row = {"conversations": [user("hi"), assistant("hello")]}
    assert detect_sft_format(row) == "messages"
    assert normalize_sft_row(row, "messages") == {"messages": [user("hi"), assistant("hello")]}


def test_detect_returns_none_for_unknown_rows() -> None:
    assert detect_sft_format({"text": "hello"}) is None
    assert detect_sft_format({"prompt": "p", "chosen": "c", "rejected": "r"}) is None


# ---- formats.py: normalisation -------------------------------------------------------------


def test_messages_fixture_normalised_and_extra_keys_dropped() -> None:
    ds = load_sft_file(FIXTURES / "sft_messages.jsonl")
    assert ds.column_names == ["messages"]
    assert ds.num_rows == 4
    assert ds[1]["messages"] == [
        system("You add numbers."),
        user("What is 10 + 11?"),
        assistant("21."),
    ]
    # The "name" key on the last message is dropped: one Arrow schema for every row.
    assert ds[3]["messages"] == [user("What is 99 + 99?"), assistant("i do not know.")]


def test_parquet_loads_like_jsonl() -> None:
    assert (
        load_sft_file(FIXTURES / "sft_messages.parquet").to_list()
        == load_sft_file(FIXTURES / "sft_messages.jsonl").to_list()
    )


def test_prompt_completion_strings_and_lists() -> None:
    ds = load_sft_file(FIXTURES / "sft_prompt_completion.jsonl")
    assert ds["messages"] == [
        [user("What is 12 + 34?"), assistant("46.")],
        [user("What is 50 + 25?"), assistant("75.")],
        [system("Be brief."), user("What is 61 + 17?"), assistant("78.")],
    ]


def test_alpaca_input_is_appended_after_a_blank_line() -> None:
    ds = load_sft_file(FIXTURES / "sft_alpaca.json")
    assert ds["messages"] == [
        [user("Add the two numbers.\n\n23 and 45"), assistant("68.")],
        [user("What is 14 + 20?"), assistant("34.")],  # empty input: no blank line
        [user("What is 77 + 11?"), assistant("88.")],  # no input key at all
    ]


def test_sharegpt_speakers_are_mapped_to_roles() -> None:
    ds = load_sft_file(FIXTURES / "sft_sharegpt.jsonl")
    assert ds["messages"] == [
        [user("What is 23 + 45?"), assistant("68.")],
        [
            system("You add numbers."),
            user("What is 40 + 41?"),
            assistant("81."),
            user("Sure?"),
            assistant("Yes, 81."),
        ],
        # A top-level "system" column becomes the first message.
        [system("Answer with a number."), user("What is 15 + 15?"), assistant("30.")],
    ]


def test_explicit_format_override_is_used() -> None:
    ds = load_sft_file(FIXTURES / "sft_alpaca.json", format="alpaca")
    assert ds.num_rows == 3


# ---- formats.py: errors --------------------------------------------------------------------


def test_bad_row_names_file_row_and_expected_formats() -> None:
    with pytest.raises(DataFormatError) as info:
        load_sft_file(FIXTURES / "sft_bad_row.jsonl")
    message = str(info.value)
    assert info.value.row == 3
    assert "sft_bad_row.jsonl, row 3: row fits no known format" in message
    for name in SFT_FORMATS:
        assert f"- {name}: " in message
    for key in ('"messages"', '"prompt"', '"completion"', '"instruction"', '"output"', '"from"'):
        assert key in message


def test_every_row_must_fit_the_format_of_the_first(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [user("q"), assistant("a")]},
            {"instruction": "q", "output": "a"},
        ],
    )
    with pytest.raises(DataFormatError) as info:
        load_sft_file(path)
    assert "mixed.jsonl, row 2: row looks like format 'alpaca', but the file's first row is " in (
        str(info.value)
    )


def test_unknown_format_override_lists_known_formats() -> None:
    with pytest.raises(DataFormatError) as info:
        load_sft_file(FIXTURES / "sft_messages.jsonl", format="chatml")
    message = str(info.value)
    assert "unknown data format 'chatml'" in message
    assert all(name in message for name in SFT_FORMATS)


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([user("q"), assistant("a"), user("more?")], "conversation ends with a 'user' turn"),
        ([system("s"), user("q")], "conversation has no assistant turn"),
        ([user("q"), {"role": "bot", "content": "a"}], "messages[1] has unknown role 'bot'"),
        ([user("q"), {"role": "assistant", "content": None}], "content is NoneType, not a string"),
        ([user("q"), {"role": "assistant"}], "messages[1] is not a {role, content} object"),
    ],
)
def test_invalid_conversations_fail_with_file_and_row(
    tmp_path: Path, messages: list, problem: str
) -> None:
    good = {"messages": [user("q"), assistant("a")]}
    path = write_jsonl(tmp_path / "invalid.jsonl", [good, good, {"messages": messages}])
    with pytest.raises(DataFormatError) as info:
        load_sft_file(path)
    assert (info.value.path, info.value.row) == (str(path), 3)
    assert str(info.value).startswith(f"{path}, row 3: ")
    assert problem in str(info.value)


def test_sharegpt_unknown_speaker_is_an_error() -> None:
    row = {"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}
    with pytest.raises(DataFormatError, match="unknown speaker 'robot'"):
        normalize_sft_row(row, "sharegpt")


def test_alpaca_without_output_is_an_error() -> None:
    with pytest.raises(DataFormatError, match="'output' is missing, not a string"):
        normalize_sft_row({"instruction": "q"}, "alpaca")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty\.jsonl: file has no rows"):
        load_sft_file(path)
