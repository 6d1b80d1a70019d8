"""The PPO stage end to end on tiny parents: SFT -> RM -> 2 PPO updates, for full weights,
LoRA and QLoRA (one shared 4-bit base).

Each test copies a short SFT run and trains a short RM on it (pairs from a small HH-RLHF
fixture file, so no sampling is needed), then runs `stages.ppo.recipe.run`. It checks what a
user relies on: DONE + manifest, the policy's weights moved away from the SFT weights, the
SFT output (the reference) is untouched, final/ reloads with plain transformers / peft and
regenerates the recorded eval replies, and bad wiring fails before any training.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.core.handoff import DONE, MANIFEST, HandoffError, file_sha256
from stages.core.schema import ConfigError
from stages.ppo import recipe as ppo_stage
from stages.rm import recipe as rm
from tests.conftest import FIXTURES

RM_PAIRS = [
    "data.pairs.source=file",
    f"data.pairs.path={FIXTURES / 'pref_hh_rlhf.jsonl'}",
    "data.pairs.heldout_fraction=0.3",
]
# Two updates of 8 prompts, short replies: seconds on 2 cores, still every code path.
PPO_SMOKE = [
    "stage=ppo",
    "tracking=none",
    "data.toy.num_eval=16",
    "stage.total_updates=2",
    "stage.rollout_batch_size=8",
    "stage.num_minibatches=2",
    "stage.num_ppo_epochs=2",
    "stage.response_length=8",
    "stage.num_prompts=64",
    "stage.learning_rate=1e-3",
    "stage.save_steps=1",
]


def _tree_sha(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.fixture
def parents(compose_cfg, sft_runs, tmp_path):
    """parents(peft) -> (sft_dir, rm_dir): a short SFT copy and a short RM trained on it."""

    def make(peft: str) -> tuple[Path, Path]:
        sft_dir = tmp_path / "runs" / "toy" / "sft"
        shutil.copytree(sft_runs(peft), sft_dir)
        rm.run(compose_cfg("stage=rm", f"peft={peft}", *RM_PAIRS))
        return sft_dir, tmp_path / "runs" / "toy" / "rm"

    return make


def _plain_policy(final: Path, kind: str) -> torch.nn.Module:
    if kind == "full":
        return AutoModelForCausalLM.from_pretrained(final).eval()
    return AutoPeftModelForCausalLM.from_pretrained(final).eval()


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_ppo_smoke_moves_the_policy_not_the_reference(compose_cfg, parents, tmp_path, peft):
    sft_dir, _ = parents(peft)
    sft_before = _tree_sha(sft_dir / "final")

    metrics = ppo_stage.run(compose_cfg(*PPO_SMOKE, f"peft={peft}", fast=False))

    run_dir = tmp_path / "runs" / "toy" / "ppo"
    assert (run_dir / DONE).is_file()
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["kind"] == {"none": "full"}.get(peft, peft)
    assert manifest["parent"]["stage"] == "sft"
    assert manifest["roles"]["layout"] == ("shared_4bit_base" if peft == "qlora" else "separate")
    assert metrics["train/updates"] == 2
    for key in ("objective/kl", "objective/scores", "policy/clipfrac", "loss/value"):
        assert torch.isfinite(torch.tensor(metrics[f"train/{key.replace('/', '_')}_last"]))
    assert torch.isfinite(torch.tensor(metrics["compare/kl_per_token"]))
    assert (run_dir / "checkpoint-2").is_dir()  # resumable like every stage

    # The reference (the SFT output) is untouched; the policy moved away from it.
    assert _tree_sha(sft_dir / "final") == sft_before
    trained = _weights(run_dir / "final")
    if peft == "none":
        sft_weights = _weights(sft_dir / "final")
        moved = [k for k in sft_weights if not torch.equal(sft_weights[k], trained[k])]
        assert moved, "no policy weight changed in 2 PPO updates"
    else:  # lora / qlora: the policy continued the SFT adapter, whose tensors changed
        sft_weights = _weights(sft_dir / "final")
        assert sft_weights.keys() == trained.keys()
        assert any(not torch.equal(sft_weights[k], trained[k]) for k in sft_weights)
    if peft == "qlora":  # one 4-bit base for the four roles, reference = frozen SFT adapter
        assert manifest["roles"]["reference"] == "sft_adapter_frozen_copy"
        assert manifest["roles"]["adapters"] == ["policy", "ref", "reward", "value"]

    # final/ reloads with plain libraries and regenerates the recorded eval replies.
    model = _plain_policy(run_dir / "final", manifest["kind"])
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").open()][:4]
    assert samples
    for sample in samples:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample["prompt"]}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        reply = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert reply == sample["reply"]


def test_ppo_rejects_a_reward_model_of_another_sft(compose_cfg, parents, tmp_path) -> None:
    parents("none")
    manifest_path = tmp_path / "runs" / "toy" / "rm" / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["parent"]["manifest_sha256"] = "0" * 64  # as if SFT was re-run after the RM
    manifest_path.write_text(json.dumps(manifest))
    # ... and the RM finished again so (DONE records its manifest's sha256).
    (manifest_path.parent / DONE).write_text(
        json.dumps({"manifest_sha256": file_sha256(manifest_path)})
    )
    with pytest.raises(
        HandoffError, match=r"trained on another SFT.*make rm EXP=toy ARGS=\"?force=true"
    ):
        ppo_stage.run(compose_cfg(*PPO_SMOKE, fast=False))
    assert not (tmp_path / "runs" / "toy" / "ppo" / DONE).exists()


def test_ppo_needs_its_reward_model_stage(compose_cfg, sft_runs, tmp_path) -> None:
    shutil.copytree(sft_runs("none"), tmp_path / "runs" / "toy" / "sft")
    with pytest.raises(HandoffError, match="make rm EXP=toy"):
        ppo_stage.run(compose_cfg(*PPO_SMOKE, fast=False))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("stage.max_steps=10", "stage.total_updates"),
        ("stage.per_device_batch_size=4", "stage.rollout_batch_size"),
        ("stage.rollout_batch_size=9", "divisible"),
        ("stage.kl_estimator=k2", "stage.kl_estimator"),
    ],
)
def test_trainer_knobs_that_are_not_ppo_knobs_fail_naming_the_twin(compose_cfg, override, message):
    with pytest.raises(ConfigError, match=message):
        ppo_stage.run(compose_cfg(*PPO_SMOKE, override, fast=False))
