"""End to end on the embedded default: SFT, then on-policy DPO, measurably aligns (slow).

The same recipe as `make sft dpo` (default configs), scored here from the saved final/
checkpoints with plain transformers and this suite's own judge, not the stages' own numbers.
"""

from __future__ import annotations

import json

import pytest

from data_recipes import toy
from stages.core.handoff import MANIFEST
from stages.core.schema import ToyTaskConfig
from stages.dpo import recipe as dpo
from tests.conftest import copy_run
from tests.plain_judge import plain_greedy_accuracy

pytestmark = pytest.mark.slow

# Measured on the default recipe: SFT 0.40 greedy held-out accuracy (it evades the hard
# prompts), DPO 0.955. The issue asks for +0.25; the bar leaves a margin for seeds and machines.
MIN_GAIN = 0.35


def test_make_sft_dpo_improves_greedy_accuracy(compose_cfg, tmp_path, default_sft) -> None:
    copy_run(default_sft, tmp_path / "runs", "sft")
    dpo_metrics = dpo.run(compose_cfg("stage=dpo", "tracking=none", fast=False))
    runs = tmp_path / "runs" / "toy"

    pairs = [(p.a, p.b) for p in toy.eval_prompts(ToyTaskConfig())]
    sft_acc = plain_greedy_accuracy(runs / "sft" / "final", pairs)
    dpo_acc = plain_greedy_accuracy(runs / "dpo" / "final", pairs)
    assert sft_acc == pytest.approx(dpo_metrics["compare/parent_accuracy"], abs=0.02)
    assert dpo_acc == pytest.approx(dpo_metrics["compare/policy_accuracy"], abs=0.02)
    assert dpo_acc - sft_acc >= MIN_GAIN, (sft_acc, dpo_acc)

    manifest = json.loads((runs / "dpo" / MANIFEST).read_text())
    assert manifest["reference"]["kind"] == "sft_full_weights"
    assert manifest["data"]["stats"]["kept"] > 1000
    assert dpo_metrics["compare/kl_per_token"] > 0
