"""Reward-model stage on the tiny model: full / LoRA / QLoRA train a scorer that reloads.

Each RM trains on a short SFT parent (trained once per peft kind per session and copied into
every test's runs root). final/ is reloaded here with plain transformers/peft, the held-out
pairs are tokenised with the chat template by this file's own code, and the rewards must
match what the stage recorded with its scorer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from stages.core.handoff import DONE, MANIFEST, METRICS, HandoffError, resolve_parent
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.reward_scoring import (
    RewardScorer,
    encode_reply,
    load_reward_model,
    reward_model_judge,
)
from stages.core.runtime import resolve_precision
from stages.core.schema import ConfigError, validate_config
from stages.rm import recipe as rm
from tests.conftest import FIXTURES, copy_run, saved_tensors

HH_PAIRS = FIXTURES / "pref_hh_rlhf.jsonl"
# Held-out share big enough that the 38 fixture pairs leave ~10 to score.
FILE_PAIRS = [
    "data.pairs.source=file",
    f"data.pairs.path={HH_PAIRS}",
    "data.pairs.heldout_fraction=0.3",
]
KIND = {"none": "full", "lora": "lora", "qlora": "qlora"}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def rm_cfg(compose_cfg, sft_runs, tmp_path) -> Callable[..., object]:
    """rm_cfg(peft, *overrides) -> an RM config whose SFT parent (same peft) is in place."""

    def make(peft: str, *overrides: str, experiment: str = "toy"):
        target = tmp_path / "runs" / experiment / "sft"
        if not target.exists():
            shutil.copytree(sft_runs(peft), target)
        return compose_cfg("stage=rm", f"peft={peft}", f"experiment_name={experiment}", *overrides)

    return make


def _rm_dir(tmp_path: Path, experiment: str = "toy") -> Path:
    return tmp_path / "runs" / experiment / "rm"


def _score_head(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    heads = [v for k, v in tensors.items() if k.endswith("score.weight")]
    assert len(heads) == 1, sorted(tensors)
    return heads[0].float()


# ------------------------------------------------------------ plain transformers / peft


def plain_reward_model(final: Path, kind: str) -> torch.nn.Module:
    """final/ loaded without alignpipe: what a user of the checkpoint would write. An adapter's
    base is a causal LM (num_labels=1 sizes its new head like the saved one); a QLoRA adapter
    points at a saved 4-bit copy of its base, so the same call rebuilds it."""
    if kind == "full":
        return AutoModelForSequenceClassification.from_pretrained(final).eval()
    return AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=1).eval()


def plain_rewards(model: torch.nn.Module, final: Path, rows: list[dict]) -> list[tuple]:
    """(r(chosen), r(rejected)) per row, one unpadded conversation at a time."""
    tokenizer = AutoTokenizer.from_pretrained(final)
    out = []
    for row in rows:
        pair = []
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(
                row["prompt"] + row[side], return_tensors="pt", return_dict=True
            )
            with torch.no_grad():
                pair.append(float(model(**ids).logits[0, 0]))
        out.append(tuple(pair))
    return out


# --------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_rm_trains_and_final_reloads_with_plain_libraries(rm_cfg, tmp_path, sft_runs, peft):
    metrics = rm.run(rm_cfg(peft, *FILE_PAIRS))
    run_dir = _rm_dir(tmp_path)
    kind = KIND[peft]

    # It learned: the Bradley-Terry loss fell.
    assert metrics["train/loss_last"] < metrics["train/loss_first"], metrics

    # Handoff contract, and the held-out evaluation is reported.
    for name in ("final", METRICS, MANIFEST, DONE):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["stage"] == "rm" and manifest["parent"]["stage"] == "sft"
    assert manifest["kind"] == kind and manifest["data"]["recipe"] == "file"
    assert manifest["metrics"] == json.loads((run_dir / METRICS).read_text())
    heldout = [json.loads(line) for line in (run_dir / rm.HELDOUT_REWARDS).open()]
    assert heldout and metrics["eval/heldout_pairs"] == len(heldout)
    assert 0.0 <= metrics["eval/pairwise_accuracy"] <= 1.0
    assert sum(manifest["reward_margins"]["counts"]) == len(heldout)
    for stat in ("mean", "std", "p10", "p50", "p90", "frac_negative"):
        assert f"eval/margin_{stat}" in metrics
    assert metrics["eval/margin_p10"] <= metrics["eval/margin_p50"] <= metrics["eval/margin_p90"]

    # Parameters changed, and final/ holds the trained score head.
    final = saved_tensors(run_dir / "final")
    mid = saved_tensors(run_dir / "checkpoint-6")
    assert not torch.equal(_score_head(final), _score_head(mid)), "the score head must train"
    if kind == "full":
        parent = saved_tensors(sft_runs(peft) / "final")
        body = [k for k in final if k != "score.weight"]
        moved = [k for k in body if not torch.equal(final[k], parent[k])]
        assert len(moved) == len(body), "every full-weight tensor should move"
    else:
        lora_b = [v for k, v in final.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at 0"
        config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
        assert config["task_type"] == "SEQ_CLS"
        assert Path(config["base_model_name_or_path"]).is_dir()

    # Plain transformers/peft reproduce the rewards the stage recorded with its scorer.
    model = plain_reward_model(run_dir / "final", kind)
    plain = plain_rewards(model, run_dir / "final", heldout)
    recorded = [(r["reward_chosen"], r["reward_rejected"]) for r in heldout]
    tolerance = 5e-2 if kind == "qlora" else 1e-4  # bf16 compute on a 4-bit base
    assert torch.allclose(torch.tensor(plain), torch.tensor(recorded), atol=tolerance)
    wins = [a > b for a, b in plain]
    assert sum(wins) / len(wins) == pytest.approx(metrics["eval/pairwise_accuracy"])

    # ... and so does the scorer that PPO and the reward-model judge use.
    cfg = validate_config(rm_cfg(peft, *FILE_PAIRS))
    stage = resolve_parent(cfg.paths.runs_root, "toy", "rm", child="ppo")
    scorer = RewardScorer.from_stage(stage, cfg.model, resolve_precision("auto"))
    chosen, rejected = scorer.score_pairs(heldout)
    assert torch.allclose(
        torch.tensor(list(zip(chosen, rejected))), torch.tensor(recorded), atol=tolerance
    )


def test_scorer_tokenises_like_reward_trainer(compose_cfg, tmp_path) -> None:
    """encode_reply gives exactly the ids RewardTrainer trains on (chat and plain text)."""
    cfg = validate_config(compose_cfg())
    tokenizer = load_tokenizer(resolve_base_model(cfg.model, cfg.paths).path, cfg.model)
    rows = {
        "conversational": [
            {
                "prompt": [{"role": "user", "content": "What is 23 + 45?"}],
                "chosen": [{"role": "assistant", "content": "68."}],
                "rejected": [{"role": "assistant", "content": "i do not know."}],
            }
        ],
        "standard": [{"prompt": "What is 1 + 2? ", "chosen": "3.", "rejected": "4."}],
    }
    args = RewardConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        report_to=[],
        activation_checkpointing=False,
    )
    for fmt, data in rows.items():
        # The trainer's own preprocessing, without building a model.
        prepared = RewardTrainer._prepare_dataset(
            None, Dataset.from_list(data), tokenizer, args, fmt
        )
        for row, trl_row in zip(data, prepared):
            for side in ("chosen", "rejected"):
                reply = row[side] if fmt == "standard" else row[side][0]["content"]
                assert encode_reply(tokenizer, row["prompt"], reply) == trl_row[f"{side}_ids"]


def test_reward_and_value_models_for_ppo(rm_cfg, tmp_path) -> None:
    """PPO loads the RM twice: a frozen reward role and a trainable, independent value copy."""
    rm.run(rm_cfg("lora", *FILE_PAIRS))
    cfg = validate_config(rm_cfg("lora", *FILE_PAIRS))
    stage = resolve_parent(cfg.paths.runs_root, "toy", "rm", child="ppo")
    precision = resolve_precision("auto")
    reward = load_reward_model(stage, cfg.model, precision)
    value = load_reward_model(stage, cfg.model, precision, trainable=True)
    assert not any(p.requires_grad for p in reward.parameters()) and not reward.training
    trainable = [n for n, p in value.named_parameters() if p.requires_grad]
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)

    tokenizer = AutoTokenizer.from_pretrained(stage.final_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 34?"}, {"role": "assistant", "content": "46."}],
        return_tensors="pt", return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        before = float(reward(**ids).logits[0, 0])
        assert float(value.eval()(**ids).logits[0, 0]) == pytest.approx(before, abs=1e-5)
        for param in value.parameters():
            if param.requires_grad:
                param.add_(0.1)
        assert float(reward(**ids).logits[0, 0]) == before, "the copies must not share weights"

    # The reward-model judge for pair generation: one float per reply, named by the RM.
    judge = reward_model_judge(stage, cfg.model, precision)
    prompts = [[{"role": "user", "content": "What is 12 + 34?"}]] * 2
    scores = judge.score_all(prompts, ["46.", "i do not know."])
    assert len(scores) == 2 and all(isinstance(s, float) for s in scores)
    assert scores[0] == pytest.approx(before, abs=1e-5)
    assert judge.name == f"reward_model:{stage.manifest_sha256}"


def test_rm_on_policy_pairs_and_toy_probe(rm_cfg) -> None:
    """Pairs sampled from the SFT policy and judged by rule; the probe scores held-out prompts.
    The 12-step SFT parent is never right, so the chosen side is the correct answer."""
    metrics = rm.run(
        rm_cfg(
            "none",
            "data.pairs.strategy=ground_truth_vs_sample",
            "data.pairs.num_prompts=48",
            "data.pairs.samples_per_prompt=4",
            "data.pairs.heldout_fraction=0.25",
        )
    )
    assert metrics["train/pairs"] > 0 and metrics["eval/heldout_pairs"] > 0
    for kind in ("evasive", "off_by_1", "off_by_10"):
        assert 0.0 <= metrics[f"eval/probe_vs_{kind}"] <= 1.0


def _margin_file(path: Path, margin: float | None) -> Path:
    with path.open("w") as handle:
        for line in HH_PAIRS.read_text().splitlines():
            row = json.loads(line)
            if margin is not None:
                row["margin"] = margin
            handle.write(json.dumps(row) + "\n")
    return path


def test_margin_column_is_used_only_when_asked(rm_cfg, tmp_path) -> None:
    """With margin m the loss is -log sigmoid(r_c - r_r - m): ~log(1 + e^m) before training."""
    pairs = _margin_file(tmp_path / "margin.jsonl", 4.0)
    common = ["data.pairs.source=file", f"data.pairs.path={pairs}", "stage.max_steps=2",
              "stage.logging_steps=1", "stage.learning_rate=1e-6"]  # fmt: skip
    used = rm.run(rm_cfg("none", *common, "stage.use_margin=true", experiment="used"))
    ignored = rm.run(rm_cfg("none", *common, "stage.use_margin=false", experiment="ignored"))
    assert used["train/loss_first"] > 3.0  # log(1 + e^4) = 4.02 at r_c ~ r_r
    assert ignored["train/loss_first"] < 1.0  # log 2 = 0.69


def test_head_learning_rate_is_separate_from_the_body(rm_cfg, tmp_path, sft_runs) -> None:
    """A body LR of ~0 keeps the SFT weights; the head still trains at its own LR."""
    rm.run(
        rm_cfg("none", *FILE_PAIRS, "stage.learning_rate=1e-12", "stage.head_learning_rate=1e-2")
    )
    final = saved_tensors(_rm_dir(tmp_path) / "final")
    parent = saved_tensors(sft_runs("none") / "final")
    body_shift = max(float((final[k] - parent[k]).abs().max()) for k in final if k in parent)
    assert body_shift < 1e-6
    head_shift = _score_head(final) - _score_head(saved_tensors(_rm_dir(tmp_path) / "checkpoint-6"))
    assert float(head_shift.abs().max()) > 1e-3


def test_use_margin_without_margins_fails_clearly(rm_cfg, tmp_path) -> None:
    pairs = _margin_file(tmp_path / "no_margin.jsonl", None)
    cfg = rm_cfg("none", "data.pairs.source=file", f"data.pairs.path={pairs}",
                 "stage.use_margin=true")  # fmt: skip
    with pytest.raises(ConfigError, match="use_margin"):
        rm.run(cfg)
    assert not (_rm_dir(tmp_path) / DONE).exists()


def test_bad_inputs_fail_clearly(rm_cfg, tmp_path) -> None:
    cfg = validate_config(rm_cfg("none"))
    sft_stage = resolve_parent(cfg.paths.runs_root, "toy", "sft", child="ppo")
    with pytest.raises(HandoffError, match="not a reward model"):
        load_reward_model(sft_stage, cfg.model, resolve_precision("auto"))
    tokenizer = AutoTokenizer.from_pretrained(sft_stage.final_dir)
    with pytest.raises(ValueError, match="string reply"):
        encode_reply(tokenizer, "What is 1 + 2?", [{"role": "assistant", "content": "3."}])
    with pytest.raises(ConfigError, match="judge"):
        rm.run(rm_cfg("none", "data.pairs.judge=reward_model"))


@pytest.mark.slow
def test_default_sft_then_rm_reaches_heldout_accuracy(compose_cfg, tmp_path, default_sft):
    """`make sft rm` on the embedded default (tracking off): held-out accuracy >= 0.85."""
    copy_run(default_sft, tmp_path / "runs", "sft")
    metrics = rm.run(compose_cfg("stage=rm", "tracking=none", fast=False))
    # ~1.8k pairs kept of 3000 prompts (all-tie prompts dropped), 5 % held out: 92 measured.
    assert metrics["eval/heldout_pairs"] >= 80
    assert metrics["eval/pairwise_accuracy"] >= 0.85, metrics
