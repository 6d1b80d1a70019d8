"""GRPO and RLOO stages: TRL's online trainers from the SFT policy (full / LoRA / QLoRA),
rewarded by the task's rule judge or this experiment's reward model, KL-penalised to SFT."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_recipes.pairs import Judge, toy_judge
from stages.core.handoff import DONE, MANIFEST, HandoffError, file_sha256, last_complete_checkpoint
from stages.core.reward_functions import reply_text, reward_function
from stages.core.schema import ConfigError, validate_config
from stages.grpo import recipe as grpo
from stages.rloo import recipe as rloo
from tests.conftest import copy_run, saved_tensors
from tests.test_ppo_stage import RM_PAIRS

# Two prompts of 4 replies per step, 4 steps: seconds on 2 cores, every code path.
ONLINE_FAST = [
    "stage.max_steps=4",
    "stage.save_steps=2",
    "stage.num_generations=4",
    "stage.num_prompts=64",
    "stage.logging_steps=1",  # the first log is step 1: KL to the reference before any update
    "stage.learning_rate=1e-3",
]
RECIPES = {"grpo": grpo, "rloo": rloo}


def _log_history(run_dir: Path) -> list[dict]:
    checkpoint = last_complete_checkpoint(run_dir)
    assert checkpoint is not None
    return json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]


@pytest.fixture
def length_judge(monkeypatch):
    """The 12-step SFT model never sums correctly, so the rule judge would give every reply 0
    (no advantage, nothing to learn): reward reply length instead, so groups differ. The real
    rule reward is measured end to end in tests/test_e2e_grpo.py."""
    from stages.tasks.addition import AdditionTask

    judge = Judge(name="length", score=lambda prompt, reply: float(len(reply)))
    monkeypatch.setattr(AdditionTask, "judge", lambda self: judge)


@pytest.mark.parametrize(
    ("name", "peft"),
    [("grpo", "none"), ("grpo", "lora"), ("grpo", "qlora"), ("rloo", "none"), ("rloo", "dora")],
)
def test_online_rl_trains_from_the_sft_policy_against_it(
    compose_cfg, sft_runs, tmp_path, length_judge, name, peft
) -> None:
    runs = tmp_path / "runs"
    sft_dir = copy_run(sft_runs(peft), runs, "sft")
    metrics = RECIPES[name].run(compose_cfg(f"stage={name}", f"peft={peft}", *ONLINE_FAST))
    run_dir = runs / "toy" / name
    assert (run_dir / DONE).is_file()

    manifest = json.loads((run_dir / MANIFEST).read_text())
    sft_sha = file_sha256(sft_dir / MANIFEST)
    assert manifest["parent"]["manifest_sha256"] == sft_sha
    extra = manifest  # manifest_extra lands at the top level
    assert extra["reward"] == {"source": "task", "task": "toy"}
    expected = "sft_full_weights" if peft == "none" else "sft_adapter_frozen_copy"
    assert extra["reference"]["kind"] == expected
    assert extra["reference"]["manifest_sha256"] == sft_sha

    # Reference = the SFT policy the run starts from: at step 1 the policy IS the reference,
    # so the logged KL is 0. A bare-base reference (adapters disabled, or the base reloaded)
    # would be far from it: SFT moved the weights.
    history = _log_history(run_dir)
    assert history[0]["step"] == 1 and abs(history[0]["kl"]) < 1e-4
    assert metrics["train/steps"] == 4
    assert "train/reward_first" in metrics and "train/reward_last" in metrics
    # TRL logs the reward under the function's name.
    assert "rewards/task_reward/mean" in history[0]

    # The trained weights moved away from SFT's; final/ holds no frozen reference copy.
    final, sft_final = run_dir / "final", sft_dir / "final"
    trained, start = saved_tensors(final), saved_tensors(sft_final)
    assert not any(".ref." in key for key in trained)
    changed = [k for k in trained if k in start and not torch.equal(trained[k], start[k])]
    assert changed, "no weight changed"
    if peft != "none":  # the SFT adapter continued, nothing else
        assert all("lora_" in k for k in changed)
        adapter_config = json.loads((final / "adapter_config.json").read_text())
        assert adapter_config["peft_type"] == "LORA"
        assert adapter_config["use_dora"] == (peft == "dora")

    # The usual comparison with the SFT parent on the toy task's held-out prompts.
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0
    assert metrics["compare/kl_per_token"] >= 0.0
    samples = (run_dir / "eval_samples.jsonl").read_text().splitlines()
    assert len(samples) == 16


def test_the_same_grpo_command_twice_gives_the_same_weights(
    compose_cfg, sft_runs, tmp_path, length_judge
) -> None:
    finals = []
    for attempt in ("a", "b"):
        root = tmp_path / attempt
        copy_run(sft_runs("none"), root, "sft")
        grpo.run(compose_cfg("stage=grpo", f"paths.runs_root={root}", *ONLINE_FAST))
        finals.append(saved_tensors(root / "toy" / "grpo" / "final"))
    assert finals[0].keys() == finals[1].keys()
    assert all(torch.equal(finals[0][k], finals[1][k]) for k in finals[0])


def test_the_reward_model_as_reward(compose_cfg, sft_runs, tmp_path) -> None:
    runs = tmp_path / "runs"
    copy_run(sft_runs("none"), runs, "sft")
    cfg = compose_cfg("stage=grpo", "stage.reward=rm", *ONLINE_FAST)
    with pytest.raises(HandoffError, match="make rm EXP=toy"):
        grpo.run(cfg)  # no RM yet: fails before any weights load, naming the command
    assert not (runs / "toy" / "grpo" / DONE).exists()

    from stages.rm import recipe as rm

    rm.run(compose_cfg("stage=rm", *RM_PAIRS))
    grpo.run(cfg)
    manifest = json.loads((runs / "toy" / "grpo" / MANIFEST).read_text())
    rm_sha = file_sha256(runs / "toy" / "rm" / MANIFEST)
    assert manifest["reward"]["source"] == "rm"
    assert manifest["reward"]["manifest_sha256"] == rm_sha
    assert manifest["upstream"]["rm"]["manifest_sha256"] == rm_sha  # a new RM makes it stale
    # TRL logs the reward under the function's name: the RM's, not the rule judge's.
    assert any("rewards/rm_reward/mean" in entry for entry in _log_history(runs / "toy" / "grpo"))


def test_a_judge_becomes_a_trl_reward_function() -> None:
    prompt = [{"role": "user", "content": "What is 12 + 30?"}]
    reward = reward_function(toy_judge(), "task_reward")
    assert reward.__name__ == "task_reward"
    completions = [
        [{"role": "assistant", "content": "42."}],
        [{"role": "assistant", "content": "41."}],
    ]
    assert reward(prompts=[prompt, prompt], completions=completions, completion_ids=None) == [
        1.0,
        0.0,
    ]
    assert reply_text("42.") == "42."
    with pytest.raises(ValueError, match="plain-text prompt"):
        reward(prompts=["What is 12 + 30?"], completions=["42."])

    batched = Judge(name="len", score=len, score_batch=lambda ps, rs: [float(len(r)) for r in rs])
    assert reward_function(batched, "length")(prompts=[prompt], completions=["abc"]) == [3.0]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["stage.per_device_batch_size=6", "stage.num_generations=4"], "not a multiple of"),
        (["stage.reward=judge"], "stage.reward"),
        (["stage.num_generations=1"], "stage.num_generations"),
        (["stage.beta=-1"], "stage.beta"),
        (["stage.loss_type=ppo"], "stage.loss_type"),
    ],
)
def test_online_rl_knobs_are_checked_at_compose_time(compose_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_cfg("stage=grpo", *overrides))


def test_rloo_has_its_own_knobs_and_defaults(compose_cfg) -> None:
    cfg = validate_config(compose_cfg("stage=rloo", fast=False))
    assert cfg.stage.beta == 0.05 and cfg.stage.normalize_advantages is False
    assert validate_config(compose_cfg("stage=grpo", fast=False)).stage.beta == 0.04
    with pytest.raises(Exception, match=r"Could not override 'stage\.loss_type'"):
        compose_cfg("stage=rloo", "stage.loss_type=dapo")  # a GRPO knob, not an RLOO one


def test_online_rl_needs_the_tasks_prompts(compose_cfg, sft_runs, tmp_path) -> None:
    shutil.copytree(sft_runs("none"), tmp_path / "runs" / "toy" / "sft")
    with pytest.raises(ConfigError, match=r"data\.prompts\.source=none"):
        grpo.run(compose_cfg("stage=grpo", "data.prompts.source=none", *ONLINE_FAST))


def test_the_plan_names_the_reward_model_only_when_it_is_the_reward(compose_cfg) -> None:
    from stages.core.plan import build_plan

    assert build_plan(compose_cfg("stage=grpo")).missing_parents == ["sft"]
    assert build_plan(compose_cfg("stage=rloo", "stage.reward=rm")).missing_parents == ["sft", "rm"]


def test_grpo_logs_its_reward_and_kl_to_wandb(
    compose_cfg, sft_runs, tmp_path, length_judge, monkeypatch
) -> None:
    from tests.wandb_readback import offline_runs, read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    copy_run(sft_runs("none"), tmp_path / "runs", "sft")
    metrics = grpo.run(compose_cfg("stage=grpo", "tracking=wandb", *ONLINE_FAST))
    (path,) = offline_runs(tmp_path / "runs" / "toy" / "grpo")
    run = read_offline_run(path)
    assert run.job_type == "grpo" and run.state == "finished"
    # TRL's per-step metrics, as PPO logs objective/scores and objective/kl every update.
    assert len(run.series("train/reward")) == 4 and len(run.series("train/kl")) == 4
    assert len(run.series("train/rewards/task_reward/mean")) == 4
    assert run.summary["eval/accuracy"] == metrics["eval/accuracy"]
