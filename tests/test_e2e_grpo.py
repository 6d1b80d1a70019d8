"""End to end on the embedded default: SFT, then GRPO on the rule judge (a verifiable reward,
no reward model), measurably aligns (slow).

The same recipe as `make sft grpo` (default configs), scored here from the saved final/
checkpoints with plain transformers and this suite's own judge, not the stages' own numbers.
"""

from __future__ import annotations

import json

import pytest

from data_recipes import toy
from stages.core.handoff import MANIFEST
from stages.core.schema import ToyTaskConfig
from stages.grpo import recipe as grpo
from tests.conftest import copy_run
from tests.plain_judge import plain_greedy_accuracy

pytestmark = pytest.mark.slow

# Measured on the default recipe: SFT 0.400 greedy held-out accuracy, GRPO 0.920 (the stages'
# own eval; docs/tuning.md). The issue asks for +0.45.
MIN_GAIN = 0.45


def test_make_sft_grpo_improves_greedy_accuracy(compose_cfg, tmp_path, default_sft) -> None:
    copy_run(default_sft, tmp_path / "runs", "sft")
    metrics = grpo.run(compose_cfg("stage=grpo", "tracking=none", fast=False))
    runs = tmp_path / "runs" / "toy"

    pairs = [(p.a, p.b) for p in toy.eval_prompts(ToyTaskConfig())]
    sft_acc = plain_greedy_accuracy(runs / "sft" / "final", pairs)
    grpo_acc = plain_greedy_accuracy(runs / "grpo" / "final", pairs)
    assert sft_acc == pytest.approx(metrics["compare/parent_accuracy"], abs=0.02)
    assert grpo_acc == pytest.approx(metrics["compare/policy_accuracy"], abs=0.02)
    assert grpo_acc - sft_acc >= MIN_GAIN, (sft_acc, grpo_acc)

    # What it optimised rose, against the SFT reference, from the rule judge alone.
    assert metrics["train/reward_last"] > metrics["train/reward_first"]
    manifest = json.loads((runs / "grpo" / MANIFEST).read_text())
    assert manifest["reward"] == {"source": "task", "task": "toy"}
    assert manifest["reference"]["kind"] == "sft_full_weights"
    assert "rm" not in (manifest.get("upstream") or {})
    assert metrics["compare/kl_per_token"] > 0
