"""W&B tracking: one offline run per stage, read back from its .wandb file."""

from __future__ import annotations

from stages import sft
from tests.wandb_readback import offline_runs, read_offline_run


def test_sft_writes_one_offline_wandb_run_we_can_read_back(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    metrics = sft.run(compose_cfg("tracking=wandb", "experiment_name=wbexp"))
    run_dir = tmp_path / "runs" / "wbexp" / "sft"

    paths = offline_runs(run_dir)
    assert len(paths) == 1, paths
    run = read_offline_run(paths[0])

    assert run.group == "wbexp" and run.job_type == "sft"
    assert run.state == "finished"  # finished at stage end
    ours = run.config["alignpipe"]  # our config nested under its own key
    assert ours["stage"]["name"] == "sft" and ours["experiment_name"] == "wbexp"
    assert "learning_rate" in run.config  # HF's TrainingArguments at the top level
    losses = run.series("train/loss")
    assert len(losses) >= 3 and losses[-1] < losses[0]
    assert run.summary["eval/accuracy"] == metrics["eval/accuracy"]


def test_tracking_none_writes_no_wandb_files(compose_cfg, tmp_path):
    sft.run(compose_cfg("tracking=none"))
    assert offline_runs(tmp_path) == []
