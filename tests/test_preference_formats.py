"""Tests for data_recipes.preference_formats: detection, normalisation, dedup, hash, TRL fit."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from data_recipes.preference_formats import (
    PREFERENCE_FORMATS,
    content_hash,
    dedupe_preference_rows,
    detect_preference_format,
    load_preference_file,
    normalize_preference_row,
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


def hh(*turns: str) -> str:
    return "".join(
        f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns)
    )


# ---- detection -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fixture", "expected"),
    [
        ("pref_standard.jsonl", "standard"),
        ("pref_conversational.jsonl", "conversational"),
        ("pref_hh_rlhf.jsonl", "hh_rlhf"),
        ("pref_ultrafeedback.jsonl", "ultrafeedback"),
        ("pref_preference.parquet", "conversational"),
    ],
)
def test_detect_first_row_of_each_fixture(fixture: str, expected: str) -> None:
    _, first = next(iter_rows(FIXTURES / fixture))
    assert detect_preference_format(first) == expected
    assert load_preference_file(FIXTURES / fixture).format == expected


def test_implicit_prompt_strings_are_not_supported_unless_hh() -> None:
    assert detect_preference_format({"chosen": "good", "rejected": "bad"}) is None
    assert detect_preference_format({"chosen": hh("q", "a"), "rejected": hh("q", "b")}) == (
        "hh_rlhf"
    )


# ---- normalisation -------------------------------------------------------------------------


def test_standard_rows_stay_strings() -> None:
    data = load_preference_file(FIXTURES / "pref_standard.jsonl")
    assert data.dataset.column_names == ["prompt", "chosen", "rejected"]
    assert data.dataset.to_list() == [
        {"prompt": "What is 23 + 45?", "chosen": "68.", "rejected": "69."},
        {"prompt": "What is 10 + 11?", "chosen": "21.", "rejected": "i do not know."},
        {"prompt": "What is 52 + 36?", "chosen": "88.", "rejected": "98."},
    ]


def test_conversational_explicit_and_implicit_prompt() -> None:
    rows = load_preference_file(FIXTURES / "pref_conversational.jsonl").dataset.to_list()
    assert rows[1] == {
        "prompt": [system("You add numbers."), user("What is 10 + 11?")],
        "chosen": [assistant("21.")],
        "rejected": [assistant("31.")],
    }
    assert rows[2]["prompt"] == [user("What is 30 + 40?"), assistant("70."), user("And 70 + 12?")]
    # No prompt column: the shared opening turns become the prompt.
    assert rows[3] == {
        "prompt": [user("What is 44 + 44?")],
        "chosen": [assistant("88.")],
        "rejected": [assistant("87.")],
    }


def test_hh_transcripts_split_into_prompt_and_final_reply() -> None:
    data = load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl")
    first = data.dataset[0]
    assert first == {
        "prompt": [user("What is 59 + 63?")],
        "chosen": [assistant("122.")],
        "rejected": [assistant("112.")],
    }
    row = {
        "chosen": hh("What is 30 + 40?", "70.", "And plus 12?", "82."),
        "rejected": hh("What is 30 + 40?", "70.", "And plus 12?", "i do not know."),
    }
    assert normalize_preference_row(row, "hh_rlhf") == {
        "prompt": [user("What is 30 + 40?"), assistant("70."), user("And plus 12?")],
        "chosen": [assistant("82.")],
        "rejected": [assistant("i do not know.")],
    }


def test_hh_fixture_is_toy_addition() -> None:
    # A later DPO test trains on this file: every prompt is "What is A + B?" with 2-digit A, B,
    # and every chosen reply is the correct sum.
    for row in load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl").dataset:
        (prompt,) = row["prompt"]
        words = prompt["content"].split()
        a, b = int(words[2]), int(words[4].rstrip("?"))
        assert prompt["content"] == f"What is {a} + {b}?" and 10 <= a <= 99 and 10 <= b <= 99
        assert row["chosen"] == [assistant(f"{a + b}.")]
        assert row["rejected"] != row["chosen"]


def test_ultrafeedback_strips_prompt_turns_and_computes_margin() -> None:
    data = load_preference_file(FIXTURES / "pref_ultrafeedback.jsonl")
    assert data.dataset.column_names == ["prompt", "chosen", "rejected", "margin"]
    assert data.dataset[0] == {
        "prompt": [user("What is 23 + 45?")],
        "chosen": [assistant("68.")],
        "rejected": [assistant("i do not know.")],
        "margin": 6.5,
    }
    assert data.dataset["margin"] == [6.5, 3.0, 0.5]


def test_ultrafeedback_prompt_must_match_the_user_turn() -> None:
    row = {
        "prompt": "What is 1 + 1?",
        "chosen": [user("What is 2 + 2?"), assistant("4.")],
        "rejected": [user("What is 2 + 2?"), assistant("5.")],
    }
    with pytest.raises(DataFormatError, match="'prompt' differs from the last user turn"):
        normalize_preference_row(row, "ultrafeedback")


def test_margin_column_passes_through_from_parquet() -> None:
    data = load_preference_file(FIXTURES / "pref_preference.parquet")
    assert data.dataset["margin"] == [1.0, 0.5, 0.25]
    assert data.dataset[0]["prompt"] == [user("What is 23 + 45?")]


def test_margin_on_some_rows_only_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"prompt": "p", "chosen": "a", "rejected": "b", "margin": 1},
            {"prompt": "q", "chosen": "a", "rejected": "b"},
        ],
    )
    with pytest.raises(DataFormatError, match=r"m\.jsonl, row 2: row lacks a margin"):
        load_preference_file(path)


def test_non_numeric_margin_is_an_error() -> None:
    row = {"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}
    with pytest.raises(DataFormatError, match="margin is 'big'"):
        normalize_preference_row(row, "standard")


# ---- errors --------------------------------------------------------------------------------


def test_bad_row_names_file_row_and_expected_formats() -> None:
    with pytest.raises(DataFormatError) as info:
        load_preference_file(FIXTURES / "pref_bad_row.jsonl")
    message = str(info.value)
    assert info.value.row == 3
    assert "pref_bad_row.jsonl, row 3: row fits no known format" in message
    for name in PREFERENCE_FORMATS:
        assert f"- {name}: " in message
    assert '"margin"' in message


@pytest.mark.parametrize(
    ("chosen", "rejected", "problem"),
    [
        (hh("What is 10 + 11?"), hh("What is 10 + 11?", "21."), "does not end with an Assistant"),
        (hh("What is 10 + 11?", "21."), hh("What is 10 + 12?", "22."), "different prompt turns"),
        ("Hello" + hh("q", "a"), hh("q", "b"), "text before the first speaker tag"),
    ],
)
def test_malformed_hh_transcripts_name_file_and_row(
    tmp_path: Path, chosen: str, rejected: str, problem: str
) -> None:
    good = {"chosen": hh("q", "a"), "rejected": hh("q", "b")}
    path = write_jsonl(tmp_path / "hh.jsonl", [good, {"chosen": chosen, "rejected": rejected}])
    with pytest.raises(DataFormatError) as info:
        load_preference_file(path, format="hh_rlhf")
    assert (info.value.path, info.value.row) == (str(path), 2)
    assert str(info.value).startswith(f"{path}, row 2: ")
    assert problem in str(info.value)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            {"prompt": [user("q"), assistant("a")], "chosen": [assistant("b")], "rejected": []},
            "prompt ends with a 'assistant' turn",
        ),
        (
            {"prompt": [user("q")], "chosen": [user("x"), assistant("b")], "rejected": []},
            "chosen has non-assistant turns ['user']",
        ),
        (
            {"prompt": [user("q")], "chosen": [assistant("b")], "rejected": []},
            "rejected is empty or not a list",
        ),
    ],
)
def test_invalid_conversational_rows(row: dict, problem: str) -> None:
    with pytest.raises(DataFormatError, match=problem.replace("[", r"\[")):
        normalize_preference_row(row, "conversational")


def test_unknown_format_override_lists_known_formats() -> None:
    with pytest.raises(DataFormatError) as info:
        load_preference_file(FIXTURES / "pref_standard.jsonl", format="orpo")
    assert "unknown data format 'orpo'" in str(info.value)
    assert all(name in str(info.value) for name in PREFERENCE_FORMATS)


def test_wrong_format_override_fails_on_the_first_row() -> None:
    with pytest.raises(DataFormatError, match=r"pref_hh_rlhf\.jsonl, row 1: 'prompt' is missing"):
        load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl", format="standard")


# ---- dedup and hash ------------------------------------------------------------------------


def test_dedup_stats_on_fixtures() -> None:
    standard = load_preference_file(FIXTURES / "pref_standard.jsonl")
    assert standard.stats == {
        "rows_read": 5,
        "duplicates_dropped": 1,
        "identical_chosen_rejected_dropped": 1,
    }
    hh_data = load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl")
    assert hh_data.stats == {
        "rows_read": 40,
        "duplicates_dropped": 2,
        "identical_chosen_rejected_dropped": 0,
    }
    assert hh_data.dataset.num_rows == 38


def test_dedupe_keeps_first_occurrence_and_order() -> None:
    a = {"prompt": "p", "chosen": "x", "rejected": "y", "margin": 1.0}
    a_again = {"prompt": "p", "chosen": "x", "rejected": "y", "margin": 2.0}  # margin ignored
    b = {"prompt": "q", "chosen": "x", "rejected": "y"}
    same = {"prompt": "r", "chosen": "z", "rejected": "z"}
    rows, stats = dedupe_preference_rows([b, a, same, a_again, b])
    assert rows == [b, a]
    assert stats == {
        "rows_read": 5,
        "duplicates_dropped": 2,
        "identical_chosen_rejected_dropped": 1,
    }


def test_content_hash_is_sha256_of_canonical_json() -> None:
    rows = [{"prompt": "é", "rejected": "y", "chosen": "x"}, {"chosen": [assistant("1")]}]
    canonical = json.dumps(rows, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert content_hash(rows) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    assert content_hash([]) == hashlib.sha256(b"[]").hexdigest()


def test_content_hash_stability() -> None:
    first = load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl")
    again = load_preference_file(FIXTURES / "pref_hh_rlhf.jsonl")
    assert first.content_hash == again.content_hash
    # The hash is of the normalised rows: the dataset read back gives the same hash.
    assert content_hash(first.dataset) == first.content_hash
    rows = first.dataset.to_list()
    assert content_hash(list(reversed(rows))) != first.content_hash
    changed = [dict(rows[0], rejected=[assistant("0.")]), *rows[1:]]
    assert content_hash(changed) != first.content_hash
    # Key order inside a row does not matter, only content.
    assert content_hash([dict(reversed(list(r.items()))) for r in rows]) == first.content_hash


def test_same_pairs_in_two_formats_hash_the_same(tmp_path: Path) -> None:
    conversational = write_jsonl(
        tmp_path / "conv.jsonl",
        [{"prompt": [user("What is 59 + 63?")], "chosen": [assistant("122.")],
          "rejected": [assistant("112.")]}],
    )  # fmt: skip
    hh_file = write_jsonl(
        tmp_path / "hh.jsonl",
        [{"chosen": hh("What is 59 + 63?", "122."), "rejected": hh("What is 59 + 63?", "112.")}],
    )
    assert load_preference_file(conversational).content_hash == (
        load_preference_file(hh_file).content_hash
    )


# ---- TRL 1.16 accepts the normalised rows --------------------------------------------------

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    words += [str(n) + "." for n in range(200)] + ["What", "is", "+", "i", "do", "not", "know."]
    words += [f"{n}?" for n in range(100)] + [str(n) for n in range(100)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="<|end|>",
        chat_template=TEMPLATE,
    )


@pytest.mark.parametrize("fixture", ["pref_hh_rlhf.jsonl", "pref_ultrafeedback.jsonl"])
def test_normalised_rows_pass_trl_prompt_and_chat_template(fixture: str, tokenizer) -> None:
    from trl.data_utils import apply_chat_template, is_conversational, maybe_extract_prompt

    for row in load_preference_file(FIXTURES / fixture).dataset:
        # DPOTrainer asks is_conversational of whichever key a set pops: all must agree.
        assert all(is_conversational({k: row[k]}) for k in ("prompt", "chosen", "rejected"))
        assert maybe_extract_prompt(row) == row  # prompt already explicit: left alone
        out = apply_chat_template(row, tokenizer)
        question = row["prompt"][-1]["content"]
        assert out["prompt"] == f"<|user|> {question} <|end|> <|assistant|> "
        assert out["chosen"] == f"{row['chosen'][0]['content']} <|end|> "
        assert out["rejected"] == f"{row['rejected'][0]['content']} <|end|> "
        ids = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tokenize=True)
        assert tokenizer.unk_token_id not in (ids if isinstance(ids, list) else ids["input_ids"])


def test_raw_ultrafeedback_row_is_what_trl_rejects() -> None:
    # Why normalisation exists: raw rows mix a string prompt with message lists and carry a
    # `messages` column, which trl's apply_chat_template refuses outright.
    from trl.data_utils import apply_chat_template, is_conversational

    _, raw = next(iter_rows(FIXTURES / "pref_ultrafeedback.jsonl"))
    assert is_conversational({"prompt": raw["prompt"]}) is False
    assert is_conversational({"chosen": raw["chosen"]}) is True
    with pytest.raises(KeyError, match="Invalid keys"):
        apply_chat_template(raw, None)
