"""Integrity faults injected into real runs, and what each now does.

Stale DONE stages (changed config, retrained parent), tampered parents (edited manifest,
swapped weights), resume with another config, a half-written checkpoint, a failure after
training, a held or stale lock; and a resumed run's metrics.json equal to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data_recipes.rows import DataFormatError
from stages.core import handoff
from stages.core.handoff import (
    DONE,
    FINAL_RECORD,
    LOCK,
    MANIFEST,
    METRICS,
    ParentIntegrityError,
    ResumeMismatchError,
    RunLockedError,
    StaleStageError,
)
from stages.core.lifecycle import StageRun
from stages.dpo import recipe as dpo
from stages.eval import recipe as eval_stage
from stages.sft import recipe as sft
from tests.conftest import CONF_DIR, FAST, copy_run, saved_tensors

DPO_FAST = [
    "stage=dpo",
    "data.pairs.num_prompts=32",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.25",
    "stage.max_steps=4",
    "stage.save_steps=2",
]
# Keys that measure wall time: they differ between any two runs, interrupted or not.
TIMING = ("train/runtime_s",)


def _simulate_crash_before_done(run_dir: Path) -> None:
    """What a kill after the last checkpoint leaves: checkpoints, no final/ and no DONE."""
    for name in (DONE, MANIFEST, METRICS, FINAL_RECORD):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "final")


@pytest.fixture(scope="module")
def finished_dpo(tmp_path_factory, sft_runs, builtin_models_dir) -> Path:
    """runs/ with a finished SFT and a finished short DPO on it (trained once per module)."""
    root = tmp_path_factory.mktemp("finished_dpo")
    copy_run(sft_runs("none"), root, "sft")
    overrides = [
        f"paths.runs_root={root}",
        f"paths.builtin_models={builtin_models_dir}",
        *FAST,
        *DPO_FAST,
    ]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        dpo.run(compose(config_name="config", overrides=overrides))
    return root


def _runs_with_dpo(finished_dpo: Path, tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(finished_dpo, runs)
    return runs / "toy"


# ----------------------------------------------------------------------------- stale


def test_changed_config_is_stale_naming_the_key(compose_cfg, finished_dpo, tmp_path) -> None:
    runs = _runs_with_dpo(finished_dpo, tmp_path)
    weights = runs / "dpo" / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    # The same command is still a no-op, also with other logging/tracking settings.
    first = json.loads((runs / "dpo" / METRICS).read_text())
    assert dpo.run(compose_cfg(*DPO_FAST, "stage.logging_steps=1", "tracking=wandb")) == first

    with pytest.raises(StaleStageError) as err:
        dpo.run(compose_cfg(*DPO_FAST, "stage.beta=0.5"))
    message = str(err.value)
    assert "stage.beta: 0.1 -> 0.5" in message
    assert 'make dpo EXP=toy ARGS="force=true"' in message and "rerun_stale=true" in message
    assert weights.stat().st_mtime_ns == stamp and (runs / "dpo" / DONE).is_file()
    assert not (runs / "dpo" / LOCK).exists()


def test_retrained_parent_makes_the_child_stale(compose_cfg, finished_dpo, tmp_path) -> None:
    runs = _runs_with_dpo(finished_dpo, tmp_path)
    sft.run(compose_cfg("force=true"))  # SFT retrained: a new manifest, a new sha
    new_sft_sha = handoff.file_sha256(runs / "sft" / MANIFEST)

    with pytest.raises(StaleStageError, match=r"parent 'sft' .* was re-run"):
        dpo.run(compose_cfg(*DPO_FAST))
    # stage=eval refuses to compare DPO with an SFT it was not trained from.
    with pytest.raises(StaleStageError, match=r"re-run after it was trained from it"):
        eval_stage.run(compose_cfg("stage=eval", "stage.num_kl_samples=4"))
    assert not (runs / "eval" / DONE).exists()

    # rerun_stale=true retrains what is stale, from the new parent.
    dpo.run(compose_cfg(*DPO_FAST, "rerun_stale=true"))
    manifest = json.loads((runs / "dpo" / MANIFEST).read_text())
    assert manifest["parent"]["manifest_sha256"] == new_sft_sha
    assert dpo.run(compose_cfg(*DPO_FAST)) == json.loads((runs / "dpo" / METRICS).read_text())


# ----------------------------------------------------------------------------- tampered parent


def test_edited_parent_manifest_is_refused(compose_cfg, finished_dpo, tmp_path) -> None:
    runs = _runs_with_dpo(finished_dpo, tmp_path)
    manifest = runs / "sft" / MANIFEST
    text = manifest.read_text()
    manifest.write_text(text.replace('"seed": 42', '"seed": 43', 1))  # one byte, valid JSON
    json.loads(manifest.read_text())
    with pytest.raises(ParentIntegrityError) as err:
        dpo.run(compose_cfg(*DPO_FAST, "force=true"))
    message = str(err.value)
    assert str(manifest) in message and "modified" in message
    assert 'make sft EXP=toy ARGS="force=true"' in message
    assert (runs / "dpo" / "final").is_dir(), "refused before the force=true reset"


def test_swapped_parent_weights_are_refused(compose_cfg, finished_dpo, tmp_path) -> None:
    runs = _runs_with_dpo(finished_dpo, tmp_path)
    weights = runs / "sft" / "final" / "model.safetensors"
    # Another run's weights: the DPO model (same architecture, loads fine).
    shutil.copyfile(runs / "dpo" / "final" / "model.safetensors", weights)
    shutil.rmtree(runs / "dpo")
    with pytest.raises(ParentIntegrityError) as err:
        dpo.run(compose_cfg(*DPO_FAST))
    message = str(err.value)
    assert str(weights) in message and 'make sft EXP=toy ARGS="force=true"' in message
    assert not (runs / "dpo").exists(), "nothing created, no weights loaded"


def test_pairs_file_is_validated_before_weights_load(
    compose_cfg, sft_runs, tmp_path, monkeypatch
) -> None:
    copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"prompt": "hi", "chosen": "a", "rejected": "b"}\n{"oops": 1}\n')

    def no_weights(*args, **kwargs):
        raise AssertionError("weights loaded before the data file was validated")

    monkeypatch.setattr(dpo, "frozen_policy", no_weights)
    monkeypatch.setattr(dpo, "trainable_model", no_weights)
    with pytest.raises(DataFormatError, match=rf"{bad.name}.*2"):
        dpo.run(compose_cfg(*DPO_FAST, "data.pairs.source=file", f"data.pairs.path={bad}"))


# ----------------------------------------------------------------------------- resume


def test_resume_with_changed_max_steps_is_refused(compose_cfg, sft_runs, tmp_path) -> None:
    run_dir = copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    _simulate_crash_before_done(run_dir)
    with pytest.raises(ResumeMismatchError) as err:
        sft.run(compose_cfg("stage.max_steps=100"))
    message = str(err.value)
    assert "stage.max_steps: 12 -> 100" in message
    assert 'make sft EXP=toy ARGS="force=true"' in message
    assert (run_dir / "checkpoint-12").is_dir() and not (run_dir / DONE).exists()


def test_truncated_trainer_state_resumes_from_the_previous_checkpoint(
    compose_cfg, sft_runs, tmp_path, caplog
) -> None:
    """A 0-byte trainer_state.json in the newest checkpoint (disk full while saving): the
    rerun skips it, says so, resumes from checkpoint-6 and ends exactly where an uninterrupted
    run ends: same weights, same metrics.json."""
    uninterrupted = sft_runs("none")
    run_dir = copy_run(uninterrupted, tmp_path / "runs", "sft")
    _simulate_crash_before_done(run_dir)
    (run_dir / "checkpoint-12" / "trainer_state.json").write_bytes(b"")

    with caplog.at_level(logging.WARNING, logger="stages.core.lifecycle"):
        sft.run(compose_cfg())
    assert any(
        "checkpoint-12 is incomplete" in r.getMessage() and "checkpoint-6" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["resumed_from"].endswith("checkpoint-6")

    expected, resumed = saved_tensors(uninterrupted / "final"), saved_tensors(run_dir / "final")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    before = json.loads((uninterrupted / METRICS).read_text())
    after = json.loads((run_dir / METRICS).read_text())
    for key in TIMING:
        before.pop(key), after.pop(key)
    assert after == before  # train/loss from the whole log history, not the resumed part


def test_checkpoint_counts_only_with_its_marker(tmp_path) -> None:
    for step in (5, 10, 15, 20):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        (ckpt / "model.safetensors").write_bytes(b"x" * 64)
        if step != 15:  # 15: killed before the marker
            handoff.mark_checkpoint_complete(ckpt)
    (tmp_path / "checkpoint-20" / "model.safetensors").write_bytes(b"x" * 10)  # truncated later
    assert handoff.last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    assert handoff.incomplete_checkpoints(tmp_path) == [
        tmp_path / "checkpoint-15",
        tmp_path / "checkpoint-20",
    ]


# ----------------------------------------------------------------------------- final/ first


def test_failure_in_the_comparison_keeps_final_and_the_rerun_only_evaluates(
    compose_cfg, sft_runs, tmp_path, monkeypatch
) -> None:
    copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    run_dir = tmp_path / "runs" / "toy" / "dpo"
    real_compare = dpo.compare_and_report

    def broken_compare(*args, **kwargs):
        raise IndexError("index out of range in self")  # the context-length crash

    monkeypatch.setattr(dpo, "compare_and_report", broken_compare)
    with pytest.raises(IndexError):
        dpo.run(compose_cfg(*DPO_FAST))
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / FINAL_RECORD).is_file() and not (run_dir / DONE).exists()
    saved = saved_tensors(run_dir / "final")

    class NoTraining:
        def __init__(self, *args, **kwargs) -> None:
            raise AssertionError("the rerun trained again instead of loading final/")

    monkeypatch.setattr(dpo, "compare_and_report", real_compare)
    monkeypatch.setattr(dpo, "DPOTrainer", NoTraining)
    metrics = dpo.run(compose_cfg(*DPO_FAST))
    assert (run_dir / DONE).is_file()
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["final_reused"] is True
    assert "compare/policy_accuracy" in metrics and metrics["train/steps"] == 4
    reloaded = saved_tensors(run_dir / "final")
    assert all(torch.equal(saved[k], reloaded[k]) for k in saved)
    # The child check passes on the result: the manifest's final/ hashes match the files.
    handoff.resolve_parent(tmp_path / "runs", "toy", "dpo", child="eval")


# ----------------------------------------------------------------------------- lock


def test_second_run_is_refused_while_the_lock_is_held(compose_cfg, tmp_path) -> None:
    run_dir = tmp_path / "runs" / "toy" / "sft"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from stages.core import handoff; "
            "handoff.acquire_run_lock(Path(sys.argv[1])); print('locked', flush=True); "
            "time.sleep(120)",
            str(run_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError) as err:
            sft.run(compose_cfg())
        message = str(err.value)
        assert f"process {holder.pid} on {socket.gethostname()}" in message
        assert not (run_dir / "checkpoint-6").exists(), "refused at start"
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(compose_cfg, tmp_path, caplog) -> None:
    run_dir = tmp_path / "runs" / "toy" / "sft"
    run_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / LOCK).write_text(
        json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"})
    )
    with caplog.at_level(logging.WARNING, logger="stages.core.handoff"):
        run = StageRun.begin(compose_cfg(), "sft")
    assert any("stale lock" in r.getMessage() and str(dead.pid) in r.getMessage()
               for r in caplog.records), caplog.text  # fmt: skip
    assert json.loads((run_dir / LOCK).read_text())["pid"] != dead.pid
    run.release()
    assert not (run_dir / LOCK).exists()


def test_only_rank_zero_takes_the_lock(compose_cfg, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("RANK", "1")
    StageRun.begin(compose_cfg(), "sft")
    assert not (tmp_path / "runs" / "toy" / "sft" / LOCK).exists()


# ----------------------------------------------------------------------------- fingerprints


def test_fingerprint_leaves_out_where_and_how_it_is_tracked(compose_cfg) -> None:
    from omegaconf import OmegaConf

    def sha(*overrides: str) -> str:
        resolved = OmegaConf.to_container(compose_cfg(*overrides), resolve=True)
        return handoff.config_sha256(handoff.defining_config(resolved))

    base = sha()
    assert (
        sha("tracking=wandb", "stage.logging_steps=1", "stage.save_steps=3", "force=true") == base
    )
    assert sha("paths.runs_root=/elsewhere", "rerun_stale=true") == base
    assert sha("stage.learning_rate=0.01") != base
    assert sha("seed=7") != base


def test_ppo_checkpoint_marker_and_log_history_survive_a_resume(tmp_path) -> None:
    """Our PPO trainer: a truncated newest checkpoint is skipped; the log history (what the
    stage's first/last trends come from) is restored with the checkpoint."""
    from stages.ppo.trainer import PPOTrainer
    from tests.test_ppo_trainer import EOS, PAD, full_weight_roles, hyperparams, prompts

    def make(output_dir: Path) -> PPOTrainer:
        return PPOTrainer(
            hyperparams(total_updates=3, save_steps=1, save_total_limit=None),
            full_weight_roles(), prompts(), pad_token_id=PAD, eos_token_id=EOS,
            output_dir=output_dir,
        )  # fmt: skip

    def comparable(history: list[dict]) -> list[dict]:
        return [{k: v for k, v in h.items() if not k.startswith("perf/")} for h in history]

    uninterrupted = make(tmp_path / "whole")
    uninterrupted.train()
    crashed = tmp_path / "crashed"
    shutil.copytree(tmp_path / "whole", crashed)
    shutil.rmtree(crashed / "checkpoint-3")
    (crashed / "checkpoint-2" / "trainer_state.json").write_bytes(b"")  # died mid-save

    resumed = make(crashed)
    assert resumed.latest_checkpoint() == crashed / "checkpoint-1"
    resumed.load_checkpoint(crashed / "checkpoint-1")
    assert len(resumed.log_history) == 1
    resumed.train()
    assert comparable(resumed.log_history) == comparable(uninterrupted.log_history)
    assert handoff.is_complete_checkpoint(crashed / "checkpoint-3")
