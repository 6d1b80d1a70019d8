"""KTO stage: trains from the SFT policy (full / LoRA / QLoRA) against the SFT reference, on
unpaired preference pairs or a file of labelled replies."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data_recipes.pairs import PairSet
from data_recipes.rows import DataFormatError
from data_recipes.unpaired import load_labelled_file, pairs_from_labelled
from stages import frontier
from stages.compare import KL_KEY, REWARD_KEY, compare, find_runs, frontier_points
from stages.core.handoff import (
    DONE,
    MANIFEST,
    HandoffError,
    file_sha256,
    last_complete_checkpoint,
)
from stages.core.plan import build_plan, check_startable
from stages.core.schema import ConfigError, validate_config
from stages.kto import recipe as kto
from stages.kto.data import _unpaired_rows
from tests.conftest import CONF_DIR, copy_run, saved_tensors

# As tests/test_dpo.py: the 12-step SFT model never answers correctly, so pair its samples
# with the correct answer (best-vs-worst pairs would all be ties).
PAIRS_FAST = [
    "data.pairs.num_prompts=64",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
    "stage.logging_steps=1",  # the first log entry is step 1: rewards before any update
]


def _log_history(run_dir: Path) -> list[dict]:
    checkpoint = last_complete_checkpoint(run_dir)
    assert checkpoint is not None
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_kto_trains_against_the_sft_reference(compose_cfg, sft_runs, tmp_path, peft) -> None:
    runs = tmp_path / "runs"
    sft_dir = copy_run(sft_runs(peft), runs, "sft")
    metrics = kto.run(compose_cfg("stage=kto", f"peft={peft}", *PAIRS_FAST))
    kto_dir = runs / "toy" / "kto"
    assert (kto_dir / DONE).is_file()

    # Parent and reference: the SFT stage, named by its manifest hash.
    manifest = json.loads((kto_dir / MANIFEST).read_text())
    sft_sha = file_sha256(sft_dir / MANIFEST)
    assert manifest["parent"]["stage"] == "sft"
    assert manifest["parent"]["manifest_sha256"] == sft_sha
    reference = manifest["reference"]
    assert reference["stage"] == "sft" and reference["manifest_sha256"] == sft_sha
    expected_kind = "sft_full_weights" if peft == "none" else "sft_adapter_frozen_copy"
    assert reference["kind"] == expected_kind

    # The data account: on-policy pairs, each unpaired into one desirable + one undesirable.
    data = manifest["data"]
    assert data["recipe"] == "on_policy/ground_truth_vs_sample"
    unpaired = data["unpaired"]
    assert unpaired["from"] == "pairs" and unpaired["pairs"] == data["stats"]["train"] > 0
    assert unpaired["desirable"] == unpaired["undesirable"] == unpaired["pairs"]
    assert unpaired["rows"] == 2 * unpaired["pairs"]
    assert manifest["config"]["stage"]["beta"] == 0.1

    # Reference = the policy KTO starts from: at step 1 the implicit rewards
    # beta * (logp_policy - logp_ref) are exactly 0 on both sides. A bare-base reference (the
    # adapters disabled, or the base reloaded) would be far from 0: SFT moved the weights.
    history = _log_history(kto_dir)
    first = history[0]
    assert first["step"] == 1
    assert first["rewards/chosen"] == 0.0
    assert first["rewards/rejected"] == 0.0
    assert first["kl"] == 0.0
    last = [e for e in history if "rewards/margins" in e][-1]
    assert last["rewards/margins"] > 0, "KTO should raise desirable over undesirable replies"

    # KTO changed the parameters it trains; final/ holds only the trained model / adapter.
    before, after = saved_tensors(sft_dir / "final"), saved_tensors(kto_dir / "final")
    assert before.keys() == after.keys()
    trained = [k for k in before if "lora_" in k] if peft != "none" else list(before)
    assert trained
    changed = [k for k in trained if not torch.equal(before[k], after[k].to(before[k].dtype))]
    assert len(changed) == len(trained), f"unchanged: {set(trained) - set(changed)}"

    # It ended with the comparison against its SFT parent.
    for key in ("compare/kl_per_token", "compare/win_rate", "compare/policy_logp_margin"):
        assert key in metrics, key
    assert metrics["eval/accuracy"] == metrics["compare/policy_accuracy"]
    assert (
        json.loads((kto_dir / "metrics.json").read_text())["eval/accuracy"]
        == (metrics["eval/accuracy"])
    )
    assert (kto_dir / "comparison.txt").read_text().startswith("metric")


def _labelled_rows(n_prompts: int) -> list[dict]:
    rows = []
    for i in range(n_prompts):
        prompt = f"What is {100 + i} + {i}?"  # the toy eval pool never asks these
        rows.append({"prompt": prompt, "completion": f"{100 + 2 * i}", "label": True})
        rows.append({"prompt": prompt, "completion": "I am not sure.", "label": False})
    return rows


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kto_on_a_labelled_reply_file(compose_cfg, sft_runs, tmp_path) -> None:
    runs = tmp_path / "runs"
    copy_run(sft_runs("lora"), runs, "sft")
    rows = _labelled_rows(40)
    rows.append(dict(rows[0]))  # a repeat: dropped and counted
    path = _write_jsonl(tmp_path / "labelled.jsonl", rows)
    data_args = ["data.pairs.source=file", f"data.pairs.path={path}"]

    # A malformed row fails before any weights load, naming file and row.
    bad = _write_jsonl(tmp_path / "bad.jsonl", [*rows[:2], {**rows[2], "label": "yes"}])
    with pytest.raises(DataFormatError, match=rf"{re.escape(str(bad))}, row 3: 'label' is 'yes'"):
        kto.run(compose_cfg("stage=kto", "peft=lora", "data.pairs.source=file",
                            f"data.pairs.path={bad}"))  # fmt: skip
    assert not (runs / "toy" / "kto" / "final").exists()

    metrics = kto.run(compose_cfg("stage=kto", "peft=lora", *data_args, "stage.max_steps=6"))
    manifest = json.loads((runs / "toy" / "kto" / MANIFEST).read_text())
    data = manifest["data"]
    assert data["format"] == "labelled" and data["recipe"] == "file"
    assert data["rows_read"] == 81 and data["rows_dropped"] == {"duplicate": 1}
    unpaired = data["unpaired"]
    assert unpaired["from"] == "labelled_file"
    assert unpaired["rows"] == data["rows_train"] == unpaired["desirable"] + unpaired["undesirable"]
    assert data["rows_train"] + data["rows_heldout"] == 80
    # Held-out rows become pairs again (one per held-out prompt) for the preference metrics.
    assert metrics["compare/heldout_pairs"] == data["rows_heldout"] // 2 > 0
    assert manifest["reference"]["kind"] == "sft_adapter_frozen_copy"


def test_labelled_file_loading_and_errors(tmp_path) -> None:
    rows = _labelled_rows(3)
    messages = [
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["completion"]}], "label": r["label"]}
        for r in rows
    ]  # fmt: skip
    loaded = load_labelled_file(_write_jsonl(tmp_path / "m.jsonl", messages))
    assert loaded.stats == {"desirable": 3, "undesirable": 3}
    assert loaded.rows[0]["completion"] == [{"role": "assistant", "content": "100"}]
    pairs = pairs_from_labelled(loaded.rows)
    assert [p["chosen"][0]["content"] for p in pairs] == ["100", "102", "104"]
    assert all(p["rejected"][0]["content"] == "I am not sure." for p in pairs)

    cases = {
        "label": ({"prompt": "a", "completion": "b", "label": 1}, "'label' is 1 (int)"),
        "mixed": (
            {"prompt": "a", "completion": [{"role": "assistant", "content": "b"}], "label": True},
            "not both strings or both message lists",
        ),
        "pair": ({"prompt": "a", "chosen": "b", "rejected": "c"}, "not a labelled reply"),
        "kind": (
            {
                "prompt": [{"role": "user", "content": "a"}],
                "completion": [{"role": "assistant", "content": "b"}],
                "label": False,
            },
            "mixes string and message-list columns",
        ),
    }
    for name, (row, message) in cases.items():
        path = _write_jsonl(tmp_path / f"{name}.jsonl", [*rows[:3], row])
        with pytest.raises(
            DataFormatError, match=rf"{re.escape(str(path))}, row 4: .*{re.escape(message)}"
        ):
            load_labelled_file(path)


def test_unpairing_counts_and_order() -> None:
    train = [
        {"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "margin": 1.0}
        for i in range(50)
    ]
    pair_set = PairSet(train, [train[0]], {"recipe": "file", "stats": {"train": 50}})
    data = _unpaired_rows(pair_set, seed=0)
    assert data.info["unpaired"] == {
        "from": "pairs",
        "pairs": 50,
        "desirable": 50,
        "undesirable": 50,
        "rows": 100,
        "shuffle_seed": 0,
    }
    assert set(data.train[0]) == {"prompt", "completion", "label"}  # no margin column
    by_reply = {(r["prompt"], r["completion"]): r["label"] for r in data.train}
    assert all(by_reply[(f"p{i}", f"good{i}")] is True for i in range(50))
    assert all(by_reply[(f"p{i}", f"bad{i}")] is False for i in range(50))
    # Shuffled, seeded: TRL reads KTO rows in order, so the first batch must not be all one
    # label (unpair_preference_dataset emits every chosen reply first).
    assert {r["label"] for r in data.train[:8]} == {True, False}
    assert _unpaired_rows(pair_set, seed=0).train == data.train
    assert data.heldout_pairs == [train[0]]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.per_device_batch_size=1", "stage.per_device_batch_size=1: loss_type=kto"),
        ("stage.loss_type=sigmoid", "stage.loss_type='sigmoid' is not one of"),
        ("stage.beta=0", "stage.beta"),
    ],
)
def test_kto_knobs_are_checked_at_compose_time(compose_cfg, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg("stage=kto", override))


def test_kto_defaults_live_in_the_schema(compose_cfg) -> None:
    cfg = validate_config(compose_cfg("stage=kto", fast=False))
    assert cfg.stage.parent == "sft" and cfg.stage.loss_type == "kto"
    assert cfg.stage.per_device_batch_size >= 2


def test_kto_beta_sweep_jobs_validate(compose_cfg) -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        sweep = compose("config", overrides=["+sweep=kto_beta"], return_hydra_config=True)
    assert sweep.stage.name == "kto" and sweep.tracking.group == "toy-kto_beta"
    values = sweep.hydra.sweeper.params["stage.beta"].split(",")
    assert len(values) >= 3
    for value in values:
        job = validate_config(compose_cfg("+sweep=kto_beta", f"stage.beta={value}", fast=False))
        assert job.stage.beta == float(value) and job.stage.name == "kto"


def test_kto_runs_are_compared_and_on_the_frontier(tmp_path) -> None:
    root = tmp_path / "runs"

    def write(rel: str, stage: str, metrics: dict, group: str | None = "toy-frontier") -> None:
        run_dir = root / rel
        run_dir.mkdir(parents=True)
        parent = None if stage == "sft" else {"stage": "sft", "run_dir": "runs/toy/sft"}
        manifest = {
            "stage": stage,
            "experiment": "toy",
            "parent": parent,
            "kind": "full",
            "config": {"stage": {"name": stage, "beta": 0.1}, "tracking": {"group": group}},
            "metrics": metrics,
        }
        (run_dir / MANIFEST).write_text(json.dumps(manifest))
        (run_dir / DONE).write_text("ok\n")

    write("toy/sft", "sft", {REWARD_KEY: 0.4}, group=None)
    write("toy/kto/stage.beta=0.1", "kto", {REWARD_KEY: 0.8, KL_KEY: 2.0})
    write("toy/dpo/stage.beta=0.1", "dpo", {REWARD_KEY: 0.9, KL_KEY: 3.0})
    points, missing = frontier_points(find_runs([root / "toy"]))
    assert sorted((p.method, p.kl, p.reward) for p in points) == [
        ("DPO", 3.0, 0.9),
        ("KTO", 2.0, 0.8),
    ]
    assert not missing
    # `make frontier` plots this group's KTO runs next to the SFT reference ...
    chosen = frontier.select(find_runs([root / "toy"]), "toy")
    assert {r.label for r in chosen} == {"sft", "kto/stage.beta=0.1", "dpo/stage.beta=0.1"}
    png, md, table = frontier.write_frontier(root, "toy", tmp_path / "out")
    assert "DPO and KTO trade them off through beta" in md.read_text()
    assert "| KTO" in table and png.is_file()
    # ... and runs the KTO beta sweep by default.
    cmds = [c[1:] for c in frontier.commands("toy", frontier.METHODS)]
    assert ["-m", "stages", "-m", "+sweep=kto_beta", "experiment=toy",
            "tracking.group=toy-frontier"] in cmds  # fmt: skip
    # `make compare` lists it with its metrics.
    report = compare([root / "toy"], tmp_path / "cmp")
    assert "kto/stage.beta=0.1" in report.markdown


def test_the_plan_reads_a_labelled_file_and_names_missing_parents(compose_cfg, tmp_path) -> None:
    path = _write_jsonl(tmp_path / "labelled.jsonl", _labelled_rows(3))
    cfg = compose_cfg("stage=kto", "data.pairs.source=file", f"data.pairs.path={path}")
    plan = build_plan(cfg)
    assert f"data:       data.pairs.path={path} (format labelled)" in plan.lines
    assert plan.missing_parents == ["sft"]
    # Before a real run: the labelled file passes the format check, the missing SFT does not.
    with pytest.raises(HandoffError, match="make sft"):
        check_startable(cfg, [])
    # RM-judged on-policy pairs need the RM too.
    judged = build_plan(compose_cfg("stage=kto", "data.pairs.judge=reward_model"))
    assert judged.missing_parents == ["sft", "rm"]
