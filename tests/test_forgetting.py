"""The second embedded skill (reversal) and the forgetting metrics (stages.core.forgetting)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from data_recipes import pairs, toy
from stages.core.forgetting import (
    forgetting_metrics,
    reply_loglikelihood,
    sft_heldout_conversations,
    skill_accuracy,
)
from stages.core.handoff import ParentStage
from stages.core.models import load_tokenizer, resolve_base_model
from stages.core.schema import ModelConfig, PathsConfig, TinyModelSpec, ToyTaskConfig
from stages.core.task import HeldoutPrompt, RetainedSkill, Task
from stages.core.validation import VALIDATION_ROWS
from stages.tasks.addition import AdditionTask

MODEL_CFG = ModelConfig(
    name="tiny",
    name_or_path="builtin:tiny",
    tiny=TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
    max_new_tokens=4,
)


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoModelForCausalLM

    paths = PathsConfig(builtin_models=str(tmp_path_factory.mktemp("builtin")))
    base = resolve_base_model(MODEL_CFG, paths)
    return AutoModelForCausalLM.from_pretrained(base.path), load_tokenizer(base.path, MODEL_CFG)


def test_reversal_rows_are_correct_disjoint_and_leave_addition_unchanged() -> None:
    cfg = ToyTaskConfig(num_train=300, num_reversal_train=200, num_reversal_eval=50)
    rows = toy.sft_dataset(cfg)
    assert len(rows) == 500
    addition_only = toy.sft_dataset(dataclasses.replace(cfg, num_reversal_train=0))
    assert rows[:300] == addition_only[:300]  # the second skill is appended, not interleaved
    for row in rows.select(range(300, 500)):
        problem = toy.parse_reversal_prompt(row["messages"][:1])
        assert problem is not None and len(problem.text) == 3
        assert toy.parse_prompt(row["messages"][:1]) is None  # never mistaken for addition
        reply = row["messages"][1]["content"]
        assert reply == problem.text[::-1] + "." and toy.reversal_judge(problem, reply) == 1.0
    train = {p.text for p in toy.reversal_problems(cfg, "train")}
    held_out = {p.text for p in toy.reversal_problems(cfg, "eval")}
    assert len(held_out) == 50 and not train & held_out
    assert toy.reversal_problems(cfg, "eval") == toy.reversal_problems(cfg, "eval")


@pytest.mark.parametrize(
    ("reply", "score"), [("cba.", 1.0), ("cba", 1.0), (" cba, i think", 1.0), ("abc.", 0.0),
                         ("cbad.", 0.0), ("i do not know.", 0.0), ("123.", 0.0)],
)  # fmt: skip
def test_the_reversal_judge(reply: str, score: float) -> None:
    assert toy.reversal_judge(toy.ReversalProblem("abc"), reply) == score


def test_the_addition_task_retains_reversal_only_when_sft_teaches_it() -> None:
    task = AdditionTask(ToyTaskConfig(num_reversal_eval=12))
    (skill,) = task.retained_skills()
    assert skill.name == "reversal" and len(skill.prompts) == 12
    prompt = skill.prompts[0]
    answer = prompt.fields["answer"]
    assert skill.judge.score_all([prompt.messages], [f"{answer}."]) == [1.0]
    assert skill.judge.score_all([prompt.messages], [f"{answer[::-1]}x."]) == [0.0]
    assert AdditionTask(ToyTaskConfig(num_reversal_train=0)).retained_skills() == []
    with pytest.raises(ValueError, match="Reverse: abc"):
        pairs.toy_reversal_judge().score([{"role": "user", "content": "What is 2 + 3?"}], "5")


class _OneSkill(Task):
    """A task whose only content is one retained skill (what forgetting_metrics reads)."""

    def __init__(self, skill: RetainedSkill) -> None:
        self.skill = skill

    def training_prompts(self, count, seed):  # type: ignore[no-untyped-def]
        return []

    def heldout_prompts(self):  # type: ignore[no-untyped-def]
        return []

    def judge(self):  # type: ignore[no-untyped-def]
        return self.skill.judge

    def cache_inputs(self):  # type: ignore[no-untyped-def]
        return {}

    def retained_skills(self) -> list[RetainedSkill]:
        return [self.skill]


def _sft_stage(tmp_path, conversations, metrics) -> ParentStage:  # type: ignore[no-untyped-def]
    run_dir = tmp_path / "sft"
    run_dir.mkdir()
    lines = [json.dumps({"messages": c}) for c in conversations]
    (run_dir / VALIDATION_ROWS).write_text("\n".join(lines) + "\n")
    return ParentStage("sft", run_dir, {"kind": "full", "metrics": metrics}, "0" * 64)


def test_forgetting_compares_policy_parent_and_the_sft_record(
    tiny_model_and_tokenizer, tmp_path
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    model_cfg = MODEL_CFG
    # A judge that calls a reply correct when it starts with what the parent says: the parent
    # scores 1.0 by construction, a perturbed policy (other greedy replies) scores less.
    prompts = [HeldoutPrompt([{"role": "user", "content": f"What is {i} - 1?"}], str(i)) for i in
               range(10, 22)]  # fmt: skip
    from stages.core.task_eval import greedy_replies

    parent_replies = dict(
        zip((p.text for p in prompts), greedy_replies(model, tokenizer, prompts, model_cfg))
    )
    judge = pairs.Judge(
        "same-as-parent", lambda prompt, reply: float(reply == parent_replies[prompt[0]["content"]
                                                                             .split()[2]]),
    )  # fmt: skip
    task = _OneSkill(RetainedSkill("echo", prompts, judge))
    conversations = [
        [{"role": "user", "content": "What is 3 - 1?"}, {"role": "assistant", "content": "2."}],
        [{"role": "user", "content": "What is 9 - 4?"}, {"role": "assistant", "content": "5."}],
    ]
    sft = _sft_stage(tmp_path, conversations, {"forgetting/echo/accuracy": 0.75})

    same, rows = forgetting_metrics(model, model, tokenizer, task, model_cfg, sft)
    assert same["forgetting/echo/parent_accuracy"] == same["forgetting/echo/accuracy"] == 1.0
    assert same["forgetting/echo"] == 0.0
    assert same["forgetting/echo/sft_accuracy"] == 0.75
    assert same["forgetting/sft_replies"] == pytest.approx(0.0, abs=1e-6)
    assert same["forgetting/sft_replies/count"] == 2.0
    assert [r[0] for r in rows] == [
        "echo accuracy (not trained here)",
        "held-out SFT replies loglik/token",
    ]

    perturbed = type(model)(model.config)
    perturbed.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 0.5)
    drift, _ = forgetting_metrics(perturbed, model, tokenizer, task, model_cfg, sft)
    assert drift["forgetting/echo/accuracy"] < 1.0
    assert drift["forgetting/echo"] == pytest.approx(1.0 - drift["forgetting/echo/accuracy"])
    mine = reply_loglikelihood(perturbed, tokenizer, conversations)
    theirs = reply_loglikelihood(model, tokenizer, conversations)
    assert drift["forgetting/sft_replies"] == pytest.approx(theirs - mine)
    assert mine != pytest.approx(theirs)
    assert skill_accuracy(model, tokenizer, task.skill, model_cfg) == 1.0


def test_reply_loglikelihood_is_the_mean_logprob_of_the_reply_tokens(
    tiny_model_and_tokenizer,
) -> None:
    model, tokenizer = tiny_model_and_tokenizer
    conversation = [
        {"role": "user", "content": "What is 7 - 2?"},
        {"role": "assistant", "content": "5."},
    ]
    prompt = tokenizer.apply_chat_template(conversation[:1], add_generation_prompt=True)
    full = tokenizer.apply_chat_template(conversation)
    prompt, full = (
        list(getattr(prompt, "input_ids", prompt)),
        list(getattr(full, "input_ids", full)),
    )
    assert full[: len(prompt)] == prompt
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logps = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(full[1:])[:, None])[:, 0]
    expected = float(logps[len(prompt) - 1 :].mean())
    assert reply_loglikelihood(model, tokenizer, [conversation]) == pytest.approx(expected, 1e-5)


def test_heldout_sft_conversations_skip_rows_without_a_final_reply(tmp_path) -> None:
    good = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    lines = [{"messages": good}, {"messages": good[:1]}, {"messages": [*good, good[0]]}]
    (tmp_path / VALIDATION_ROWS).write_text("\n".join(json.dumps(x) for x in lines))
    assert sft_heldout_conversations(tmp_path) == [good]
    assert sft_heldout_conversations(tmp_path / "nowhere") == []
