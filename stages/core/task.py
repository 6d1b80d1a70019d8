"""The task a policy is trained on and judged by: training prompts, held-out prompts, a judge.

A `Task` supplies

- **training prompts** (`training_prompts(count, seed)`): what PPO rolls out on and what
  on-policy pairs are sampled from; never one of the held-out prompts;
- **held-out prompts** (`heldout_prompts()`): what every stage's comparison with its parent
  (`stages.core.comparison`) and the SFT eval (`stages.core.task_eval`) generate on;
- **retained skills** (`retained_skills()`): other skills SFT taught, with held-out prompts and
  a rule judge each, whose accuracy after a later stage measures forgetting;
- a **judge** (`judge()`: a `data_recipes.pairs.Judge`, batched, ``(prompt, reply) -> score``);
  a task whose scores mean correct / incorrect says so (`correct`), and its comparison then
  reports accuracy too.

Implementations live outside core, in ``stages/tasks/`` (the embedded addition task; prompts
from the user's own file judged by this experiment's reward model). Core code receives a
`Task`; `resolve_task` picks one from ``data.prompts`` (`DataConfig.task_source`) through
`TASK_SOURCES`, importing the implementation only then, so core imports no particular task.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from data_recipes.pairs import Judge
from data_recipes.prompts import prompt_key

if TYPE_CHECKING:
    from stages.core.handoff import ParentStage
    from stages.core.lifecycle import StageRun
    from stages.core.schema import Config

Messages = list[dict[str, str]]
# Builds the judge that needs a checkpoint (this experiment's reward model), when asked for.
JudgeLoader = Callable[[], Judge]

# data.prompts.source -> "module:class" of the Task; the class has `from_config(cfg, loader)`.
TASK_SOURCES: dict[str, str] = {
    "toy": "stages.tasks.addition:AdditionTask",
    "file": "stages.tasks.prompt_file:PromptFileTask",
}
# The stage whose reward model judges a task without a rule judge (and reward_model pairs).
JUDGE_REWARD_STAGE = "rm"


@dataclass(frozen=True)
class HeldoutPrompt:
    """One held-out prompt: the messages generated from, the text eval_samples.jsonl records,
    and extra fields recorded with its sample (the addition task's ``answer``)."""

    messages: Messages
    text: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RetainedSkill:
    """A skill SFT teaches that no later stage's data touches: its held-out prompts and a
    rule judge (1.0 = correct). A later stage's accuracy on it measures forgetting
    (`stages.core.forgetting`)."""

    name: str
    prompts: list[HeldoutPrompt]
    judge: Judge


class Task(ABC):
    """Training prompts, held-out prompts and a judge (see the module docstring)."""

    name: str = "task"
    # True when the judge needs a finished checkpoint (an RM): only stages after it can judge.
    judge_needs_checkpoint: bool = False

    @abstractmethod
    def training_prompts(self, count: int, seed: int) -> list[Messages]:
        """Up to ``count`` training prompts (none held out), chosen by ``seed``."""

    @abstractmethod
    def heldout_prompts(self) -> list[HeldoutPrompt]:
        """The held-out prompts, never trained on, in a fixed order."""

    @abstractmethod
    def judge(self) -> Judge:
        """The judge; may load a model, so call it once and drop it when done."""

    @abstractmethod
    def cache_inputs(self) -> dict[str, Any]:
        """What identifies the prompts in cache keys of generated pairs (JSON-able)."""

    def correct(self, score: float) -> bool | None:
        """Whether a judge score means a correct reply; None when the task cannot tell."""
        return None

    def reference_reply(self, prompt: Messages) -> str | None:
        """A known-good reply to a training prompt (for ``ground_truth_vs_sample``), if any."""
        return None

    def reply_flags(self) -> dict[str, Callable[[str], bool]]:
        """Named reply traits whose rate the comparison reports per model (e.g. evasive)."""
        return {}

    def eval_flags(self) -> dict[str, Callable[[str], bool]]:
        """The traits the SFT eval reports (`stages.core.task_eval`); default `reply_flags`."""
        return self.reply_flags()

    def retained_skills(self) -> list[RetainedSkill]:
        """Skills SFT taught besides the task, each measured for forgetting; default none."""
        return []

    def heldout_keys(self) -> set[str]:
        """Normalised held-out prompts: no training pair or prompt may be one of them."""
        return {prompt_key(p.messages) for p in self.heldout_prompts()}

    def describe(self) -> dict[str, Any]:
        """What a manifest records about the task."""
        return {"name": self.name, **self.cache_inputs()}


def resolve_task(cfg: Config, reward_judge: JudgeLoader | None = None) -> Task | None:
    """The task of ``data.prompts`` (None for ``none``); ``reward_judge`` builds the judge of a
    task judged by this experiment's reward model (see `stage_task`)."""
    source = cfg.data.task_source()
    if source == "none":
        return None
    module_name, _, class_name = TASK_SOURCES[source].partition(":")
    task_class = getattr(importlib.import_module(module_name), class_name)
    return task_class.from_config(cfg, reward_judge)


def stage_task(stage: StageRun, sft: ParentStage | None) -> Task | None:
    """The task of ``stage``'s config, its reward-model judge bound to this experiment's RM
    stage trained on ``sft``. That RM is resolved now, before any weights load (a missing or
    stale one fails with the command to run), and recorded as an upstream of the stage."""
    from stages.core.reward_scoring import resolve_reward_stage, reward_model_judge

    c = stage.cfg
    task = resolve_task(c)
    if task is None or not task.judge_needs_checkpoint:
        return task
    if sft is None:
        return resolve_task(c, reward_judge=None)  # no RM can be trained before the SFT
    rm = resolve_reward_stage(
        c.paths.runs_root, c.experiment_name, JUDGE_REWARD_STAGE, sft, child=stage.name
    )
    stage.add_upstream(rm)
    return resolve_task(c, lambda: reward_model_judge(rm, c.model, stage.precision))
