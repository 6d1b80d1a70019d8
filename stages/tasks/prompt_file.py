"""The user's own task: prompts from their file (`data_recipes.prompts`), judged by this
experiment's reward-model stage (`stages.core.reward_scoring`).

The file's distinct prompts are split into train and held-out by a keyed hash
(``data.prompts.num_heldout``, ``data.prompts.seed``); training prompts are drawn from the
train side only. Scores are the RM's logits: there is no correct / incorrect, so the
comparison reports mean reward and win rate, not accuracy.
"""

from __future__ import annotations

import random
from functools import cached_property
from typing import Any

from data_recipes.pairs import Judge
from data_recipes.prompts import PromptSet, load_prompt_file, prompt_key
from stages.core.handoff import HandoffError
from stages.core.task import HeldoutPrompt, JudgeLoader, Messages, Task


class PromptFileTask(Task):
    """Prompts from ``data.prompts.path``; the judge is this experiment's reward model."""

    name = "file"
    judge_needs_checkpoint = True

    def __init__(
        self,
        path: str,
        *,
        format: str,
        num_heldout: int,
        seed: int,
        reward_judge: JudgeLoader | None,
    ) -> None:
        self.path, self.format, self.num_heldout, self.seed = path, format, num_heldout, seed
        self.reward_judge = reward_judge

    @classmethod
    def from_config(cls, cfg: Any, reward_judge: JudgeLoader | None = None) -> PromptFileTask:
        prompts = cfg.data.prompts
        return cls(
            prompts.path, format=prompts.format, num_heldout=prompts.num_heldout,
            seed=prompts.seed, reward_judge=reward_judge,
        )  # fmt: skip

    @cached_property
    def prompts(self) -> PromptSet:
        """The file read once (a bad row fails here, with file and row)."""
        return load_prompt_file(
            self.path, format=self.format, num_heldout=self.num_heldout, seed=self.seed
        )

    def training_prompts(self, count: int, seed: int) -> list[Messages]:
        train = self.prompts.train
        if count >= len(train):
            return [list(p) for p in train]  # a repeated prompt would only repeat its pairs
        rng = random.Random(f"alignpipe-task-prompts:{seed}")
        return [list(p) for p in rng.sample(train, count)]

    def heldout_prompts(self) -> list[HeldoutPrompt]:
        return [HeldoutPrompt(p, p[-1]["content"]) for p in self.prompts.heldout]

    def heldout_keys(self) -> set[str]:
        return {prompt_key(p) for p in self.prompts.heldout}

    def judge(self) -> Judge:
        if self.reward_judge is None:
            raise HandoffError(
                f"the prompts of data.prompts.path={self.path!r} are judged by this "
                "experiment's reward model, and no RM stage was bound to this stage: train it "
                "first (`make rm`), from the same SFT output"
            )
        return self.reward_judge()

    def cache_inputs(self) -> dict[str, Any]:
        return {
            "prompts": {
                "content_hash": self.prompts.content_hash,
                "num_heldout": self.num_heldout,
                "seed": self.seed,
            }
        }

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.prompts.info(), "judge": "reward_model"}
