"""End to end on the embedded default: SFT, then on-policy DPO, measurably aligns (slow).

The same recipe as `make sft dpo` (default configs), scored here from the saved final/
checkpoints with plain transformers and the rule judge, not with the stages' own numbers.
"""

from __future__ import annotations

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_recipes import toy
from stages import dpo, sft
from stages.core.handoff import MANIFEST
from stages.core.schema import ToyTaskConfig

pytestmark = pytest.mark.slow

# Measured on the default recipe: SFT 0.40 greedy held-out accuracy (it evades the hard
# prompts), DPO 0.98. The issue asks for +0.25; the bar leaves a margin for seeds and machines.
MIN_GAIN = 0.35


def _greedy_accuracy(final_dir, problems) -> float:
    model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(p.messages(), tokenize=False, add_generation_prompt=True)
        for p in problems
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    replies = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    return sum(toy.judge(p, r) for p, r in zip(problems, replies)) / len(problems)


def test_make_sft_dpo_improves_greedy_accuracy(compose_cfg, tmp_path) -> None:
    sft_metrics = sft.run(compose_cfg("tracking=none", fast=False))
    dpo_metrics = dpo.run(compose_cfg("stage=dpo", "tracking=none", fast=False))
    runs = tmp_path / "runs" / "toy"

    problems = toy.eval_prompts(ToyTaskConfig())
    sft_acc = _greedy_accuracy(runs / "sft" / "final", problems)
    dpo_acc = _greedy_accuracy(runs / "dpo" / "final", problems)
    assert sft_acc == pytest.approx(sft_metrics["eval/accuracy"], abs=0.02)
    assert dpo_acc == pytest.approx(dpo_metrics["compare/policy_accuracy"], abs=0.02)
    assert dpo_acc - sft_acc >= MIN_GAIN, (sft_acc, dpo_acc)

    manifest = json.loads((runs / "dpo" / MANIFEST).read_text())
    assert manifest["reference"]["kind"] == "sft_full_weights"
    assert manifest["data"]["stats"]["kept"] > 1000
    assert dpo_metrics["compare/kl_per_token"] > 0
