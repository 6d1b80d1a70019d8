"""`alignpipe --help`: every stage, group and option with its doc, fast, without torch."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import CONF_DIR, REPO

# Runs the CLI module as `python -m stages` does, then reports what it imported and how long
# the help took (interpreter start excluded: that is the machine, not us).
PROBE = """
import json, runpy, sys, time
sys.argv = ["alignpipe", *json.loads(sys.argv[1])]
started = time.perf_counter()
try:
    runpy.run_module("stages", run_name="__main__")
    code = 0
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "seconds": time.perf_counter() - started,
                  "heavy": [m for m in ("torch", "transformers", "trl") if m in sys.modules]}),
      file=sys.stderr)
"""


def run_help(*args: str) -> tuple[str, dict]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stderr.strip().splitlines()[-1])
    return done.stdout, report


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def test_help_lists_every_stage_group_and_option_fast_and_without_torch() -> None:
    page, report = run_help("--help")
    assert report["code"] == 0
    assert report["heavy"] == [], f"--help imported {report['heavy']}"
    assert report["seconds"] < 3.0, report
    for group in ("stage", "model", "peft", "data", "tracking", "experiment", "sweep"):
        for option in options(group):
            line = next((ln for ln in page.splitlines() if ln.strip(" *").startswith(option)), "")
            assert line, f"--help does not list {group}={option}"
            assert len(line.split()) > 1, f"{group}={option} has no one-line doc: {line!r}"
    assert "_schema" not in page
    # accelerate/ holds launcher configs: named as such, not offered as a group.
    assert "accelerate:" not in page and "`accelerate launch` configs" in page
    assert "--hydra-help" in page


def test_help_for_an_option_shows_each_knob_with_default_and_comment() -> None:
    page, report = run_help("--help", "stage=dpo")
    assert report["code"] == 0 and report["heavy"] == []
    knobs = [ln for ln in page.splitlines() if ln.strip().startswith("stage.")]
    assert any(ln.strip().startswith("stage.beta=0.1 ") for ln in knobs), knobs
    undocumented = [ln for ln in knobs if "# " not in ln]
    assert not undocumented, undocumented


def test_help_for_an_unknown_option_names_the_real_ones() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stages", "--help", "stage=dop"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "stage=dop is not an option of stage" in done.stderr
    from stages.registry import STAGES

    every_stage = ", ".join(sorted(spec.name for spec in STAGES))  # e.g. "dpo, eval, ..., sft"
    assert every_stage in done.stderr and "_schema" not in done.stderr


def test_hydra_help_is_still_hydras() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stages", "--hydra-help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "Hydra (" in done.stdout
