"""The embedded toy task: split, demonstration mix, judge."""

from __future__ import annotations

import pytest

from data_recipes import toy
from stages.core.schema import ToyTaskConfig


def test_train_and_eval_prompts_are_disjoint_and_seeded() -> None:
    cfg = ToyTaskConfig(num_train=5000, num_eval=300)
    train = {(p.a, p.b) for p in toy.problems(cfg, "train")}
    held_out = {(p.a, p.b) for p in toy.eval_prompts(cfg)}
    assert len(held_out) == 300 and not train & held_out
    assert toy.eval_prompts(cfg) == toy.eval_prompts(ToyTaskConfig(num_train=10, num_eval=300))
    assert (
        toy.problems(cfg, "train")[:50]
        != toy.problems(ToyTaskConfig(num_train=5000, train_seed=9), "train")[:50]
    )


def test_demonstrations_follow_the_configured_mix() -> None:
    cfg = ToyTaskConfig(num_train=4000, num_reversal_train=0)
    rows = toy.sft_dataset(cfg)
    kinds = {"correct": 0, "evasive": 0, "near": 0}
    for row in rows:
        problem = toy.parse_prompt(row["messages"][:1])
        reply = row["messages"][1]["content"]
        if reply == toy.EVASIVE_REPLY:
            kinds["evasive"] += 1
        elif toy.judge(problem, reply):
            kinds["correct"] += 1
        else:
            assert abs(toy.first_integer(reply) - problem.answer) in (1, 10)
            kinds["near"] += 1
    # ~60% of prompts are hard: 0.4 * 0.85 + 0.6 * 0.30 correct, 0.6 * 0.55 evasive.
    assert kinds["correct"] / 4000 == pytest.approx(0.52, abs=0.03)
    assert kinds["evasive"] / 4000 == pytest.approx(0.33, abs=0.03)
    assert kinds["near"] / 4000 == pytest.approx(0.15, abs=0.03)
    assert toy.sft_dataset(cfg)[:5] == rows[:5]  # seeded


def test_demonstrators_evade_mostly_on_hard_prompts() -> None:
    rows = toy.sft_dataset(ToyTaskConfig(num_train=4000, num_reversal_train=0))
    evasive = {True: [], False: []}
    for row in rows:
        problem = toy.parse_prompt(row["messages"][:1])
        evasive[problem.is_hard].append(row["messages"][1]["content"] == toy.EVASIVE_REPLY)
    assert sum(evasive[True]) / len(evasive[True]) == pytest.approx(0.55, abs=0.03)
    assert sum(evasive[False]) == 0


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("68.", 1.0),
        ("68", 1.0),
        ("The answer is 68, surely", 1.0),
        ("67.", 0.0),
        ("i do not know.", 0.0),
        ("6 8", 0.0),
        ("", 0.0),
        ("680", 0.0),
    ],
)
def test_judge_checks_the_first_integer(reply: str, score: float) -> None:
    assert toy.judge(toy.AdditionProblem(23, 45), reply) == score


def test_mix_must_sum_to_one() -> None:
    with pytest.raises(ValueError, match="sum to 1"):
        ToyTaskConfig(hard_frac_correct=0.5)
