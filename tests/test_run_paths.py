"""Safe run paths: experiment_name and paths.variant stay inside paths.runs_root, checked
before anything is created; a rejected command (any config error) leaves no directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stages.core.handoff import stage_dir
from stages.core.run_paths import command_line_problems, name_problem, run_path_problems
from stages.core.schema import ConfigError, validate_config
from stages.core.sweep import safe_variant
from tests.conftest import CONF_DIR, REPO

BAD_EXPERIMENT_NAMES = ["..", ".", "a/b", "../../x", "/tmp/elsewhere", "a\\b", ""]
BAD_VARIANTS = ["..", "../../../../x", "a/b", "/abs", "final", "checkpoint-200", "wandb"]
GOOD_VARIANTS = [
    "",
    "stage.beta=0.05",
    "stage.beta=0.1,stage.learning_rate=0.0002",
    safe_variant("data.sft.path=/data/a b.jsonl"),  # what sweeps make of unsafe overrides
]


@pytest.mark.parametrize("name", BAD_EXPERIMENT_NAMES)
def test_bad_experiment_names_are_config_errors_naming_the_key(compose_cfg, name) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_cfg(f"experiment_name='{name}'"))
    assert "experiment_name=" in str(raised.value)


@pytest.mark.parametrize("variant", BAD_VARIANTS)
def test_bad_variants_are_config_errors_naming_the_key(compose_cfg, variant) -> None:
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_cfg("stage=dpo", f"paths.variant='{variant}'"))
    assert "paths.variant=" in str(raised.value)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["stage=eval", "stage.target=../../x"], "stage.target"),
        (["stage=ppo", "stage.reward_stage=/etc"], "stage.reward_stage"),
        (["stage=dpo", "stage.parent=.."], "stage.parent"),
    ],
)
def test_stage_names_that_point_at_other_run_dirs_are_checked(compose_cfg, overrides, key):
    with pytest.raises(ConfigError) as raised:
        validate_config(compose_cfg(*overrides))
    assert f"{key}=" in str(raised.value)


@pytest.mark.parametrize("variant", GOOD_VARIANTS)
def test_sweep_variants_stay_valid(variant) -> None:
    assert run_path_problems("toy", variant) == []
    assert name_problem("experiment_name", "toy_qlora") is None


def test_every_value_of_a_sweep_is_checked_before_hydra_runs() -> None:
    problems = command_line_problems(
        ["-m", "experiment_name=ok,..", "paths.variant=../x", "stage.beta=0.1,0.2"]
    )
    assert [p.split("=")[0] for p in problems] == ["experiment_name", "paths.variant"]
    assert command_line_problems(["-m", "experiment_name=a,b", "paths.variant=", "x=.."]) == []


def test_stage_dir_refuses_a_path_outside_runs_root(tmp_path) -> None:
    root = tmp_path / "runs"
    assert stage_dir(root, "toy", "dpo", "stage.beta=0.1") == root / "toy" / "dpo/stage.beta=0.1"
    for experiment, variant in (("..", ""), ("toy", "../../.."), ("/etc", "")):
        with pytest.raises(ConfigError, match=re.escape("outside paths.runs_root")):
            stage_dir(root, experiment, "sft", variant)


def test_hydra_sweep_dir_checks_the_experiment_name(tmp_path) -> None:
    """hydra.sweep.dir goes through the run_path resolver: a bad name fails as Hydra resolves
    it, i.e. before its sweeper creates the directory."""

    def sweep_dir(*overrides: str) -> str:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
        return OmegaConf.select(cfg, "hydra.sweep.dir")

    good = sweep_dir(f"paths.runs_root={tmp_path}", "stage=dpo")
    assert good == str(tmp_path / "toy" / "_sweeps" / "dpo")
    with pytest.raises(
        Exception, match=re.escape("experiment_name='..' is not a plain directory name")
    ):
        sweep_dir(f"paths.runs_root={tmp_path}", "experiment_name=..")
    # Single runs: Hydra's run dir is the current dir, so Hydra itself creates nothing.
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment_name=x"], return_hydra_config=True)
    assert OmegaConf.select(cfg, "hydra.run.dir") == "."


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# (command-line overrides, key the error must name). Relative runs_root under the cwd, as a
# user runs it: `experiment_name=..` would put the stage in ./sft/.
CLI_CASES = [
    (["stage=sft", "experiment_name=..", "force=true"], "experiment_name"),
    (["stage=sft", "paths.variant=../../../../x"], "paths.variant"),
    (["stage=sft", "experiment_name=/tmp/escaped"], "experiment_name"),
    (["-m", "stage=sft", "experiment_name=ok,.."], "experiment_name"),  # multirun: sweep dir
    (["stage=sft", "stage.max_steps=0"], "stage.max_steps"),  # any failed start: no run dir
]


@pytest.mark.parametrize(("overrides", "key"), CLI_CASES, ids=lambda v: str(v))
def test_rejected_command_creates_no_directory_anywhere(tmp_path, overrides, key) -> None:
    cwd = tmp_path / "cwd"
    # What `experiment_name=.. force=true` used to delete: a stage-shaped dir next to runs/.
    keep = cwd / "sft" / "final" / "model.safetensors"
    keep.parent.mkdir(parents=True)
    keep.write_text("not yours to delete")
    (cwd / "sft" / "checkpoint-1").mkdir()
    before_tmp, before_repo = _listing(tmp_path), set(os.listdir(REPO))

    proc = subprocess.run(
        [sys.executable, "-m", "stages", *overrides, "tracking=none", "paths.runs_root=runs"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "offline"},
        capture_output=True,
        text=True,
        timeout=600,
    )

    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]  # a user error, not a crash
    assert f"{key}=" in output and "Traceback" not in output, output[-3000:]
    assert _listing(tmp_path) == before_tmp  # nothing created, nothing deleted
    # (Only names this command could create: others may work in the checkout meanwhile.)
    assert not (set(os.listdir(REPO)) - before_repo) & {"runs", "sft", "x", "outputs", "multirun"}
    assert not Path("/tmp/escaped").exists()
