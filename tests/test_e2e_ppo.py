"""End to end on the embedded default: SFT, reward model, then our PPO (slow).

The same recipe as `make sft rm ppo` (default configs), scored here from the saved final/
checkpoints with plain transformers and this suite's own judge, not the stages' own numbers.
"""

from __future__ import annotations

import json
import math

import pytest

from data_recipes import toy
from stages.core.handoff import MANIFEST
from stages.core.schema import ToyTaskConfig
from stages.ppo import recipe as ppo_stage
from stages.rm import recipe as rm
from tests.conftest import copy_run
from tests.plain_judge import plain_greedy_accuracy

pytestmark = pytest.mark.slow

# Measured on the default recipe: SFT 0.40, PPO 0.875 (kl_coef 1.0, T 0.3). The issue asks +0.15.
MIN_GAIN = 0.25


def test_make_sft_rm_ppo_improves_greedy_accuracy(compose_cfg, tmp_path, default_sft) -> None:
    copy_run(default_sft, tmp_path / "runs", "sft")
    rm_metrics = rm.run(compose_cfg("stage=rm", "tracking=none", fast=False))
    assert rm_metrics["eval/pairwise_accuracy"] >= 0.85, rm_metrics
    metrics = ppo_stage.run(compose_cfg("stage=ppo", "tracking=none", fast=False))
    runs = tmp_path / "runs" / "toy"

    pairs = [(p.a, p.b) for p in toy.eval_prompts(ToyTaskConfig())]
    sft_acc = plain_greedy_accuracy(runs / "sft" / "final", pairs)
    ppo_acc = plain_greedy_accuracy(runs / "ppo" / "final", pairs)
    assert ppo_acc == pytest.approx(metrics["compare/policy_accuracy"], abs=0.02)
    assert ppo_acc - sft_acc >= MIN_GAIN, (sft_acc, ppo_acc)

    # The RM's score of the policy's samples rose over the run, at a finite KL.
    assert metrics["train/objective_scores_last"] > metrics["train/objective_scores_first"] + 0.5
    assert math.isfinite(metrics["compare/kl_per_token"]) and metrics["compare/kl_per_token"] > 0
    manifest = json.loads((runs / "ppo" / MANIFEST).read_text())
    assert manifest["roles"]["layout"] == "separate"
    assert manifest["roles"]["reward"]["stage"] == "rm"
