"""Data accounting: rows read, kept and dropped by reason, exact on crafted fixtures, equal to
what TRL's own preprocessing keeps, recorded in the manifest, and a clear error when no row is
left. The fixtures are built by tests/fixtures/make_fixtures.py (counts listed there)."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer, SFTConfig, SFTTrainer

from data_recipes import pairs as pair_recipes
from data_recipes.accounting import NoRowsLeftError, RowAccount
from data_recipes.formats import load_sft_file
from data_recipes.rows import DataFormatError, iter_rows
from data_recipes.sft_data import load_sft_rows
from stages.core.data_accounting import (
    PRETOKENIZED,
    check_trainer_rows,
    preference_pairs_to_train,
    sft_rows_to_train,
)
from stages.core.schema import PairsConfig
from stages.core.tiny_model import build_tokenizer
from tests.conftest import FIXTURES
from tests.fixtures.make_fixtures import NON_UTF8_ROW, PREF_ACCOUNTING, SFT_ACCOUNTING

SFT_FILE = FIXTURES / "sft_accounting.jsonl"
PREF_FILE = FIXTURES / "pref_accounting.jsonl"
ALL_TOO_LONG = FIXTURES / "pref_all_too_long.jsonl"
MAX_LENGTH = 64  # the tiny model's model.max_length, which the fixtures are built against


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()  # the tiny model's byte-level tokenizer with its chat template


def _sft_args(tmp_path: Path, **kwargs) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path),
        max_length=MAX_LENGTH,
        assistant_only_loss=True,
        use_cpu=True,
        bf16=False,
        report_to=[],
        activation_checkpointing=False,
        dataset_num_proc=None,
        **kwargs,
    )


def _sft_source(path: Path = SFT_FILE):
    return load_sft_rows(
        SimpleNamespace(sft=SimpleNamespace(source="file", path=str(path), format="auto"))
    )


def _file_pairs(path: Path, heldout_fraction: float = 0.0) -> pair_recipes.PairSet:
    cfg = PairsConfig(source="file", path=str(path), heldout_fraction=heldout_fraction)
    return pair_recipes.file_pairs(cfg, set())


# ---------------------------------------------------------------------------------- SFT


def test_sft_counts_by_reason_are_exact(tokenizer, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="stages.core.data_accounting"):
        rows, info = sft_rows_to_train(_sft_source(), tokenizer, _sft_args(tmp_path), 0.2)
    assert info["rows_read"] == SFT_ACCOUNTING["read"] == 25
    assert info["rows_kept"] == len(rows) == SFT_ACCOUNTING["kept"]
    assert info["rows_dropped"] == SFT_ACCOUNTING["dropped"]
    assert info["rows_truncated"] == SFT_ACCOUNTING["truncated"]
    assert info["max_length"] == MAX_LENGTH
    # SFT rows are hashed by the same row hasher as preference rows (one content hasher).
    # ... over the rows as data, not the token columns added for the trainer.
    assert set(PRETOKENIZED) <= set(rows.column_names)
    assert info["content_hash"] == pair_recipes.content_hash(rows.remove_columns(PRETOKENIZED))
    lines = [r for r in caplog.records if r.name == "stages.core.data_accounting"]
    assert lines[0].levelno == logging.INFO
    assert f"{SFT_FILE}: 25 rows read, 19 kept, 6 dropped (empty 2, too_long 4)" in (
        lines[0].getMessage()
    )
    # 6 of 25 dropped > 0.2: one warning that says what to do.
    warning = next(r.getMessage() for r in lines if r.levelno == logging.WARNING)
    assert "data.max_dropped_fraction=0.2" in warning and "model.max_length=88" in warning


def test_no_warning_below_the_threshold(tokenizer, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="stages.core.data_accounting"):
        sft_rows_to_train(_sft_source(), tokenizer, _sft_args(tmp_path), 0.25)  # 24% dropped
    assert [r.levelno for r in caplog.records if r.name.startswith("stages")] == [logging.INFO]


def test_sft_counts_equal_what_sft_trainer_keeps(tokenizer, tmp_path) -> None:
    """TRL's own preparation of the unfiltered rows keeps exactly the rows we keep."""
    source = _sft_source()
    raw = source.dataset  # blank replies already dropped by the loader, lengths not checked
    args = _sft_args(tmp_path)
    trainer_self = SimpleNamespace(
        chat_template=None, completion_only_loss=None, _tokenizer=tokenizer
    )
    prepared = SFTTrainer._prepare_dataset(trainer_self, raw, tokenizer, args, False, None, "train")
    rows, info = sft_rows_to_train(source, tokenizer, args, 1.0)
    assert len(prepared) == info["rows_kept"] == len(rows)
    check_trainer_rows(prepared, len(rows), "sft", args)  # what the stage checks
    # The truncated rows are the ones TRL cut to max_length.
    cut = sum(len(ids) == MAX_LENGTH for ids in prepared["input_ids"])
    assert cut == info["rows_truncated"]
    _assert_trl_prepares_ours_as_its_own(trainer_self, rows, prepared, tokenizer, args)


def _assert_trl_prepares_ours_as_its_own(trainer_self, rows, prepared, tokenizer, args) -> None:
    """Our rows carry the tokens the accounting computed: SFTTrainer skips its own
    tokenisation and must end with exactly the input_ids and labels it makes itself."""
    ours = SFTTrainer._prepare_dataset(trainer_self, rows, tokenizer, args, False, None, "train")
    assert ours["input_ids"] == prepared["input_ids"]
    assert ours["labels"] == prepared["labels"]


def test_sft_counts_follow_the_template_trl_trains_with(tmp_path) -> None:
    """A template without generation markers that TRL patches (Qwen2.5's): SFTTrainer
    tokenises with TRL's training version, and the accounting must use the same masks
    (with the unpatched one every mask is empty and too-long rows would count as kept)."""
    import trl
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    qwen = build_tokenizer()
    templates = Path(trl.__file__).parent / "chat_templates"
    qwen.chat_template = (templates / "qwen2_5.jinja").read_text()
    assert not has_generation_markers(qwen.chat_template)
    source = _sft_source()
    # Qwen's default system prompt makes rows of 178-243 tokens; at 200 the replies of some
    # start past the limit (dropped) and some are cut (kept, truncated).
    args = dataclasses.replace(_sft_args(tmp_path), max_length=200)
    trainer_self = SimpleNamespace(
        chat_template=get_training_chat_template(qwen),  # what SFTTrainer.__init__ sets
        completion_only_loss=None,
        _tokenizer=qwen,
    )
    prepared = SFTTrainer._prepare_dataset(
        trainer_self, source.dataset, qwen, args, False, None, "train"
    )
    rows, info = sft_rows_to_train(source, qwen, args, 1.0)
    assert info["rows_dropped"].get("too_long", 0) == 4  # the case this test is about
    assert info["rows_truncated"] == 3
    assert len(prepared) == info["rows_kept"] == len(rows)
    check_trainer_rows(prepared, len(rows), "sft", args)
    _assert_trl_prepares_ours_as_its_own(trainer_self, rows, prepared, qwen, args)


def test_check_trainer_rows_fails_on_a_mismatch() -> None:
    prepared = Dataset.from_dict({"input_ids": [[1, 2], [3]]})
    check_trainer_rows(prepared, 2, "sft")
    with pytest.raises(RuntimeError, match="prepared 2 rows but the data accounting kept 3"):
        check_trainer_rows(prepared, 3, "sft")


def test_sft_with_every_reply_cut_fails_naming_file_counts_and_fix(tokenizer, tmp_path) -> None:
    path = tmp_path / "long.jsonl"
    long_prompt = "x" * 80
    path.write_text(
        "\n".join(
            json.dumps({"prompt": f"{long_prompt} {i}", "completion": f"{i}."}) for i in range(5)
        )
    )
    with pytest.raises(NoRowsLeftError) as caught:
        sft_rows_to_train(_sft_source(path), tokenizer, _sft_args(tmp_path), 0.2)
    message = str(caught.value)
    assert isinstance(caught.value, DataFormatError)  # the CLI prints it as a clean block
    assert str(path) in message and "none of the 5 rows read" in message
    assert "too_long 5 (longer than model.max_length=64 tokens)" in message
    assert "model.max_length=88" in message  # the longest row: 4 specials + 82 + 2 bytes


def test_packing_that_splits_rows_drops_nothing_for_length(tokenizer, tmp_path) -> None:
    args = _sft_args(tmp_path, packing=True, packing_strategy="wrapped")
    rows, info = sft_rows_to_train(_sft_source(), tokenizer, args, 1.0)
    assert info["rows_dropped"] == {"empty": 2} and info["rows_truncated"] == 0
    assert len(rows) == 23


def test_blank_sft_replies_are_dropped_and_counted(tmp_path) -> None:
    path = tmp_path / "blank.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1 + 1?", "completion": " "}) + "\n")
    account = RowAccount(str(path))
    with pytest.raises(NoRowsLeftError, match=r"none of the 1 rows read.*empty 1"):
        load_sft_file(path, account=account)
    assert account.read == 1 and account.dropped == {"empty": 1}


# --------------------------------------------------------------------------- preference


def test_preference_counts_by_reason_are_exact(tokenizer, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="stages.core.data_accounting"):
        pair_set = preference_pairs_to_train(
            _file_pairs(PREF_FILE), tokenizer, MAX_LENGTH, "dpo", 0.2
        )
    info = pair_set.info
    assert info["rows_read"] == PREF_ACCOUNTING["read"]
    assert info["rows_kept"] == PREF_ACCOUNTING["kept"] == len(pair_set.train) == info["rows_train"]
    assert info["rows_dropped"] == PREF_ACCOUNTING["dropped"]
    assert info["stats"]["kept"] == info["stats"]["train"] == PREF_ACCOUNTING["kept"]
    assert info["content_hash"] == pair_recipes.content_hash(pair_set.train)
    assert any(
        "29 rows read, 20 kept, 9 dropped (duplicate 2, empty 1, identical_pair 2, too_long 4)"
        in r.getMessage()
        for r in caplog.records
    )


def test_heldout_pairs_are_length_checked_too(tokenizer) -> None:
    pair_set = preference_pairs_to_train(
        _file_pairs(PREF_FILE, 0.3), tokenizer, MAX_LENGTH, "rm", 1.0
    )
    info = pair_set.info
    assert pair_set.heldout and info["rows_heldout"] == len(pair_set.heldout)
    assert info["rows_train"] + info["rows_heldout"] == info["rows_kept"] == 20
    assert info["rows_dropped"]["too_long"] == 4


def test_pair_counts_equal_what_reward_and_dpo_trainers_keep(tokenizer, tmp_path) -> None:
    """TRL's own preparation of the length-unchecked pairs keeps exactly the pairs we keep."""
    unchecked = _file_pairs(PREF_FILE)
    kept = preference_pairs_to_train(_file_pairs(PREF_FILE), tokenizer, MAX_LENGTH, "rm", 1.0)
    common = {"output_dir": str(tmp_path), "use_cpu": True, "bf16": False, "report_to": []}
    common["activation_checkpointing"] = False
    common["max_length"] = MAX_LENGTH
    reward = RewardTrainer._prepare_dataset(
        None, unchecked.train_dataset(), tokenizer, RewardConfig(**common), "train"
    )
    assert len(reward) == len(kept.train) == 20
    # DPOTrainer drops only pairs whose prompt fills max_length (it truncates the others):
    # the fixture's too-long pairs are of that kind, so it agrees here too.
    dpo = DPOTrainer._prepare_dataset(
        None, unchecked.train_dataset(), tokenizer, DPOConfig(**common), "train"
    )
    assert len(dpo) == len(kept.train)
    check_trainer_rows(reward, len(kept.train), "rm")


def test_all_pairs_too_long_fails_naming_file_rows_and_fix(tokenizer) -> None:
    with pytest.raises(NoRowsLeftError) as caught:
        preference_pairs_to_train(_file_pairs(ALL_TOO_LONG, 0.2), tokenizer, MAX_LENGTH, "dpo", 0.2)
    message = str(caught.value)
    assert message.startswith(f"{ALL_TOO_LONG}: none of the 6 rows read is left to train on")
    assert "too_long 6 (longer than model.max_length=64 tokens)" in message
    assert "What to do: the longest row is 97 tokens" in message
    assert "model.max_length=97" in message


def test_all_pairs_held_out_says_so(tokenizer) -> None:
    pair_set = _file_pairs(PREF_FILE)
    pair_set.heldout, pair_set.train = pair_set.train, []
    with pytest.raises(NoRowsLeftError, match=r"pairs left are held out.*heldout_fraction"):
        preference_pairs_to_train(pair_set, tokenizer, MAX_LENGTH, "dpo", 1.0)


def test_on_policy_account_maps_the_pair_filters() -> None:
    info = {
        "recipe": "on_policy/best_vs_worst",
        "stats": {
            "prompts": 100,
            "dropped": {"ties": 30, "identical": 1, "margin": 2, "length": 0, "contaminated": 0,
                        "duplicates": 3},
        },
    }  # fmt: skip
    account = pair_recipes.on_policy_account(info)
    assert account.read == 100 and account.kept == 64
    assert account.dropped == {
        "tie": 30,
        "identical_pair": 1,
        "below_min_margin": 2,
        "duplicate": 3,
    }
    # Ties and the margin filter are a configured selection, not lost rows.
    assert account.lost_fraction() == pytest.approx(0.04)
    assert account.summary().startswith("on_policy/best_vs_worst: 100 prompts read, 64 kept")


# ------------------------------------------------------------------------------- UTF-8


def test_non_utf8_byte_names_its_own_row() -> None:
    path = FIXTURES / "sft_non_utf8.jsonl"
    with pytest.raises(DataFormatError) as caught:
        list(iter_rows(path))
    assert caught.value.row == NON_UTF8_ROW == 16
    assert str(caught.value).startswith(f"{path}, row 16: text is not valid UTF-8")
    assert "0xe9" in str(caught.value)
    # The rows before it were read normally.
    rows = []
    with pytest.raises(DataFormatError):
        for number, _ in iter_rows(path):
            rows.append(number)
    assert rows == list(range(1, 16))


def test_non_utf8_byte_in_a_json_file_names_its_line(tmp_path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(
        b'[\n{"prompt": "a", "completion": "b"},\n{"prompt": "caf\xe9", "completion": "c"}\n]'
    )
    with pytest.raises(DataFormatError, match=r"not valid UTF-8 .* on line 3"):
        list(iter_rows(path))


def test_utf8_bom_is_still_accepted(tmp_path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps({"prompt": "x", "completion": "y"}).encode() + b"\n"
    )
    assert list(iter_rows(path)) == [(1, {"prompt": "x", "completion": "y"})]


# -------------------------------------------------------------------------- the stages


def test_sft_stage_manifest_records_what_it_trained_on(compose_cfg, tmp_path) -> None:
    from stages.sft import recipe as sft

    cfg = compose_cfg("data=file", f"data.sft.path={SFT_FILE}", "stage.max_steps=2")
    sft.run(cfg)
    manifest = json.loads((tmp_path / "runs" / "toy" / "sft" / "manifest.json").read_text())
    data = manifest["data"]
    assert data["rows_read"] == 25 and data["rows_kept"] == 19
    assert data["rows_dropped"] == {"empty": 2, "too_long": 4} and data["rows_truncated"] == 3
    assert "rows" not in data  # the old count of rows read, which the trainer never saw


def test_rm_stage_with_every_pair_too_long_fails_before_training(compose_cfg, sft_runs, tmp_path):
    from stages.rm import recipe as rm

    shutil.copytree(sft_runs("none"), tmp_path / "runs" / "toy" / "sft")
    cfg = compose_cfg("stage=rm", "data.pairs.source=file", f"data.pairs.path={ALL_TOO_LONG}")
    with pytest.raises(NoRowsLeftError, match=r"none of the 6 rows read.*too_long 6"):
        rm.run(cfg)
    assert not list((tmp_path / "runs" / "toy").glob("rm/checkpoint-*"))


def test_dpo_stage_manifest_records_the_pairs_it_trained_on(compose_cfg, sft_runs, tmp_path):
    from stages.dpo import recipe as dpo

    shutil.copytree(sft_runs("none"), tmp_path / "runs" / "toy" / "sft")
    cfg = compose_cfg(
        "stage=dpo",
        "data.pairs.source=file",
        f"data.pairs.path={PREF_FILE}",
        "data.pairs.heldout_fraction=0.3",
        "stage.max_steps=2",
    )
    dpo.run(cfg)
    run_dir = tmp_path / "runs" / "toy" / "dpo"
    data = json.loads((run_dir / "manifest.json").read_text())["data"]
    assert data["rows_read"] == 29 and data["rows_kept"] == 20
    assert data["rows_dropped"] == PREF_ACCOUNTING["dropped"]
    heldout = (run_dir / "heldout_pairs.jsonl").read_text().splitlines()
    assert data["rows_train"] + len(heldout) == 20 and data["rows_heldout"] == len(heldout) > 0
