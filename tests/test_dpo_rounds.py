"""Iterative (online) DPO, `stage.rounds`: each round samples fresh pairs from the current
policy, trains DPO against the SFT or the previous round's reference, is compared with SFT
and recorded; a failed round resumes without retraining the finished ones."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from stages.core import stage_pairs
from stages.core.handoff import DONE, FINAL, FINAL_RECORD, MANIFEST, METRICS, file_sha256
from stages.core.schema import ConfigError, validate_config
from stages.dpo import recipe as dpo
from stages.dpo import rounds as dpo_rounds
from tests.conftest import FIXTURES, REPO, copy_run, saved_tensors
from tests.wandb_readback import offline_runs, read_offline_run

# As tests/test_dpo.py: the 12-step SFT parent rarely answers right, so pair its samples
# with the correct answer.
PAIRS_FAST = [
    "data.pairs.num_prompts=48",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
]
ROUND_KEYS = {
    "round",
    "train_pairs",
    "heldout_pairs",
    "pairs_cache",
    "reference",
    "eval/accuracy",
    "compare/kl_per_sequence",
    "compare/kl_per_token",
    "train/reward_accuracy_last",
}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(live: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> bool:
    """Every saved tensor equals the live one (a model's state also holds tied weights that
    its saved file leaves out, such as the tiny model's lm_head)."""
    assert saved and saved.keys() <= live.keys(), saved.keys() - live.keys()
    return all(torch.equal(live[k], saved[k].to(live[k].dtype)) for k in saved)


def _record_sampling_policies(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """The weights of every policy that sampled on-policy pairs, in order."""
    seen: list[dict[str, torch.Tensor]] = []
    original = stage_pairs.generate_pairs

    def recording(policy, *args, **kwargs):
        seen.append(_state(policy))
        return original(policy, *args, **kwargs)

    monkeypatch.setattr(stage_pairs, "generate_pairs", recording)
    return seen


def _record_references(monkeypatch) -> list[dict[str, torch.Tensor] | None]:
    """The full-weight ``ref_model`` each DPOTrainer got (None: an adapter's frozen copy)."""
    seen: list[dict[str, torch.Tensor] | None] = []
    original_init = dpo.DPOTrainer.__init__

    def recording_init(self, *args, **kwargs):
        ref = kwargs.get("ref_model")
        seen.append(None if ref is None else _state(ref))
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(dpo.DPOTrainer, "__init__", recording_init)
    return seen


def _manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / MANIFEST).read_text())


def _cache_policy(record: dict) -> dict:
    stats = json.loads((Path(record["pairs_cache"]) / "stats.json").read_text())
    return stats["key_inputs"]["policy"]


def test_two_rounds_full_weights_sft_reference(compose_cfg, sft_runs, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    sft_dir = copy_run(sft_runs("none"), runs, "sft")
    samplers = _record_sampling_policies(monkeypatch)
    references = _record_references(monkeypatch)

    metrics = dpo.run(compose_cfg("stage=dpo", "stage.rounds=2", *PAIRS_FAST, "tracking=wandb"))
    run_dir = runs / "toy" / "dpo"
    assert (run_dir / DONE).is_file()
    manifest = _manifest(run_dir)
    rounds = manifest["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record.keys() >= ROUND_KEYS, ROUND_KEYS - record.keys()
        assert record["reference"] == "sft" and record["reference_policy"] == "sft"
        assert record["train_pairs"] > 0 and 0 <= record["eval/accuracy"] <= 1
    # Round 2's pairs: another cache key, sampled by round 1's saved policy (by weights).
    assert rounds[0]["pairs_cache"] != rounds[1]["pairs_cache"]
    assert _cache_policy(rounds[0])["manifest_sha256"] == file_sha256(sft_dir / MANIFEST)
    round1_files = json.loads((run_dir / "round-1" / "round.json").read_text())
    assert _cache_policy(rounds[1]) == {
        "stage": "dpo",
        "round": 1,
        "weights_sha256": round1_files["weights_sha256"],
        "kind": "full",
    }
    sft_weights = saved_tensors(sft_dir / FINAL)
    round1 = saved_tensors(run_dir / "round-1" / FINAL)
    final = saved_tensors(run_dir / FINAL)
    assert len(samplers) == 2
    assert _same(samplers[0], sft_weights) and _same(samplers[1], round1)
    # Each round changed the weights: SFT -> round 1 -> round 2 (= final/).
    assert not _same(round1, sft_weights) and not _same(final, round1)
    # Both rounds trained against the SFT policy.
    assert len(references) == 2 and all(_same(r, sft_weights) for r in references)

    # The stage's comparison is the last round's; metrics.json has every round flat.
    assert metrics["eval/accuracy"] == rounds[1]["eval/accuracy"]
    assert metrics["compare/kl_per_sequence"] == rounds[1]["compare/kl_per_sequence"]
    on_disk = json.loads((run_dir / METRICS).read_text())
    for record in rounds:
        r = record["round"]
        assert on_disk[f"round{r}/accuracy"] == record["eval/accuracy"]
        assert on_disk[f"round{r}/kl_per_sequence"] == record["compare/kl_per_sequence"]
        assert on_disk[f"round{r}/train_pairs"] == record["train_pairs"]
    assert rounds[0]["compare/kl_per_sequence"] > 0  # round 1's policy moved away from SFT
    assert manifest["reference"]["round_reference"] == "sft"
    # W&B (offline): one point per round, next to the trainers' own logs.
    (wandb_run,) = [read_offline_run(p) for p in offline_runs(run_dir)]
    assert wandb_run.series("round") == [1, 2]
    assert wandb_run.series("round/accuracy") == [r["eval/accuracy"] for r in rounds]
    assert wandb_run.series("round/kl_per_sequence") == pytest.approx(
        [r["compare/kl_per_sequence"] for r in rounds]
    )
    assert wandb_run.series("train/loss"), "the trainers still log to the same run"


class _FailInRound2(TrainerCallback):
    """Kills round 2 after its checkpoint-6: a crash mid-round."""

    def on_step_begin(self, args, state, control, **kwargs):
        if Path(args.output_dir).name == "round-2" and state.global_step == 6:
            raise RuntimeError("injected failure in round 2")


def test_previous_reference_and_resume_after_a_failed_round(
    compose_cfg, sft_runs, tmp_path, monkeypatch
):
    runs = tmp_path / "runs"
    copy_run(sft_runs("none"), runs, "sft")
    references = _record_references(monkeypatch)
    trained: list[str] = []
    original_train = dpo_rounds.train_resumably

    def counting_train(stage, trainer, **kwargs):
        trained.append(Path(trainer.args.output_dir).name)
        trainer.add_callback(_FailInRound2())
        return original_train(stage, trainer, **kwargs)

    monkeypatch.setattr(dpo_rounds, "train_resumably", counting_train)
    overrides = ("stage=dpo", "stage.rounds=2", "stage.round_reference=previous", *PAIRS_FAST)
    with pytest.raises(RuntimeError, match="injected failure in round 2"):
        dpo.run(compose_cfg(*overrides))
    run_dir = runs / "toy" / "dpo"
    assert trained == ["dpo", "round-2"]
    assert not (run_dir / DONE).exists() and not (run_dir / FINAL).exists()
    round1_dir = run_dir / "round-1"
    round1_bytes = {p: p.read_bytes() for p in sorted(round1_dir.rglob("*")) if p.is_file()}
    assert (round1_dir / "round.json") in round1_bytes
    assert (run_dir / "round-2" / "checkpoint-6").is_dir()

    # The rerun keeps round 1 (not retrained, its files untouched) and resumes round 2.
    trained.clear()
    references.clear()
    monkeypatch.setattr(_FailInRound2, "on_step_begin", lambda *a, **k: None)
    dpo.run(compose_cfg(*overrides))
    assert trained == ["round-2"]
    assert {p: p.read_bytes() for p in round1_bytes} == round1_bytes
    final_record = json.loads((run_dir / FINAL_RECORD).read_text())
    assert final_record["resumed_from"] == str(run_dir / "round-2" / "checkpoint-6")
    # With `previous`, round 2's reference is round 1's policy, by weights.
    round1 = saved_tensors(round1_dir / FINAL)
    (reference,) = references
    assert reference is not None and _same(reference, round1)
    rounds = _manifest(run_dir)["rounds"]
    assert [r["reference_policy"] for r in rounds] == ["sft", "round-1"]
    assert [r["reference"] for r in rounds] == ["previous", "previous"]
    assert not _same(saved_tensors(run_dir / FINAL), round1)


def test_two_rounds_lora_keep_the_sft_adapter_as_reference(
    compose_cfg, sft_runs, tmp_path, monkeypatch
):
    """TRL copies the adapter it trains (round 1's) into "ref": with round_reference=sft the
    SFT adapter is put back before round 2 trains, never round 1's nor the bare base."""
    runs = tmp_path / "runs"
    sft_dir = copy_run(sft_runs("lora"), runs, "sft")
    at_start: list[tuple[dict, dict]] = []
    original_train = dpo_rounds.train_resumably

    def snapshot(stage, trainer, **kwargs):
        params = dict(trainer.model.named_parameters())
        adapter = {  # keys as in the saved adapter file
            name.replace(".default", ""): p.detach().clone()
            for name, p in params.items()
            if ".default." in name
        }
        ref = {
            name.replace(".ref", ""): p.detach().clone()
            for name, p in params.items()
            if ".ref." in name
        }
        at_start.append((adapter, ref))
        return original_train(stage, trainer, **kwargs)

    monkeypatch.setattr(dpo_rounds, "train_resumably", snapshot)
    dpo.run(compose_cfg("stage=dpo", "peft=lora", "stage.rounds=2", *PAIRS_FAST))
    run_dir = runs / "toy" / "dpo"
    sft_adapter = saved_tensors(sft_dir / FINAL)
    round1_adapter = saved_tensors(run_dir / "round-1" / FINAL)
    assert not _same(round1_adapter, sft_adapter)
    (adapter1, ref1), (adapter2, ref2) = at_start
    assert _same(adapter1, sft_adapter) and _same(ref1, sft_adapter)
    # Round 2 continues round 1's adapter, against the SFT adapter as reference.
    assert _same(adapter2, round1_adapter) and _same(ref2, sft_adapter)
    manifest = _manifest(run_dir)
    assert manifest["reference"]["kind"] == "sft_adapter_restored_each_round"
    assert [r["round"] for r in manifest["rounds"]] == [1, 2]
    assert not (run_dir / FINAL / "ref").exists()


def test_one_round_keeps_the_plain_dpo_manifest(compose_cfg, sft_runs, tmp_path) -> None:
    runs = tmp_path / "runs"
    copy_run(sft_runs("none"), runs, "sft")
    metrics = dpo.run(compose_cfg("stage=dpo", *PAIRS_FAST))
    run_dir = runs / "toy" / "dpo"
    manifest = _manifest(run_dir)
    # The manifest of plain DPO before stage.rounds existed: the same keys, nothing per round.
    assert set(manifest) == {
        "stage", "experiment", "variant", "parent", "upstream", "base_model", "kind",
        "config", "fingerprint", "final_sha256", "data", "seed", "precision", "world_size",
        "resumed_from", "final_reused", "versions", "git", "timings", "reference", "metrics",
    }  # fmt: skip
    assert manifest["reference"]["kind"] == "sft_full_weights"
    assert not any(k.startswith("round") for k in metrics)
    assert not list(run_dir.glob("round-*"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["data.pairs.source=file", f"data.pairs.path={FIXTURES / 'pref_hh_rlhf.jsonl'}"],
            "data.pairs.source=file has nothing new to sample",
        ),
        (["stage.round_reference=parent"], "stage.round_reference='parent' is not one of"),
        (["stage.parent_adapter=merge", "peft=lora"], "stage.parent_adapter=continue"),
        (
            ["peft=lora", "stage.precompute_ref_log_probs=true"],
            "Use stage.precompute_ref_log_probs=false, stage.round_reference=previous",
        ),
    ],
)
def test_rounds_config_conflicts_fail_at_validation(compose_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(compose_cfg("stage=dpo", "stage.rounds=2", *overrides))


def test_rounds_bounds_and_the_file_conflict_through_the_cli(compose_cfg, tmp_path) -> None:
    with pytest.raises(ConfigError, match=re.escape("stage.rounds=0")):
        validate_config(compose_cfg("stage=dpo", "stage.rounds=0"))
    pairs = FIXTURES / "pref_hh_rlhf.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "stages", "stage=dpo", "stage.rounds=3", "data.pairs.source=file",
         f"data.pairs.path={pairs}", f"paths.runs_root={tmp_path / 'runs'}", "tracking=none"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "WANDB_MODE": "offline"},
    )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stage.rounds=3 samples fresh on-policy pairs" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_later_rounds_train_at_most_round_max_epochs_of_their_pairs(tmp_path) -> None:
    from trl import DPOConfig

    args = DPOConfig(
        output_dir=str(tmp_path),
        max_steps=300,
        per_device_train_batch_size=32,
        use_cpu=True,
        bf16=False,
    )
    # 198 pairs (a mostly-right policy leaves few untied prompts): 3 epochs = 19 steps, not 300.
    assert dpo_rounds.round_steps(args, 198, 3.0) == 19
    assert dpo_rounds.round_steps(args, 5000, 3.0) == 300  # max_steps still caps
    assert dpo_rounds.round_steps(args, 1, 0.5) == 1


def _pair(a: int, chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {a} + 1?"}], "chosen": chosen,
            "rejected": rejected}  # fmt: skip


def test_accumulated_rounds_train_on_every_rounds_pairs_once(tmp_path) -> None:
    from types import SimpleNamespace

    from data_recipes.pairs import PairSet
    from stages.core.handoff import HandoffError

    first = PairSet([_pair(1, "2.", "3."), _pair(2, "3.", "4.")], [_pair(9, "10.", "11.")])
    inputs = SimpleNamespace(first_pairs=first, tokenizer=None)
    # Round 2's fresh pairs: one new, one already trained in round 1, one on a prompt that
    # round 1 held out (its held-out pairs score every round, so it is never trained on).
    fresh = PairSet(
        [_pair(5, "6.", "7."), _pair(1, "2.", "3."), _pair(9, "10.", "12.")], [], {"r": 2}
    )
    merged = dpo_rounds.with_earlier_pairs(SimpleNamespace(cfg=None), inputs, [{}], fresh)
    assert merged.train == [_pair(5, "6.", "7."), _pair(1, "2.", "3."), _pair(2, "3.", "4.")]
    assert merged.info == {"r": 2}  # the fresh set's cache and account stay the round's

    gone = {"record": {"round": 2, "pairs_cache": str(tmp_path / "gone")}}
    with pytest.raises(HandoffError, match="round 2's pairs"):
        dpo_rounds.with_earlier_pairs(SimpleNamespace(cfg=None), inputs, [{}, gone], fresh)
