"""Judges as TRL reward functions: the one bridge from a task's judge (the toy rule judge, a
verifiable reward) or this experiment's reward model to the online RL trainers (GRPO, RLOO).

A judge is the same `data_recipes.pairs.Judge` that on-policy pair recipes score samples
with (`stages.core.on_policy_pairs`), so a reply earns the same score whether it is judged
into a preference pair or rewarded during GRPO. `stage_reward_judge` picks it from
``stage.reward`` before any weights load; `reward_function` adapts it to TRL's
``reward_func(prompts, completions, **columns) -> list[float]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from data_recipes.pairs import Judge
from stages.core.reward_scoring import resolve_reward_stage, reward_model_judge
from stages.core.schema import ConfigError
from stages.core.task import JUDGE_REWARD_STAGE, Task

if TYPE_CHECKING:
    from stages.core.handoff import ParentStage
    from stages.core.lifecycle import StageRun

RewardFunction = Callable[..., list[float]]


@dataclass
class RewardJudge:
    """Where a stage's reward comes from, resolved before any weights load; ``load`` builds
    the judge (an RM is loaded only then)."""

    source: str  # "task" or "rm"
    description: dict[str, Any]  # what the manifest records
    load: Callable[[], Judge]


def stage_reward_judge(stage: StageRun, task: Task | None) -> RewardJudge:
    """The judge of ``stage.reward``: the task's (rule-judged toy, or a prompt file judged by
    this experiment's RM) or this experiment's RM stage (checked to be trained on this SFT,
    and recorded as an upstream so a retrained RM makes this stage stale)."""
    c = stage.cfg
    source = c.stage.reward
    if source == "task":
        if task is None:
            raise ConfigError(
                "stage.reward=task rewards replies with the task's judge, but "
                "data.prompts.source=none: set data.prompts.source=toy (or data.prompts.path="
                "<your prompt file>), or stage.reward=rm for this experiment's reward model"
            )
        return RewardJudge("task", {"source": "task", "task": task.name}, task.judge)
    parent: ParentStage | None = stage.parent
    assert parent is not None  # online RL stages always start from a policy
    rm = resolve_reward_stage(
        c.paths.runs_root, c.experiment_name, JUDGE_REWARD_STAGE, parent, child=stage.name
    )
    stage.add_upstream(rm)
    return RewardJudge(
        "rm",
        {"source": "rm", **rm.as_manifest_ref()},
        lambda: reward_model_judge(rm, c.model, stage.precision),
    )


def reply_text(completion: Any) -> str:
    """A TRL completion as text: conversational completions are a list of messages (the
    assistant turn), standard ones a string."""
    if isinstance(completion, str):
        return completion
    return "".join(message["content"] for message in completion)


def reward_function(judge: Judge, name: str) -> RewardFunction:
    """``judge`` as a TRL reward function named ``name`` (TRL logs ``rewards/<name>/mean``)."""

    def score(prompts: Sequence[Any], completions: Sequence[Any], **_: Any) -> list[float]:
        if any(isinstance(prompt, str) for prompt in prompts):
            raise ValueError(
                "the reward judges score chat prompts (lists of messages); got a plain-text "
                "prompt: training prompts must come from the task (data.prompts)"
            )
        return judge.score_all(list(prompts), [reply_text(c) for c in completions])

    score.__name__ = name
    score.__qualname__ = name
    return score
