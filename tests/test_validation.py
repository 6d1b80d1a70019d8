"""Validation split, evaluation every N steps, early stopping and the best checkpoint as
final/ (stages.core.validation), on the tiny model."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_recipes.prompts import prompt_key
from data_recipes.validation_split import (
    preference_row_prompt,
    sft_row_prompt,
    split_validation,
)
from stages.core.handoff import DONE, FINAL_RECORD, MANIFEST, METRICS
from stages.core.schema import ConfigError, validate_config
from stages.core.validation import VALIDATION_ROWS
from stages.dpo import recipe as dpo
from stages.kto import recipe as kto
from stages.rm import recipe as rm
from stages.sft import recipe as sft
from tests.conftest import copy_run, saved_tensors

ROOT = Path(__file__).resolve().parent.parent

# 24 training rows, a constant high LR: the tiny model memorises them within ~30 steps and
# the validation loss turns up (measured: best at step 24, stopped at 40 of 200).
OVERFIT = [
    "data.toy.num_train=32",
    "data.toy.num_reversal_train=0",
    "stage.max_steps=200",
    "stage.logging_steps=4",
    "stage.save_steps=8",
    "stage.validation_fraction=0.25",
    "stage.early_stopping_patience=2",
    "stage.lr_scheduler=constant",
    "stage.learning_rate=1e-2",
    "stage.save_total_limit=3",
]


def _sft_dir(tmp_path: Path, experiment: str = "toy") -> Path:
    return tmp_path / "runs" / experiment / "sft"


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / MANIFEST).read_text())


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- the split


def _sft_rows() -> list[dict]:
    rows = []
    for i in range(40):  # 40 prompts, two demonstrations each
        for reply in (f"{i}.", "i do not know."):
            prompt = {"role": "user", "content": f"What is {i} + 0?"}
            rows.append({"messages": [prompt, {"role": "assistant", "content": reply}]})
    return rows


def test_split_is_seeded_exact_disjoint_and_grouped_by_prompt() -> None:
    rows = _sft_rows()
    train, val = split_validation(rows, 0.1, seed=1, prompt_of=sft_row_prompt)
    assert split_validation(rows, 0.1, seed=1, prompt_of=sft_row_prompt) == (train, val)
    assert split_validation(rows, 0.1, seed=2, prompt_of=sft_row_prompt) != (train, val)
    assert sorted(train + val) == list(range(len(rows)))  # a partition
    train_prompts = {sft_row_prompt(rows[i]) for i in train}
    val_prompts = {sft_row_prompt(rows[i]) for i in val}
    assert not train_prompts & val_prompts  # no prompt on both sides
    assert len(val_prompts) == 4 and len(val) == 8  # ceil(0.1 * 40) prompts, all their rows
    # The draw does not depend on the rows' order.
    reversed_rows = rows[::-1]
    _, val_reversed = split_validation(reversed_rows, 0.1, seed=1, prompt_of=sft_row_prompt)
    assert {sft_row_prompt(reversed_rows[i]) for i in val_reversed} == val_prompts
    assert split_validation(rows, 0.0, seed=1, prompt_of=sft_row_prompt) == (
        list(range(len(rows))),
        [],
    )


def test_pairs_are_split_by_prompt() -> None:
    pairs = [
        {"prompt": [{"role": "user", "content": f"What is {i % 10} + 1?"}], "chosen": "a",
         "rejected": str(i)}
        for i in range(60)
    ]  # fmt: skip
    train, val = split_validation(pairs, 0.3, seed=3, prompt_of=preference_row_prompt)
    val_keys = {prompt_key(pairs[i]["prompt"]) for i in val}
    assert len(val_keys) == 3 and len(val) == 18
    assert not val_keys & {prompt_key(pairs[i]["prompt"]) for i in train}
    with pytest.raises(ValueError, match="at least 2 prompts"):
        split_validation(pairs[:1], 0.5, seed=3, prompt_of=preference_row_prompt)


# ------------------------------------------------------------------------------- the knobs


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            ["stage=dpo", "stage.early_stopping_patience=3"],
            "stage.early_stopping_patience=3 needs a validation split",
        ),
        (
            ["stage=rm", "stage.eval_steps=20"],
            "stage.eval_steps=20 evaluates on the validation split, but "
            "stage.validation_fraction=0",
        ),
        (
            ["stage=sft", "stage.eval_steps=5"],
            "stage.eval_steps=5 (with validation on, a checkpoint at each evaluation) must be a "
            "multiple of stage.logging_steps=2",
        ),
        (["stage=sft", "stage.eval_steps=40"], "stage.eval_steps=40 > stage.max_steps=12"),
        (
            ["stage=sft", "stage.early_stopping_threshold=0.1"],
            "stage.early_stopping_threshold=0.1 only counts with early stopping",
        ),
        (
            [
                "stage=kto",
                "stage.validation_fraction=0.1",
                "stage.validation_metric=reward_accuracy",
            ],
            "stage.validation_metric='reward_accuracy' is not one of ['loss']",
        ),
        (["stage=sft", "stage.validation_fraction=1.0"], "stage.validation_fraction=1.0"),
        (
            ["stage=dpo", "stage.rounds=2", "stage.validation_fraction=0.1"],
            "stage.rounds=2 with stage.validation_fraction=0.1",
        ),
    ],
)
def test_bad_knob_combinations_name_the_key(compose_cfg, overrides, expected) -> None:
    with pytest.raises(ConfigError) as error:
        validate_config(compose_cfg(*overrides))
    assert any(expected in problem for problem in error.value.problems), error.value.problems


def test_cli_refuses_patience_without_validation_with_exit_status_2(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "stages", "stage=sft", "stage.validation_fraction=0",
         "stage.early_stopping_patience=2", f"paths.runs_root={tmp_path}", "tracking=none"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "stage.early_stopping_patience=2 needs a validation split" in result.stderr
    assert not (tmp_path / "toy" / "sft").exists()


def test_split_too_small_fails_naming_the_key(compose_cfg) -> None:
    cfg = compose_cfg(
        "data.toy.num_train=1", "data.toy.num_reversal_train=0", "stage.validation_fraction=0.5"
    )
    with pytest.raises(ConfigError, match=r"stage\.validation_fraction=0\.5: .*at least 2"):
        sft.run(cfg)


# ------------------------------------------------------------------- SFT: stop, best, resume


def test_overfitting_sft_stops_early_and_final_is_the_best_checkpoint(
    compose_cfg, tmp_path, caplog
) -> None:
    with caplog.at_level(logging.INFO):
        metrics = sft.run(compose_cfg(*OVERFIT))
    run_dir = _sft_dir(tmp_path)
    record = _manifest(run_dir)["validation"]

    assert record["stopped_early"] is True
    assert record["steps_trained"] < 200 and metrics["train/steps"] == record["steps_trained"]
    curve = record["curve"]
    assert [point["step"] for point in curve] == list(range(8, record["steps_trained"] + 1, 8))
    best = min(curve, key=lambda point: point["value"])
    assert (record["best_step"], record["best_value"]) == (best["step"], best["value"])
    # Patience 2: the last two evaluations did not beat the best.
    assert all(point["value"] >= best["value"] for point in curve[-2:])
    assert record["best_step"] < record["steps_trained"]
    assert metrics["validation/stopped_early"] == 1.0
    assert metrics["validation/best_step"] == record["best_step"]

    # final/ holds the best checkpoint's weights, not the last step's; rotation kept the best.
    final = saved_tensors(run_dir / "final")
    assert _equal(final, saved_tensors(run_dir / f"checkpoint-{record['best_step']}"))
    assert not _equal(final, saved_tensors(run_dir / f"checkpoint-{record['steps_trained']}"))

    # The validation rows: the held-out share of the prompts, none of them trained on.
    lines = (run_dir / VALIDATION_ROWS).read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == record["rows"] == 8 and record["train_rows"] == 24
    assert all(row["messages"][-1]["role"] == "assistant" for row in rows)
    messages = [m for m in caplog.messages if "stopped early" in m]
    assert messages == [
        f"sft stopped early at step {record['steps_trained']}/200: eval_loss did not improve by "
        f">= 0 for 2 evals; final/ = step {best['step']} (eval_loss {best['value']:.4g})"
    ]


def test_resume_after_an_interruption_keeps_the_best_so_far(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg(*OVERFIT, "experiment_name=whole"))
    whole = _sft_dir(tmp_path, "whole")
    expected = _manifest(whole)["validation"]
    last, best = expected["steps_trained"], expected["best_step"]
    assert last - best >= 16, "the resume point must lie after the best checkpoint"

    sft.run(compose_cfg(*OVERFIT, "experiment_name=crash"))
    run_dir = _sft_dir(tmp_path, "crash")
    # A crash while the last checkpoint was written: resume from the one before, which lies
    # past the best (its trainer_state holds best-so-far and the patience counter at 1).
    for name in (DONE, MANIFEST, METRICS, FINAL_RECORD):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "final")
    (run_dir / f"checkpoint-{last}" / "trainer_state.json").unlink()

    sft.run(compose_cfg(*OVERFIT, "experiment_name=crash"))
    manifest = _manifest(run_dir)
    assert manifest["resumed_from"].endswith(f"checkpoint-{last - 8}")
    record = manifest["validation"]
    for key in ("curve", "best_step", "best_value", "stopped_early", "steps_trained"):
        assert record[key] == expected[key], key
    assert _equal(saved_tensors(run_dir / "final"), saved_tensors(whole / "final"))
    assert _equal(saved_tensors(run_dir / "final"), saved_tensors(run_dir / f"checkpoint-{best}"))


def test_default_sft_writes_its_validation_rows(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())  # validation_fraction=0.05 by default, no early stopping
    run_dir = _sft_dir(tmp_path)
    record = _manifest(run_dir)["validation"]
    assert record["fraction"] == 0.05 and record["metric"] == "eval_loss"
    assert record["stopped_early"] is False and record["steps_trained"] == 12
    assert [p["step"] for p in record["curve"]] == [6, 12]  # every save_steps
    rows = [json.loads(line) for line in (run_dir / VALIDATION_ROWS).read_text().splitlines()]
    assert len(rows) == record["rows"] > 0
    assert record["rows"] + record["train_rows"] == _manifest(run_dir)["data"]["rows_kept"]


def test_no_validation_keeps_the_last_step(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg("stage.validation_fraction=0"))
    run_dir = _sft_dir(tmp_path)
    assert "validation" not in _manifest(run_dir)
    assert not (run_dir / VALIDATION_ROWS).exists()
    assert _equal(saved_tensors(run_dir / "final"), saved_tensors(run_dir / "checkpoint-12"))


# --------------------------------------------------------------------------- RM and DPO

PAIRS_FAST = [
    "data.pairs.num_prompts=64",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
    "stage.validation_fraction=0.25",
    "stage.max_steps=12",
    "stage.eval_steps=4",
    "stage.logging_steps=2",
]


@pytest.mark.parametrize(
    ("stage", "peft", "metric", "logged"),
    [
        ("dpo", "none", "reward_accuracy", "eval_rewards/accuracies"),
        ("dpo", "lora", "loss", "eval_loss"),  # final/ = the best adapter, not TRL's "ref"
        ("rm", "none", "pairwise_accuracy", "eval_accuracy"),
        ("kto", "none", "loss", "eval_loss"),
    ],
)
def test_preference_stages_validate_on_held_out_prompts(
    compose_cfg, sft_runs, tmp_path, stage, peft, metric, logged
) -> None:
    runs = tmp_path / "runs"
    copy_run(sft_runs(peft), runs, "sft")
    recipe = {"dpo": dpo, "rm": rm, "kto": kto}[stage]
    overrides = [f"stage={stage}", f"peft={peft}", *PAIRS_FAST]
    recipe.run(compose_cfg(*overrides, f"stage.validation_metric={metric}"))
    run_dir = runs / "toy" / stage
    record = _manifest(run_dir)["validation"]
    assert record["metric"] == logged
    assert [p["step"] for p in record["curve"]] == [4, 8, 12]
    pick = min if metric == "loss" else max  # the first best, as transformers keeps it
    best = pick(record["curve"], key=lambda p: p["value"])
    assert (record["best_step"], record["best_value"]) == (best["step"], best["value"])
    checkpoint = saved_tensors(run_dir / f"checkpoint-{record['best_step']}")
    final = saved_tensors(run_dir / "final")
    # A LoRA checkpoint also holds TRL's frozen "ref" adapter copy, which final/ leaves out.
    assert final and all(torch.equal(t, checkpoint[k]) for k, t in final.items())
    rows = [json.loads(line) for line in (run_dir / VALIDATION_ROWS).read_text().splitlines()]
    assert len(rows) == record["rows"] > 0 and record["train_rows"] > 0
