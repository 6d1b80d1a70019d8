"""The embedded verifiable task: two-digit addition asked as ``What is A + B?``, plus a
second skill, ``Reverse: abc`` -> ``cba.``, that SFT teaches and no preference data touches.

Owns the prompt space, the train/eval split, the mixed-quality demonstrations and the
rule-based judge. Pure and seeded: the same config always yields the same rows.

Split: every (A, B) pair is assigned to train or eval by a keyed hash, so the two sets are
disjoint by construction; each set is then sampled with its own seed.

Demonstrations are deliberately of mixed quality, like real SFT data: mostly correct, some
evasive ("i do not know."), some near misses (off by 1 or 10), and the demonstrators give up
more often on hard prompts (a three-digit sum). SFT imitates the mix, so greedy decoding
evades on hard prompts while sampling often answers them correctly; the judge prefers correct
answers, which the preference stages then select.

The second skill (reversing a three-letter string, always demonstrated correctly) is what
forgetting is measured on: the preference stages only ever see addition prompts, so any change
in a later stage's reversal accuracy is a side effect of aligning it on addition. It uses
letters, not digits, so learning it costs the addition skill little within SFT's budget
(a second arithmetic skill, ``A - B``, left both half-learned at 800 steps).
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from datasets import Dataset

OPERANDS = range(10, 100)
EVASIVE_REPLY = "i do not know."
_FIRST_INT = re.compile(r"-?\d+")
_PROMPT = re.compile(r"What is (\d+) \+ (\d+)\?")
_REVERSAL_PROMPT = re.compile(r"Reverse: ([a-z]+)$")
_FIRST_WORD = re.compile(r"[a-z]+")
REVERSAL = "reversal"  # the second skill's name in metrics (forgetting/reversal)
REVERSAL_LETTERS = "abcdefghijklmnopqrstuvwxyz"
REVERSAL_LENGTH = 3


class ToyTaskConfig(Protocol):
    """The settings this module reads (`stages.core.schema.ToyTaskConfig` validates them)."""

    num_train: int
    num_eval: int
    frac_correct: float
    frac_evasive: float
    hard_frac_correct: float
    hard_frac_evasive: float
    train_seed: int
    eval_seed: int
    eval_fraction: float
    num_reversal_train: int
    num_reversal_eval: int


@dataclass(frozen=True)
class AdditionProblem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b

    @property
    def is_hard(self) -> bool:
        """ "Hard" prompts (~60%): the sum has three digits."""
        return self.answer >= 100

    @property
    def prompt(self) -> str:
        return f"What is {self.a} + {self.b}?"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


@dataclass(frozen=True)
class ReversalProblem:
    """The second skill: ``Reverse: abc``, answered ``cba.``."""

    text: str

    @property
    def answer(self) -> str:
        return self.text[::-1]

    @property
    def prompt(self) -> str:
        return f"Reverse: {self.text}"

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


def correct_reply(problem: AdditionProblem | ReversalProblem) -> str:
    return f"{problem.answer}."


def _is_eval_pair(a: int, b: int, eval_fraction: float) -> bool:
    return _in_eval_split(f"{a}+{b}", eval_fraction)


def _in_eval_split(key: str, eval_fraction: float) -> bool:
    # Keyed hash, not the sampling seed: the split never changes when seeds do.
    digest = hashlib.sha256(f"alignpipe-toy-split:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def problems(cfg: ToyTaskConfig, split: str) -> list[AdditionProblem]:
    """Sample problems for ``split`` ("train" or "eval") from its own disjoint pool."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    pool = [
        AdditionProblem(a, b)
        for a in OPERANDS
        for b in OPERANDS
        if _is_eval_pair(a, b, cfg.eval_fraction) == want_eval
    ]
    rng = random.Random(cfg.eval_seed if want_eval else cfg.train_seed)
    count = cfg.num_eval if want_eval else cfg.num_train
    if want_eval:  # distinct held-out prompts
        return rng.sample(pool, min(count, len(pool)))
    return [rng.choice(pool) for _ in range(count)]


def demonstration_reply(problem: AdditionProblem, rng: random.Random, cfg: ToyTaskConfig) -> str:
    """One demonstration reply drawn from the configured quality mix."""
    if problem.is_hard:
        p_correct, p_evasive = cfg.hard_frac_correct, cfg.hard_frac_evasive
    else:
        p_correct, p_evasive = cfg.frac_correct, cfg.frac_evasive
    roll = rng.random()
    if roll < p_correct:
        return correct_reply(problem)
    if roll < p_correct + p_evasive:
        return EVASIVE_REPLY
    offset = rng.choice((-10, -1, 1, 10))
    return f"{problem.answer + offset}."


def reversal_problems(cfg: ToyTaskConfig, split: str) -> list[ReversalProblem]:
    """Second-skill problems for ``split`` from its own disjoint pool (as `problems`)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    want_eval = split == "eval"
    pool = [
        ReversalProblem(a + b + c)
        for a in REVERSAL_LETTERS
        for b in REVERSAL_LETTERS
        for c in REVERSAL_LETTERS
        if _in_eval_split(f"reverse:{a}{b}{c}", cfg.eval_fraction) == want_eval
    ]
    # Own streams: adding the skill leaves the addition rows exactly as they were.
    rng = random.Random((cfg.eval_seed if want_eval else cfg.train_seed) * 104729 + 3)
    if want_eval:
        return rng.sample(pool, min(cfg.num_reversal_eval, len(pool)))
    return [rng.choice(pool) for _ in range(cfg.num_reversal_train)]


def _demonstration(prompt: list[dict[str, str]], reply: str) -> dict[str, list[dict[str, str]]]:
    return {"messages": [*prompt, {"role": "assistant", "content": reply}]}


def sft_dataset(cfg: ToyTaskConfig) -> Dataset:
    """Conversational SFT rows (``messages``): addition of mixed quality from the train pool,
    then the second skill's demonstrations (all correct)."""
    rng = random.Random(cfg.train_seed * 7919 + 17)
    rows = [
        _demonstration(p.messages(), demonstration_reply(p, rng, cfg))
        for p in problems(cfg, "train")
    ]
    rows += [
        _demonstration(p.messages(), correct_reply(p)) for p in reversal_problems(cfg, "train")
    ]
    return Dataset.from_list(rows)


def eval_prompts(cfg: ToyTaskConfig) -> list[AdditionProblem]:
    """Held-out problems; never seen in training."""
    return problems(cfg, "eval")


def first_integer(text: str) -> int | None:
    match = _FIRST_INT.search(text)
    return int(match.group()) if match else None


def judge(problem: AdditionProblem, reply: str) -> float:
    """Rule-based judge: 1.0 when the first integer in the reply equals A + B, else 0.0."""
    return 1.0 if first_integer(reply) == problem.answer else 0.0


def _last_user_turn(prompt: str | list[dict[str, str]]) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else ""


def parse_prompt(prompt: str | list[dict[str, str]]) -> AdditionProblem | None:
    """Recover the addition problem from a prompt string or chat messages (last user turn);
    None for anything else, the second skill's prompts included."""
    match = _PROMPT.search(_last_user_turn(prompt))
    return AdditionProblem(int(match.group(1)), int(match.group(2))) if match else None


def parse_reversal_prompt(prompt: str | list[dict[str, str]]) -> ReversalProblem | None:
    """Recover the second skill's problem, as `parse_prompt` does for addition."""
    match = _REVERSAL_PROMPT.search(_last_user_turn(prompt).strip())
    return ReversalProblem(match.group(1)) if match else None


def reversal_judge(problem: ReversalProblem, reply: str) -> float:
    """The second skill's rule judge: 1.0 when the reply's first word is the reversed text."""
    match = _FIRST_WORD.search(reply)
    return 1.0 if match is not None and match.group() == problem.answer else 0.0


def accuracy(problems_and_replies: Iterable[tuple[AdditionProblem, str]]) -> float:
    scores = [judge(p, r) for p, r in problems_and_replies]
    return sum(scores) / max(len(scores), 1)
