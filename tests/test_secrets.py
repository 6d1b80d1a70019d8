"""Secrets stay out of everything a run writes: plant fake W&B / HF tokens in the
environment, run a short SFT stage with W&B tracking (offline), grep every file written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST, REPO

SECRETS = {
    "WANDB_API_KEY": "h6fakewandbkey" + "0123456789abcdef0123456789",  # 40 chars, like W&B's
    "HF_TOKEN": "hf_h6FakeHubTokenForTheLeakTest0123",
    "HUGGING_FACE_HUB_TOKEN": "hf_h6FakeLegacyHubToken987654321",
}


def test_planted_secrets_appear_in_no_file_a_run_writes(tmp_path: Path, builtin_models_dir) -> None:
    home, runs = tmp_path / "home", tmp_path / "runs"
    scratch = tmp_path / "tmp"
    for folder in (home, scratch):
        folder.mkdir()
    # Every place W&B, HF and Python may write (caches, configs, temp files) is under tmp_path.
    env = {
        **os.environ,
        **SECRETS,
        "HOME": str(home),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "WANDB_DIR": str(runs),
        "WANDB_CACHE_DIR": str(home / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(home / "wandb-config"),
        "WANDB_DATA_DIR": str(home / "wandb-data"),
        "TMPDIR": str(scratch),
        "WANDB_MODE": "offline",
        "OMP_NUM_THREADS": "1",
    }
    overrides = [o for o in FAST if not o.startswith("tracking=")]
    proc = subprocess.run(
        [sys.executable, "-m", "stages", "stage=sft", "tracking=wandb", *overrides,
         f"paths.runs_root={runs}", f"paths.builtin_models={builtin_models_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = runs / "toy" / "sft"
    assert (run_dir / "DONE").is_file()
    wandb_files = list(run_dir.rglob("*.wandb"))
    assert wandb_files, "no W&B offline run was written: the test would check nothing"

    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) > 10
    leaks = [
        f"{path.relative_to(tmp_path)}: {name}"
        for path in written
        for name, secret in SECRETS.items()
        if secret.encode() in path.read_bytes()
    ]
    assert not leaks, leaks
    for name, secret in SECRETS.items():
        assert secret not in proc.stdout + proc.stderr, f"{name} printed to the console"
