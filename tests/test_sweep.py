"""Hydra multirun sweeps: one run dir, W&B run, group and tag set per job; named sweeps compose.

Slow tests run real multiruns as subprocesses (`python -m stages -m ...`) on the embedded
default and read their run dirs and W&B offline files back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from stages.__main__ import objective_value
from stages.compare import compare
from stages.core import handoff
from stages.core.handoff import DONE, MANIFEST
from stages.core.lifecycle import StageRun
from stages.core.schema import validate_config
from stages.core.sweep import (
    VARIANT_MAX,
    WANDB_TAG_MAX,
    apply_sweep_job,
    job_overrides,
    override_tags,
    safe_variant,
)
from tests.conftest import CONF_DIR, FAST, REPO
from tests.optional_plugins import hydra_plugin_installed
from tests.wandb_readback import offline_runs, read_offline_run

HAS_OPTUNA = hydra_plugin_installed("hydra_optuna_sweeper")
TINY = [o for o in FAST if not o.startswith("tracking=")]
# The 12-step SFT model never answers correctly: pair its samples with the right answer.
PAIRS_FAST = [
    "data.pairs.num_prompts=32",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
]


def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def run_cli(args: list[str], tmp_path: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m stages ...` in a subprocess, one OpenMP thread, W&B offline."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    (tmp_path / "cli.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{args} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc


# --------------------------------------------------------------------------- fast: units


def test_variant_is_the_override_string_when_it_is_safe() -> None:
    assert safe_variant("stage.beta=0.1") == "stage.beta=0.1"
    assert safe_variant("stage.beta=0.1,stage.learning_rate=0.0002") == (
        "stage.beta=0.1,stage.learning_rate=0.0002"
    )
    assert safe_variant("") == ""  # only excluded keys differ: the plain stage dir


def test_variant_is_filesystem_safe_and_collision_free() -> None:
    a = safe_variant("data.sft.path=/data/a b.jsonl")
    b = safe_variant("data.sft.path=_data_a_b.jsonl")  # the same after replacing characters
    assert "/" not in a and " " not in a
    assert a != b
    many = [f"data.toy.option_{i}={i}" for i in range(40)]
    long_a = safe_variant(",".join(many), many)
    changed = [*many[:-1], "data.toy.option_39=40"]
    long_b = safe_variant(",".join(changed), changed)
    assert len(long_a) <= VARIANT_MAX and len(long_b) <= VARIANT_MAX
    assert long_a != long_b
    assert long_a.startswith("option_0=0,option_1=1")  # leaf keys keep the values readable


def test_tags_fit_wandb() -> None:
    tags = override_tags(["stage.beta=0.1", "data.sft.path=/" + "x" * 100])
    assert tags[0] == "stage.beta=0.1"
    assert all(len(t) <= WANDB_TAG_MAX for t in tags)


def test_job_overrides_follow_the_configured_exclusions() -> None:
    cfg = _hydra_cfg()
    excluded = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    job = job_overrides(
        [
            "+sweep=dpo_beta",
            "stage=dpo",
            "experiment=toy",
            "tracking=wandb",
            "paths.runs_root=/tmp/x",
            "stage.beta=0.3",
            "data.toy.num_train=64",
        ],
        excluded,
    )
    assert job == ["data.toy.num_train=64", "stage.beta=0.3"]


def test_apply_sweep_job_sets_variant_group_and_tags(compose_cfg) -> None:
    cfg = compose_cfg("stage=dpo", "tracking=wandb", "tracking.tags=[mine]")
    job = apply_sweep_job(cfg, override_dirname="stage.beta=0.3", overrides=["stage.beta=0.3"])
    typed = validate_config(job)
    assert typed.paths.variant == "stage.beta=0.3"
    assert typed.tracking.group == "toy-dpo-sweep"
    assert typed.tracking.tags == ["mine", "stage.beta=0.3"]
    assert cfg.paths.variant == ""  # the input is untouched

    plain = apply_sweep_job(
        cfg, override_dirname="stage.beta=0.3", overrides=["stage.beta=0.3"], keep_variant=True
    )  # `paths.variant=` on the command line: a plain run of the stage (e.g. sent to Slurm)
    assert plain.paths.variant == "" and plain.tracking.group is None
    assert "stage.beta=0.3" in plain.tracking.tags

    named = apply_sweep_job(
        compose_cfg("+sweep=dpo_beta"), override_dirname="stage.beta=1.0", overrides=[]
    )
    assert named.tracking.group == "toy-dpo_beta"  # the sweep file names the group


def test_sweep_jobs_get_their_own_run_dirs_but_share_the_plain_parent(
    compose_cfg, tmp_path
) -> None:
    sft_dir = tmp_path / "runs" / "toy" / "sft"
    (sft_dir / "final").mkdir(parents=True)
    manifest = {"stage": "sft", "kind": "full", "base_model": {"id": "x"}, "final_sha256": {}}
    handoff.finalize_stage(sft_dir, manifest, {})  # final/ is empty: no file hashes
    jobs = [
        StageRun.begin(
            apply_sweep_job(compose_cfg("stage=dpo"), override_dirname=o, overrides=[o]), "dpo"
        )
        for o in ("stage.beta=0.1", "stage.beta=0.3")
    ]
    assert [j.run_dir for j in jobs] == [
        tmp_path / "runs" / "toy" / "dpo" / "stage.beta=0.1",
        tmp_path / "runs" / "toy" / "dpo" / "stage.beta=0.3",
    ]
    assert {j.parent.run_dir for j in jobs if j.parent} == {sft_dir}
    assert [j.tracker.name for j in jobs] == ["toy/dpo/stage.beta=0.1", "toy/dpo/stage.beta=0.3"]


def test_objective_returns_the_metric_or_fails_naming_it() -> None:
    metrics = {"eval/accuracy": 0.5, "train/loss": 1.0}
    assert objective_value(metrics, "eval/accuracy", "dpo") == 0.5
    assert objective_value(metrics, None, "dpo") is metrics
    with pytest.raises(ValueError, match=r"eval/acc.*not a numeric metric of stage 'dpo'"):
        objective_value(metrics, "eval/acc", "dpo")


# --------------------------------------------------------------------- fast: sweep files


def test_named_sweeps_compose_with_their_stage_group_and_grid() -> None:
    dpo = _hydra_cfg("+sweep=dpo_beta")
    assert dpo.stage.name == "dpo"
    assert dpo.tracking.group == "toy-dpo_beta"
    assert dpo.hydra.sweeper.params["stage.beta"] == "0.03,0.1,0.3,1.0"
    assert str(dpo.hydra.mode) == "RunMode.MULTIRUN"

    ppo = _hydra_cfg("+sweep=ppo_kl", "experiment=toy_lora")
    assert ppo.stage.name == "ppo" and ppo.peft.method == "lora"
    assert ppo.tracking.group == "toy_lora-ppo_kl"
    assert set(ppo.hydra.sweeper.params) == {"stage.kl_coef"}


def test_ppo_kl_sweep_jobs_validate_with_their_kl_coef(compose_cfg) -> None:
    values = _hydra_cfg("+sweep=ppo_kl").hydra.sweeper.params["stage.kl_coef"].split(",")
    assert len(values) >= 3
    for value in values:
        job = compose_cfg("+sweep=ppo_kl", f"stage.kl_coef={value}", fast=False)
        assert validate_config(job).stage.kl_coef == float(value)


@pytest.mark.skipif(
    not HAS_OPTUNA, reason="hydra-optuna-sweeper not installed: pip install -e '.[optuna]'"
)
def test_optuna_sweep_composes_with_an_objective() -> None:
    cfg = _hydra_cfg("+sweep=dpo_optuna")
    assert cfg.stage.name == "dpo" and cfg.objective == "eval/accuracy"
    sweeper = cfg.hydra.sweeper
    assert "optuna" in sweeper._target_.lower()
    assert sweeper.direction == "maximize"
    assert set(sweeper.params) == {"stage.beta", "stage.learning_rate"}


# ----------------------------------------------------------------------- slow: real runs


@pytest.mark.slow
def test_two_job_multirun_gets_two_run_dirs_manifests_and_wandb_runs(
    tmp_path: Path, builtin_models_dir: Path
) -> None:
    runs = tmp_path / "runs"
    run_cli(
        [
            "-m", "stages", "-m", "stage=sft", "stage.learning_rate=1e-3,2e-3",
            "tracking=wandb", f"paths.runs_root={runs}",
            f"paths.builtin_models={builtin_models_dir}", *TINY,
        ],
        tmp_path,
    )  # fmt: skip
    stage_dir = runs / "toy" / "sft"
    assert not (stage_dir / DONE).exists()  # sweep jobs never write the plain stage dir
    job_dirs = sorted(p.parent for p in stage_dir.glob(f"*/{DONE}"))
    assert len(job_dirs) == 2, list(stage_dir.iterdir())

    by_lr = {}
    for job_dir in job_dirs:
        manifest = json.loads((job_dir / MANIFEST).read_text())
        config = manifest["config"]
        lr = config["stage"]["learning_rate"]
        by_lr[lr] = (job_dir, manifest)
        assert manifest["variant"] == job_dir.name == config["paths"]["variant"]
        # Long override lists are shortened (group prefixes dropped, a hash appended).
        assert f"learning_rate={lr:g}" in job_dir.name
        assert f"stage.learning_rate={lr:g}" in config["tracking"]["tags"]
        assert "data.toy.num_train=512" in config["tracking"]["tags"]
        assert config["tracking"]["group"] == "toy-sft-sweep"
    assert sorted(by_lr) == [1e-3, 2e-3]

    wandb_runs = {}
    for lr, (job_dir, _) in by_lr.items():
        paths = offline_runs(job_dir)
        assert len(paths) == 1, paths  # its own W&B run, inside its own run dir
        wandb_runs[lr] = read_offline_run(paths[0])
    groups = {run.group for run in wandb_runs.values()}
    assert groups == {"toy-sft-sweep"}  # one group: the sweep
    assert len({run.name for run in wandb_runs.values()}) == 2
    for lr, run in wandb_runs.items():
        assert f"stage.learning_rate={lr:g}" in run.tags
        assert run.config["alignpipe"]["stage"]["learning_rate"] == lr
        assert run.state == "finished"
        losses = run.series("train/loss")
        assert len(losses) >= 2 and losses[-1] < losses[0]

    # compare reads the two real run dirs back: one table row each, plots as PNG files.
    report = compare([runs / "toy"], tmp_path / "cmp")
    assert "learning_rate=0.001" in report.table and "learning_rate=0.002" in report.table
    assert report.markdown.count("| sft |") == 2
    names = {p.name for p in report.files}
    assert {"compare.md", "accuracy.png", "loss.png"} <= names
    assert "frontier.png" not in names  # no DPO/PPO run: nothing to put on a frontier
    for png in report.files:
        if png.suffix == ".png":
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_OPTUNA, reason="hydra-optuna-sweeper not installed: pip install -e '.[optuna]'"
)
def test_optuna_sweep_runs_three_trials_on_a_stage_metric(
    compose_cfg, tmp_path: Path, builtin_models_dir: Path
) -> None:
    from stages.sft import recipe as sft

    sft.run(compose_cfg())  # the shared parent, with the same FAST settings as the trials
    runs = tmp_path / "runs"
    run_cli(
        [
            "-m", "stages", "-m", "+sweep=dpo_optuna", "hydra.sweeper.n_trials=3",
            "tracking=none", f"paths.runs_root={runs}",
            f"paths.builtin_models={builtin_models_dir}", *TINY, *PAIRS_FAST,
            "stage.max_steps=4",
        ],
        tmp_path,
    )  # fmt: skip
    trials = sorted(p.parent for p in (runs / "toy" / "dpo").glob(f"*/{DONE}"))
    assert len(trials) == 3
    manifests = [json.loads((t / MANIFEST).read_text()) for t in trials]
    params = {
        (m["config"]["stage"]["beta"], m["config"]["stage"]["learning_rate"]) for m in manifests
    }
    assert len(params) == 3  # three distinct points of the search space
    for beta, lr in params:
        assert 0.02 <= beta <= 1.0 and 3e-5 <= lr <= 1e-3
    for m in manifests:
        assert m["parent"]["stage"] == "sft"  # all trials share the one SFT parent
        assert m["parent"]["run_dir"] == str(runs / "toy" / "sft")

    results = yaml.safe_load(
        (runs / "toy" / "_sweeps" / "dpo" / "optimization_results.yaml").read_text()
    )
    assert results["best_value"] == max(m["metrics"]["eval/accuracy"] for m in manifests)
    best = (results["best_params"]["stage.beta"], results["best_params"]["stage.learning_rate"])
    assert best in params


def test_sweep_dir_is_bookkeeping_only() -> None:
    """Hydra's own sweep dir sits beside the stage dirs, never inside a run dir."""
    cfg = _hydra_cfg("+sweep=dpo_beta")
    sweep = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)
    # Built by the run_path resolver (stages/core/run_paths.py), which checks the names.
    assert sweep["dir"] == "${run_path:${paths.runs_root},${experiment_name},_sweeps,${stage.name}}"
    assert cfg.hydra.sweep.dir == "runs/toy/_sweeps/dpo"
    assert sweep["subdir"] == "${hydra.job.num}"
