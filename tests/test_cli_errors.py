"""User errors through the real CLI: one block on stderr, exit status 2, no traceback, no run
dir; HYDRA_FULL_ERROR=1 still shows the traceback. Dry runs, hints that run, and disk-full /
read-only failures named with their path."""

from __future__ import annotations

import errno
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stages.core.handoff import make_target
from stages.core.schema import validate_config
from tests.conftest import CONF_DIR, FIXTURES, REPO, copy_run
from tests.readme_commands import invocations

CLI = [sys.executable, "-m", "stages"]


def alignpipe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [*CLI, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, "WANDB_MODE": "offline", **(env or {})},
        check=False,
    )


@pytest.fixture
def runs(tmp_path: Path) -> list[str]:
    """Overrides that keep every run under tmp_path (which must stay empty on failures)."""
    return [f"paths.runs_root={tmp_path / 'runs'}", f"paths.builtin_models={tmp_path / 'b'}"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["stage=dpo", "stage.bta=0.1"], ["Key 'bta' not in 'DPOStageConfig'", "stage.beta?"]),
        (["stage=dpo", "stage.beta=abc"], ["stage.beta=abc", "could not be converted to Float"]),
        (["experiment=nope"], ["Could not find 'experiment/nope'", "toy_qlora"]),
        (["model.name_or_path=???"], ["model.name_or_path is missing"]),
        (
            [
                "stage.gradient_accumulation_steps=0",
                "data.toy.num_train=0",
                "stage.warmup_ratio=2.5",
            ],
            [
                "3 config problem(s)",
                "stage.gradient_accumulation_steps=0 must be >= 1",
                "stage.warmup_ratio=2.5 must be in [0, 1]",
                "data.toy.num_train=0 must be >= 1",
            ],
        ),
        (
            ["stage=dpo", "data=file", "data.pairs.path=nope.jsonl"],
            [f"data.pairs.path='nope.jsonl': no such file ({REPO / 'nope.jsonl'})"],
        ),
        (
            ["stage=sft", "data=file", f"data.sft.path={FIXTURES / 'sft_bad_row.jsonl'}"],
            ["sft_bad_row.jsonl", "row"],
        ),
        (
            [
                "stage=sft",
                "data=file",
                f"data.sft.path={FIXTURES / 'sft_sharegpt.jsonl'}",
                "data.sft.format=shargpt",
            ],
            ["unknown data format 'shargpt'", "sharegpt: "],
        ),
        (["stage=dpo"], ["needs the 'sft' stage of experiment 'toy'", "Run `make sft EXP=toy"]),
        # A multirun: every value of a command-line sweep is checked before the first job.
        (["-m", "stage=dpo", "stage.beta=0.1,-2"], ["stage.beta=-2.0 must be > 0"]),
        (["-m", "stage=dpo", "stage.bta=0.1,0.2"], ["did you mean stage.beta?"]),
    ],
)
def test_user_errors_are_one_block_with_exit_status_2(tmp_path, runs, args, expected) -> None:
    result = alignpipe(*runs, *args, "tracking=none")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("alignpipe: "), result.stderr
    assert "What to do: " in result.stderr
    for text in expected:
        assert text in result.stderr
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "runs").exists()  # a failed start leaves no run dir


def test_hydra_full_error_still_shows_the_traceback(runs) -> None:
    result = alignpipe(*runs, "stage=dpo", "stage.beta=-1", env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode == 1
    assert (
        "Traceback" in result.stderr and "ConfigError: stage.beta=-1.0 must be > 0" in result.stderr
    )


def test_config_errors_come_before_heavy_imports(runs) -> None:
    code = (
        "import sys\n"
        f"sys.argv = ['alignpipe', *{runs!r}, 'stage.warmup_ratio=2.5']\n"
        "from stages.__main__ import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n"
        "    print(e.code, sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.stdout.strip() == "2 []", result.stdout + result.stderr
    assert "stage.warmup_ratio=2.5 must be in [0, 1]" in result.stderr


# ----------------------------------------------------------------------------- dry runs


def test_dry_run_of_the_readme_sft_file_command(tmp_path, runs) -> None:
    path = FIXTURES / "sft_sharegpt.jsonl"
    result = alignpipe(*runs, "stage=sft", "data=file", f"data.sft.path={path}", "dry_run=true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"run dir:    {tmp_path / 'runs' / 'toy' / 'sft'} (fresh)" in result.stdout
    assert f"data.sft.path={path} (format sharegpt" in result.stdout
    assert "base model: builtin:tiny" in result.stdout and "peft:       none" in result.stdout
    assert not (tmp_path / "runs").exists()  # nothing written, not even the run dir


def test_dry_run_of_the_readme_dpo_file_command(tmp_path, runs, sft_runs) -> None:
    path = FIXTURES / "pref_hh_rlhf.jsonl"
    args = [*runs, "stage=dpo", "data=file", f"data.pairs.path={path}", "dry_run=true"]
    blocked = alignpipe(*args)
    assert blocked.returncode == 2  # no SFT parent yet: the plan says what to run first
    assert "parent:     sft: NOT READY" in blocked.stdout
    assert f"data.pairs.path={path} (format hh_rlhf" in blocked.stdout
    assert not (tmp_path / "runs").exists()

    sft = copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    ready = alignpipe(*args)
    assert ready.returncode == 0, ready.stdout + ready.stderr
    sha = re.search(r"parent:     sft (\S+) \(manifest sha256 (\w+)", ready.stdout)
    assert sha and sha.group(1) == str(sft)
    assert "(fresh)" in ready.stdout and "Ready:" in ready.stdout
    assert sorted(p.name for p in (tmp_path / "runs" / "toy").iterdir()) == ["sft"]


def test_dry_run_reports_resume_and_done(tmp_path, runs, sft_runs) -> None:
    sft = copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    done = alignpipe(*runs, "stage=sft", "dry_run=true")
    assert "(already DONE: a no-op)" in done.stdout and done.returncode == 0
    (sft / "DONE").unlink()
    checkpoints = sorted((p.name for p in sft.glob("checkpoint-*")), key=lambda n: int(n[11:]))
    resume = alignpipe(*runs, "stage=sft", "dry_run=true")
    assert f"(resume from {checkpoints[-1]})" in resume.stdout, resume.stdout + resume.stderr


# -------------------------------------------------------------------- hints that run


def test_missing_parent_hint_runs_the_parent_this_command_needs(tmp_path, runs) -> None:
    """experiment_name is not a bundle: `make sft EXP=mine` would fail; the hint keeps the
    user's choices, and the command it prints composes to the run dir DPO looks for."""
    result = alignpipe(
        *runs, "stage=dpo", "peft=qlora", "experiment_name=mine", "stage.beta=0.2", "dry_run=true"
    )
    assert result.returncode == 2
    hint = re.search(r"Run `(make [^`]+)` first", result.stdout)
    assert hint, result.stdout
    assert "EXP=mine" not in hint.group(1) and "stage.beta" not in hint.group(1)
    (job,) = invocations(hint.group(1))  # through the real Makefile
    cfg = _compose(job.overrides)
    typed = validate_config(cfg)
    assert (typed.stage.name, typed.experiment_name, typed.peft.checkpoint_kind()) == (
        "sft",
        "mine",
        "qlora",
    )
    assert Path(typed.paths.runs_root) == tmp_path / "runs"


def test_rerun_hint_of_the_same_stage_keeps_its_knobs_and_merges_args() -> None:
    hint = make_target(
        "dpo", "toy", "force=true", overrides=["stage=dpo", "stage.beta=0.05", "experiment=toy"]
    )
    assert hint == 'make dpo EXP=toy ARGS="stage.beta=0.05 force=true"'
    (job,) = invocations(hint)
    typed = validate_config(_compose(job.overrides))
    assert typed.stage.beta == 0.05 and typed.force is True
    # An SFT parent of a DPO on a pairs file trains on the toy task unless told otherwise.
    parent = make_target(
        "sft", "toy", overrides=["stage=dpo", "data=file", "data.pairs.path=x.jsonl"]
    )
    assert parent == "make sft EXP=toy"


def _compose(overrides: list[str]):
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


# ------------------------------------------------------------ disk full, read-only runs/


def _torch_save_on_a_full_disk() -> None:
    """The real error torch.save raises when the disk fills up under its zip writer."""
    import torch

    class FillsUp(io.RawIOBase):
        written = 0

        def writable(self) -> bool:
            return True

        def write(self, data) -> int:
            self.written += len(data)
            if self.written > 1000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return len(data)

    torch.save({"w": torch.zeros(10_000)}, FillsUp())


def _safetensors_save_on_a_full_disk() -> None:
    """safetensors' Rust writer is not a Python file object: its error is a SafetensorError
    carrying the OS message (as seen by bench/soak.py --disk-full during save_pretrained)."""
    from safetensors import SafetensorError

    raise SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"
    )


@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (
            OSError(
                errno.ENOSPC, os.strerror(errno.ENOSPC), "RUNS/toy/sft/final/model.safetensors"
            ),
            ["alignpipe: disk full", "while writing RUNS/toy/sft/final/model.safetensors"],
        ),
        (
            OSError(errno.EROFS, os.strerror(errno.EROFS), "RUNS/toy/sft"),
            ["alignpipe: cannot write the run dir", "read-only filesystem while writing RUNS"],
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "RUNS/toy"),
            ["permission denied while writing RUNS/toy", "paths.runs_root=<dir>"],
        ),
        (
            _torch_save_on_a_full_disk,
            ["alignpipe: disk full (a checkpoint write failed)", "unexpected pos", "RUNS/toy/sft"],
        ),
        (
            _safetensors_save_on_a_full_disk,
            ["alignpipe: disk full (a checkpoint write failed)", "os error 28", "RUNS/toy/sft"],
        ),
    ],
)
def test_environment_failures_name_the_path(
    tmp_path, runs, monkeypatch, capsys, failure, expected
) -> None:
    """Tests run as root (chmod cannot make runs/ unwritable): the stage raises the real
    OSError / torch error in-process, through the real entry point."""
    import stages.__main__ as entry
    import stages.runner

    runs_root = tmp_path / "runs"

    def failing_run(cfg):
        if callable(failure):
            failure()
        raise type(failure)(
            failure.errno, failure.strerror, failure.filename.replace("RUNS", str(runs_root))
        )

    monkeypatch.setattr(stages.runner, "run", failing_run)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setattr(sys, "argv", ["alignpipe", *runs, "stage=sft", "tracking=none"])
    try:
        with pytest.raises(SystemExit) as exit_:
            entry.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text.replace("RUNS", str(runs_root)) in err, err
    assert "Traceback" not in err
