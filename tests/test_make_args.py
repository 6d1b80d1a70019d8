"""`make ... ARGS='...'` reaches Hydra without shell evaluation; quoted values still work.

The make tests run the real Makefile with RUN replaced by a recorder script that writes the
argv it was given, so they check exactly what a stage would receive (no heavy imports).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stages.make_args import MakeArgsError, command_line
from tests.conftest import REPO


def test_quotes_group_words_and_nothing_is_expanded() -> None:
    environ = {"ALIGNPIPE_ARGS": "a=1 'b=x y' c=\"[p,q]\" d=`id` e=$(id) f=$HOME;g=*"}
    assert command_line(["ALIGNPIPE_ARGS", "--", "run", "stage=sft"], environ) == [
        "run", "stage=sft", "a=1", "b=x y", "c=[p,q]", "d=`id`", "e=$(id)", "f=$HOME;g=*",
    ]  # fmt: skip
    assert command_line(["ALIGNPIPE_ARGS", "--", "run"], {}) == ["run"]


def test_unbalanced_quote_names_the_variable() -> None:
    with pytest.raises(MakeArgsError, match=r"ARGS=.*No closing quotation"):
        command_line(["ALIGNPIPE_ARGS", "--", "run"], {"ALIGNPIPE_ARGS": "a='b"})


@pytest.fixture
def recorder(tmp_path: Path) -> Path:
    """An executable that records its argv as JSON in $ARGV_OUT."""
    script = tmp_path / "record-argv"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "open(os.environ['ARGV_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return script


def make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # -o: never (re)build the venv from a test.
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "-o", ".venv/.installed", *args],
        env={**os.environ, "ARGV_OUT": str(tmp_path / "argv.json")},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_make_args_never_run_shell_code(tmp_path: Path, recorder: Path) -> None:
    m = tmp_path / "marker"
    args = (
        f"experiment_name=`touch {m}1` x=$(touch {m}2) y=$$(touch {m}3); touch {m}4 "
        f"| touch {m}5 'data.sft.path=/tmp/my file.jsonl' hydra.launcher.setup='[a,b]'"
    )
    proc = make(tmp_path, "sft", f"RUN={recorder}", f"ARGS={args}", f"EXP=toy`touch {m}6`")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["argv.json", "record-argv"]
    # Words split at blanks outside quotes, like a shell; nothing else happens to them.
    assert json.loads((tmp_path / "argv.json").read_text()) == [
        "stage=sft",
        f"experiment=toy`touch {m}6`",
        "experiment_name=`touch",
        f"{m}1`",
        "x=$(touch",
        f"{m}2)",
        "y=$$(touch",
        f"{m}3);",
        "touch",
        f"{m}4",
        "|",
        "touch",
        f"{m}5",
        "data.sft.path=/tmp/my file.jsonl",
        "hydra.launcher.setup=[a,b]",
    ]


def test_make_sweep_and_test_targets_never_run_shell_code(tmp_path: Path) -> None:
    m = tmp_path / "marker"
    sweep = make(tmp_path, "sweep", f"SWEEP=dpo_beta`touch {m}1`")
    assert sweep.returncode == 2
    assert f"SWEEP=dpo_beta`touch {m}1`: no conf/sweep/" in sweep.stderr
    tests = make(
        tmp_path, "test", f"PYTEST_ARGS=--co -q tests/test_make_args.py -k 'x`touch {m}2`'"
    )
    assert "touch" in tests.stdout + tests.stderr  # the -k expression reached pytest as is
    assert not list(tmp_path.glob("marker*"))


def test_make_stage_with_backticks_fails_as_a_config_error(tmp_path: Path) -> None:
    """The real stage entry point: the backticks reach Hydra as text and are rejected."""
    m = tmp_path / "marker"
    runs = tmp_path / "runs"
    proc = make(
        tmp_path, "sft", f"ARGS=experiment_name=a`touch {m}`b tracking=none paths.runs_root={runs}"
    )
    assert proc.returncode != 0
    assert "experiment_name=" in proc.stdout + proc.stderr
    assert not m.exists() and not runs.exists()
