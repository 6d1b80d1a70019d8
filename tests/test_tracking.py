"""W&B tracking: one offline run per stage, read back from its .wandb file."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

from stages.core.schema import TrackingConfig
from stages.core.tracking import StageTracker, wandb_mode
from stages.sft import recipe as sft
from tests.conftest import FAST, REPO
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


# --------------------------------------------------------- first run without a W&B login


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A machine where nobody ran `wandb login`: empty HOME, no WANDB_* variables, and a
    fresh W&B process state before and after (its settings are read once per process)."""
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith("WANDB_") or key == "NETRC":
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(home))
    wandb.teardown()
    yield home
    wandb.teardown()


def test_without_credentials_tracking_goes_offline_and_says_how_to_sync(
    no_wandb_login, tmp_path, caplog
):
    run_dir = tmp_path / "runs" / "toy" / "sft"
    tracker = StageTracker(
        TrackingConfig(), experiment="toy", stage="sft", run_dir=run_dir, config={"seed": 1}
    )
    with caplog.at_level(logging.INFO, logger="stages.core.tracking"), tracker:
        tracker.log({"train/loss": 1.0}, step=1)
        sync_dir = Path(tracker.run.settings.sync_dir)
    assert offline_runs(run_dir) == [sync_dir] and sync_dir.is_dir()
    ours = [r.getMessage() for r in caplog.records if r.name == "stages.core.tracking"]
    lines = [line for line in ours if "offline" in line]
    assert len(lines) == 1, lines
    assert "no W&B credentials found" in lines[0]
    assert f"`wandb sync {sync_dir}`" in lines[0] and "`wandb login`" in lines[0]


def test_credentials_or_an_explicit_mode_still_win(no_wandb_login, monkeypatch):
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    assert wandb_mode(None)[0] == "offline"
    assert wandb_mode("online") == ("online", None)  # tracking.mode
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(None) == (None, None)  # wandb.init honours WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == (None, None)  # online, with that key
    monkeypatch.delenv("WANDB_API_KEY")
    # A `wandb login` on this machine: its .netrc entry for W&B's host, found without network.
    host = wbauth.HostUrl(wandb_setup.singleton().settings.base_url)
    netrc = no_wandb_login / ".netrc"
    netrc.write_text(f"machine {urlparse(host.url).netloc}\n  login user\n  password {'n' * 40}\n")
    netrc.chmod(0o600)
    assert wandb_mode(None) == (None, None)


def test_first_cli_run_without_wandb_login_finishes_offline_with_a_quiet_console(
    tmp_path, builtin_models_dir
):
    """`python -m stages stage=sft` as a newcomer runs it: no W&B login, no WANDB_*,
    non-interactive. It must finish, say where the offline run is, and print one readable
    line per logging step: no raw trainer dicts, no warnings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env["HOME"] = str(tmp_path / "home")
    runs = tmp_path / "runs"
    done = subprocess.run(
        [
            sys.executable, "-m", "stages", "stage=sft",
            f"paths.runs_root={runs}", f"paths.builtin_models={builtin_models_dir}",
            *FAST, "tracking=wandb",
        ],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    run_dir = runs / "toy" / "sft"
    assert (run_dir / "DONE").is_file()
    [offline_run] = offline_runs(run_dir)
    assert f"`wandb sync {offline_run}`" in console, console[-3000:]
    assert "{'loss'" not in console and "'learning_rate'" not in console
    noisy = [ln for ln in console.splitlines() if "warning" in ln.lower()]
    assert not noisy, noisy
    step_lines = re.findall(r"^sft step (\d+)/12 \| loss [\d.]+ \| lr ", console, re.M)
    assert step_lines == ["2", "4", "6", "8", "10", "12"], console[-3000:]
