"""End to end on the embedded default: SFT, then on-policy KTO, measurably aligns (slow).

The same recipe as `make sft kto` (default configs), scored here from the saved final/
checkpoints with plain transformers and this suite's own judge, not the stages' own numbers.
"""

from __future__ import annotations

import json

import pytest

from data_recipes import toy
from stages.core.handoff import MANIFEST
from stages.core.schema import ToyTaskConfig
from stages.kto import recipe as kto
from tests.conftest import copy_run
from tests.plain_judge import plain_greedy_accuracy

pytestmark = pytest.mark.slow

# Measured on the default recipe: SFT 0.400 greedy held-out accuracy, KTO 0.795 (plain
# transformers, this judge). The issue asks for +0.20.
MIN_GAIN = 0.20


def test_make_sft_kto_improves_greedy_accuracy(compose_cfg, tmp_path, default_sft) -> None:
    copy_run(default_sft, tmp_path / "runs", "sft")
    kto_metrics = kto.run(compose_cfg("stage=kto", "tracking=none", fast=False))
    runs = tmp_path / "runs" / "toy"

    pairs = [(p.a, p.b) for p in toy.eval_prompts(ToyTaskConfig())]
    sft_acc = plain_greedy_accuracy(runs / "sft" / "final", pairs)
    kto_acc = plain_greedy_accuracy(runs / "kto" / "final", pairs)
    assert sft_acc == pytest.approx(kto_metrics["compare/parent_accuracy"], abs=0.02)
    assert kto_acc == pytest.approx(kto_metrics["compare/policy_accuracy"], abs=0.02)
    assert kto_acc - sft_acc >= MIN_GAIN, (sft_acc, kto_acc)

    manifest = json.loads((runs / "kto" / MANIFEST).read_text())
    assert manifest["reference"]["kind"] == "sft_full_weights"
    unpaired = manifest["data"]["unpaired"]
    assert unpaired["desirable"] == unpaired["undesirable"] == unpaired["pairs"] > 1000
    assert kto_metrics["compare/kl_per_token"] > 0
