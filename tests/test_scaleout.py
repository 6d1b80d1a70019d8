"""Scale-out by config only: accelerate configs, `make LAUNCH=accelerate`, the Slurm launcher.

Slow tests train the tiny model data-parallel in two CPU processes (gloo) and check that only
rank 0 wrote: one run dir, one manifest, one W&B run, and the loss fell.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from stages.core.handoff import DONE, MANIFEST, file_sha256
from tests.conftest import CONF_DIR, FAST, REPO
from tests.optional_plugins import hydra_plugin_installed
from tests.wandb_readback import offline_runs, read_offline_run

ACCELERATE_DIR = CONF_DIR / "accelerate"
HAS_SUBMITIT = hydra_plugin_installed("hydra_submitit_launcher")
TINY = [o for o in FAST if not o.startswith("tracking=")]
PAIRS_FAST = [
    "data.pairs.num_prompts=32",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
]
RM_PAIRS = [
    "data.pairs.source=file",
    f"data.pairs.path={REPO / 'tests' / 'fixtures' / 'pref_hh_rlhf.jsonl'}",
    "data.pairs.heldout_fraction=0.3",
]
ENV = {
    "OMP_NUM_THREADS": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


# ------------------------------------------------------------------- accelerate configs


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("single", "NO"),
        ("ddp", "MULTI_GPU"),
        ("fsdp", "FSDP"),
        ("zero2", "DEEPSPEED"),
        ("zero3", "DEEPSPEED"),
    ],
)
def test_accelerate_configs_load_with_accelerate(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ACCELERATE_DIR / f"{name}.yaml"))
    assert config.distributed_type.name == kind
    # Precision is the stage's (precision=auto), never forced by the launcher config.
    assert config.mixed_precision == "no"
    if kind == "DEEPSPEED":
        ds = config.deepspeed_config
        assert ds["zero_stage"] == int(name[-1])
        # Left to the stage config through DeepSpeed's "auto": a value here would override it.
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    if name == "zero3":
        assert config.deepspeed_config["zero3_save_16bit_model"] is True  # a loadable final/
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_accelerate_dir_holds_exactly_the_documented_configs() -> None:
    assert sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml")) == [
        "ddp", "fsdp", "single", "zero2", "zero3",
    ]  # fmt: skip


def _make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-n", *args], cwd=REPO, capture_output=True, text=True, timeout=60
    )


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_launch_accelerate_runs_the_stage_under_accelerate() -> None:
    out = _make("sft", "LAUNCH=accelerate", "ACC=ddp", "NPROC=4", "EXP=toy_lora").stdout
    # EXP and ARGS reach the command through the environment (stages/make_args.py; what they
    # expand to is tested in tests/test_make_args.py), never pasted into the shell line.
    assert (
        "accelerate launch --config_file conf/accelerate/ddp.yaml --num_processes 4 "
        '-m stages stage=sft "experiment=$ALIGNPIPE_EXP"'
    ) in out
    plain = _make("dpo").stdout
    assert 'python -m stages stage=dpo "experiment=$ALIGNPIPE_EXP"' in plain
    assert "accelerate" not in plain

    bad = _make("sft", "LAUNCH=accelerate", "ACC=zero9")
    assert bad.returncode != 0 and "conf/accelerate/zero9.yaml" in bad.stderr
    sweep = _make("sweep", "SWEEP=dpo_beta")
    assert '-m stages -m "+sweep=$ALIGNPIPE_SWEEP" "experiment=$ALIGNPIPE_EXP"' in sweep.stdout


@pytest.mark.parametrize(
    ("env", "stage", "cuda", "reason"),
    [
        ({"ACCELERATE_USE_FSDP": "true"}, "sft", False, "FSDP.*only on GPUs.*plain DDP.*ACC=ddp"),
        ({"ACCELERATE_USE_FSDP": "true"}, "sft", True, "FSDP.*not verified.*2 or more GPUs"),
        ({"ACCELERATE_USE_FSDP": "true"}, "ppo", True, "FSDP.*our PPO.*same forwards"),
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "sft", True, "ZeRO-3.*DeepSpeed is not installed.*needs CUDA",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, "sft", True, None),
        ({}, "sft", True, None),
    ],
)  # fmt: skip
def test_sharded_weights_are_refused_before_training_with_the_reason(
    compose_cfg, monkeypatch, env, stage, cuda, reason
):
    """FSDP / ZeRO-3 over several processes where a whole stage cannot run sharded (or has
    not been verified to): the stage refuses at start, saying why, instead of hanging (or
    saving a shard) at the end. ZeRO-2 and DDP replicate the weights: allowed."""
    from stages.core import runtime
    from stages.core.lifecycle import StageRun
    from stages.core.schema import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runtime, "use_cpu", lambda: not cuda)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if reason is None:
        assert runtime.sharding_refusal(stage) is None
        return
    assert runtime.sharding_refusal(stage) is not None
    with pytest.raises(ConfigError, match=reason):
        StageRun.begin(compose_cfg(f"stage={stage}", "tracking=none", fast=False), stage)
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process holds every shard: allowed
    assert runtime.sharded_parameters() is None and runtime.sharding_refusal(stage) is None


# ---------------------------------------------------------------------- Slurm launcher


@pytest.mark.skipif(
    not HAS_SUBMITIT, reason="hydra-submitit-launcher not installed: pip install -e '.[slurm]'"
)
def test_slurm_launcher_composes() -> None:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "hydra/launcher=slurm",
                "+sweep=dpo_beta",
                "hydra.launcher.partition=gpu",
                "hydra.launcher.tasks_per_node=4",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.partition == "gpu" and launcher.tasks_per_node == 4
    assert launcher.name == "alignpipe-toy-dpo"
    assert launcher.max_num_timeout > 0  # requeued jobs resume from their checkpoint
    assert launcher.submitit_folder.endswith("/_sweeps/dpo/.submitit/%j")
    assert launcher.setup[0] == "export OMP_NUM_THREADS=8"


# ------------------------------------------------------------------ slow: 2 CPU ranks


def _free_port() -> int:
    # Other test runs on this machine may hold accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(args: list[str], log: Path) -> None:
    cli = Path(sys.executable).with_name("accelerate")
    cmd = [
        str(cli), "launch", "--config_file", str(ACCELERATE_DIR / "ddp.yaml"),
        "--num_processes", "2", "--main_process_port", str(_free_port()),
        "-m", "stages", *args,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900
    )
    log.write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, f"{cmd} failed:\n{(proc.stdout + proc.stderr)[-4000:]}"


def _only_rank0_wrote(stage_dir: Path, stage: str) -> dict:
    """One finished run dir (no variant, no second copy), one manifest, one W&B run."""
    assert (stage_dir / DONE).is_file()
    manifests = [p for p in stage_dir.rglob(MANIFEST) if "final" not in p.parts]
    assert manifests == [stage_dir / MANIFEST], manifests
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    assert manifest["world_size"] == 2  # really trained by two processes
    paths = offline_runs(stage_dir)
    assert len(paths) == 1, paths
    run = read_offline_run(paths[0])
    assert run.job_type == stage and run.state == "finished"
    losses = run.series("train/loss")
    assert len(losses) >= 2 and losses[-1] < losses[0], losses
    return manifest


@pytest.mark.slow
def test_sft_then_dpo_under_accelerate_with_two_cpu_processes(
    tmp_path: Path, builtin_models_dir: Path
) -> None:
    runs = tmp_path / "runs"
    common = [
        "tracking=wandb", f"paths.runs_root={runs}", f"paths.builtin_models={builtin_models_dir}",
        *TINY,
    ]  # fmt: skip
    _accelerate(["stage=sft", *common], tmp_path / "sft.log")
    sft = _only_rank0_wrote(runs / "toy" / "sft", "sft")
    # 12 steps x 8 rows x 2 ranks of 512 rows: twice the data of one process.
    assert sft["metrics"]["train/steps"] == 12

    _accelerate(["stage=dpo", *common, *PAIRS_FAST], tmp_path / "dpo.log")
    dpo = _only_rank0_wrote(runs / "toy" / "dpo", "dpo")
    assert dpo["parent"]["manifest_sha256"] == file_sha256(runs / "toy" / "sft" / MANIFEST)
    stage_dirs = sorted(p.name for p in (runs / "toy").iterdir() if not p.name.startswith("_"))
    assert stage_dirs == ["dpo", "sft"]  # (_pairs/ is the shared cache of generated pairs)


@pytest.mark.slow
def test_ppo_under_accelerate_with_two_cpu_processes(
    tmp_path: Path, builtin_models_dir: Path, sft_runs
) -> None:
    """Our PPO trainer under `accelerate launch` (DDP over gloo): each rank samples half of
    every rollout, one run dir, one manifest, one W&B run with every update's metrics."""
    from stages.rm import recipe as rm

    runs = tmp_path / "runs"
    shutil.copytree(sft_runs("none"), runs / "toy" / "sft")
    common = [f"paths.runs_root={runs}", f"paths.builtin_models={builtin_models_dir}"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        rm.run(compose(config_name="config", overrides=["stage=rm", *common, *TINY, *RM_PAIRS]))
    ppo_args = [
        "stage=ppo", "tracking=wandb", *common, "data.toy.num_eval=16",
        "stage.total_updates=3", "stage.rollout_batch_size=8", "stage.num_minibatches=2",
        "stage.response_length=8", "stage.num_prompts=64", "stage.logging_steps=1",
    ]  # fmt: skip
    _accelerate(ppo_args, tmp_path / "ppo.log")

    stage_dir = runs / "toy" / "ppo"
    assert (stage_dir / DONE).is_file()
    assert [p for p in stage_dir.rglob(MANIFEST) if "final" not in p.parts] == [
        stage_dir / MANIFEST
    ]
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    assert manifest["world_size"] == 2
    assert manifest["metrics"]["train/updates"] == 3
    paths = offline_runs(stage_dir)
    assert len(paths) == 1, paths
    run = read_offline_run(paths[0])
    assert run.job_type == "ppo" and run.state == "finished"
    assert len(run.series("objective/scores")) == 3
    assert len(run.series("policy/clipfrac")) == 3


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_SUBMITIT, reason="hydra-submitit-launcher not installed: pip install -e '.[slurm]'"
)
def test_submitit_job_with_two_tasks_trains_data_parallel(
    tmp_path: Path, builtin_models_dir: Path
) -> None:
    """The Slurm launcher's code path, run locally: two tasks of one submitit job become two
    DDP ranks (stages.core.runtime.adopt_submitit_ranks), and only rank 0 writes. With
    ``paths.variant=`` the job is a plain run of its stage, in the dir later stages read."""
    runs = tmp_path / "runs"
    cmd = [
        sys.executable, "-m", "stages", "-m", "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2", "hydra.launcher.timeout_min=10", "stage=sft",
        "tracking=wandb", f"paths.runs_root={runs}",
        f"paths.builtin_models={builtin_models_dir}", *TINY, "paths.variant=",
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    manifest = _only_rank0_wrote(runs / "toy" / "sft", "sft")
    assert manifest["variant"] is None and manifest["config"]["tracking"]["group"] is None
    logs = list((runs / "toy" / "_sweeps" / "sft" / ".submitit").rglob("*_log.out"))
    assert len(logs) == 2  # two submitit tasks ran


@pytest.mark.slow
@pytest.mark.parametrize("peft", ["none", "lora"])
def test_fsdp_sharded_weights_are_gathered_into_final_on_two_cpu_ranks(
    tmp_path: Path, builtin_models_dir: Path, peft: str
) -> None:
    """Torch's FSDP2 on 2 CPU ranks (gloo): each rank holds half of every parameter, trains a
    few steps, and the stage's own save path (StageRun.save_final -> models.save_final or
    save_without_reference -> finish) gathers on every rank and writes on rank 0 only.
    final/ loads with plain transformers / peft, holds every weight at full shape, moved
    from the initial weights, equal to rank 0's gather, and replies as the sharded model did.
    (accelerate cannot shard on CPU, hence tests/fsdp_save_worker.py, not `accelerate launch`.)"""
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    cli = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(cli), "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "tests.fsdp_save_worker", str(tmp_path), str(builtin_models_dir), peft,
    ]  # fmt: skip
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

    report = json.loads((tmp_path / "rank0.json").read_text())
    stage_dir = Path(report["run_dir"])
    assert not (tmp_path / "runs-rank1").exists()  # rank 1 wrote nothing, anywhere
    assert (stage_dir / DONE).is_file()
    manifest = json.loads((stage_dir / MANIFEST).read_text())
    assert manifest["world_size"] == 2
    final = stage_dir / "final"
    assert manifest["final_sha256"] == {
        p.relative_to(final).as_posix(): file_sha256(p) for p in final.rglob("*") if p.is_file()
    }

    initial = torch.load(tmp_path / "initial.pt")
    gathered = torch.load(tmp_path / "gathered.pt")
    if peft == "none":
        model = AutoModelForCausalLM.from_pretrained(final)
    else:
        model = AutoPeftModelForCausalLM.from_pretrained(final)
    saved = model.state_dict()
    assert set(saved) == set(initial) == set(gathered)
    # Each rank held half the rows of the embedding (a shard), final/ has them all.
    embed = next(k for k in saved if k.endswith("embed_tokens.weight"))
    assert report["local_shape"][0] < saved[embed].shape[0]
    trained = [k for k in saved if peft == "none" or "lora_" in k]
    assert trained
    for key in saved:
        assert saved[key].shape == initial[key].shape, key
        torch.testing.assert_close(saved[key], gathered[key], rtol=0, atol=0)
    moved = [k for k in trained if not torch.equal(saved[k], initial[k])]
    # LoRA's B starts at zero and A moves only through it: both move after 3 steps.
    assert moved == trained, sorted(set(trained) - set(moved))
    assert report["losses"][-1] < report["losses"][0]

    # The sharded model's greedy reply (every rank generating) is final/'s.
    model.eval()
    with torch.no_grad():
        reply = model.generate(
            input_ids=torch.tensor([report["prompt"]]), max_new_tokens=8, do_sample=False
        )
    assert reply[0].tolist() == report["reply"]
