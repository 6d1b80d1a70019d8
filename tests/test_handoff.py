"""Stage handoff: resolver errors name the make target; DONE is the commit point."""

from __future__ import annotations

import json

import pytest

from stages.core import handoff
from stages.core.handoff import HandoffError, last_complete_checkpoint
from stages.core.lifecycle import StageRun
from stages.sft import recipe as sft


def test_missing_parent_names_the_make_target(compose_cfg, tmp_path) -> None:
    with pytest.raises(HandoffError) as err:
        StageRun.begin(compose_cfg("stage=dpo"), "dpo")
    message = str(err.value)
    assert "make sft EXP=toy" in message and "does not exist" in message
    assert not (tmp_path / "runs").exists(), "a failed start leaves no run dir behind"


def test_incomplete_parent_says_to_resume(compose_cfg, tmp_path) -> None:
    (tmp_path / "runs" / "toy" / "sft" / "checkpoint-6").mkdir(parents=True)
    with pytest.raises(HandoffError, match=r"incomplete .*Run `make sft EXP=toy` again"):
        StageRun.begin(compose_cfg("stage=dpo"), "dpo")


def test_finished_parent_resolves_through_its_manifest(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    run = StageRun.begin(compose_cfg("stage=dpo"), "dpo")
    assert run.parent is not None and run.parent.stage == "sft"
    manifest_path = tmp_path / "runs" / "toy" / "sft" / "manifest.json"
    assert run.parent.manifest_sha256 == handoff.file_sha256(manifest_path)
    assert run.parent.kind == "full"


def test_base_model_mismatch_fails_before_weights_load(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    parent = StageRun.begin(compose_cfg("stage=dpo"), "dpo").parent
    assert parent is not None
    with pytest.raises(HandoffError, match=r"base-model mismatch.*Qwen/Qwen2.5-0.5B-Instruct"):
        handoff.check_same_base(parent, "Qwen/Qwen2.5-0.5B-Instruct", child="dpo")


def test_done_is_refused_without_final(tmp_path) -> None:
    with pytest.raises(HandoffError, match="refusing to mark"):
        handoff.finalize_stage(tmp_path, {"stage": "sft"}, {"x": 1})
    assert not (tmp_path / handoff.DONE).exists()


def test_unreadable_parent_manifest_is_a_clear_error(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    (tmp_path / "runs" / "toy" / "sft" / "manifest.json").write_text("{not json")
    with pytest.raises(HandoffError, match=r"unreadable.*force=true"):
        StageRun.begin(compose_cfg("stage=dpo"), "dpo")


def test_last_complete_checkpoint_skips_partial_ones(tmp_path) -> None:
    for step, complete in ((5, True), (10, True), (15, False)):
        ckpt = tmp_path / f"checkpoint-{step}"
        ckpt.mkdir()
        (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        if complete:  # the marker is written last, once everything else is on disk
            handoff.mark_checkpoint_complete(ckpt)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-10"
    # A marker whose files were truncated afterwards (a full disk) no longer counts.
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text("")
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-5"


def test_done_records_the_manifest_hash_and_final_hashes(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg())
    run_dir = tmp_path / "runs" / "toy" / "sft"
    manifest = json.loads((run_dir / handoff.MANIFEST).read_text())
    done = json.loads((run_dir / handoff.DONE).read_text())
    assert done["manifest_sha256"] == handoff.file_sha256(run_dir / handoff.MANIFEST)
    assert manifest["final_sha256"] == handoff.final_file_hashes(run_dir / handoff.FINAL)
    assert "model.safetensors" in manifest["final_sha256"]
    assert manifest["fingerprint"]["config_sha256"] == handoff.config_sha256(
        handoff.defining_config(manifest["config"])
    )
    assert "stage.logging_steps" in manifest["fingerprint"]["non_defining_keys"]
    # Checkpoints are marked complete by the trainer callback, after trainer_state.json.
    assert handoff.is_complete_checkpoint(run_dir / "checkpoint-12")
    assert not (run_dir / handoff.LOCK).exists(), "the lock is released at the end"
