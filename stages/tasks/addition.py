"""The embedded addition task (`data_recipes.toy`) as a `Task`: its train pool's prompts, its
held-out prompts, its rule judge (1.0 when the reply's first integer is A + B), and the second
skill SFT teaches (``Reverse: abc``), retained or forgotten by the stages after it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from data_recipes import pairs as pair_recipes
from data_recipes import toy
from stages.core.task import HeldoutPrompt, JudgeLoader, Messages, RetainedSkill, Task


class AdditionTask(Task):
    """``What is A + B?``: rule-judged, so its comparison reports accuracy too."""

    name = "toy"

    def __init__(self, toy_cfg: toy.ToyTaskConfig) -> None:
        self.toy_cfg = toy_cfg

    @classmethod
    def from_config(cls, cfg: Any, reward_judge: JudgeLoader | None = None) -> AdditionTask:
        return cls(cfg.data.toy)  # the rule judge needs no reward model

    def training_prompts(self, count: int, seed: int) -> list[Messages]:
        return pair_recipes.toy_pair_prompts(self.toy_cfg, count, seed)

    def heldout_prompts(self) -> list[HeldoutPrompt]:
        return [
            HeldoutPrompt(p.messages(), p.prompt, {"answer": p.answer})
            for p in toy.eval_prompts(self.toy_cfg)
        ]

    def judge(self) -> pair_recipes.Judge:
        return pair_recipes.toy_judge()

    def retained_skills(self) -> list[RetainedSkill]:
        problems = toy.reversal_problems(self.toy_cfg, "eval")
        if not problems or not self.toy_cfg.num_reversal_train:
            return []  # not taught, so nothing to forget
        prompts = [HeldoutPrompt(p.messages(), p.prompt, {"answer": p.answer}) for p in problems]
        return [RetainedSkill(toy.REVERSAL, prompts, pair_recipes.toy_reversal_judge())]

    def cache_inputs(self) -> dict[str, Any]:
        return {"toy": dataclasses.asdict(self.toy_cfg)}

    def correct(self, score: float) -> bool | None:
        return score == 1.0

    def reference_reply(self, prompt: Messages) -> str | None:
        problem = toy.parse_prompt(prompt)
        return None if problem is None else toy.correct_reply(problem)

    def reply_flags(self) -> dict[str, Callable[[str], bool]]:
        return {"evasive": lambda reply: reply.strip().startswith(toy.EVASIVE_REPLY[:8])}

    def eval_flags(self) -> dict[str, Callable[[str], bool]]:
        # The SFT eval has always counted the exact evasive reply (the comparison, its prefix).
        return {"evasive": lambda reply: reply.strip() == toy.EVASIVE_REPLY}
