"""Paired comparisons for the preference stages (DPO, reward model): the pure, seeded parts.

Owns:

- the **judge** interface (`Judge`: a named callable scoring `(prompt messages, reply)`) and
  the toy rule judge; judges that need a checkpoint (this experiment's reward model) and the
  task's judge are built on the stage side (`stages.core.on_policy_pairs`,
  `stages.core.task`);
- the **pairing** of scored samples (`build_pairs`) by strategy: `best_vs_worst` (default),
  `best_vs_random`, or `ground_truth_vs_sample` (SPIN-like: chosen is a reference reply),
  with the filters: minimum score margin, ties, identical texts, optional length-bias
  control, decontamination against held-out eval prompts, dedupe;
- the **held-out split by prompt** (`split_heldout`) and **file-sourced pairs**
  (`file_pairs`), which share the split and decontamination with on-policy pairs;
- `PairSet` (train / held-out rows + what the manifest records) and the cache key of a
  generated set (`cache_key`). Sampling, judging and caching on-policy pairs is stage code:
  `stages.core.on_policy_pairs`.

Rows are TRL conversational preference rows: ``prompt`` = [user message], ``chosen`` /
``rejected`` = [assistant message], plus the float judge ``margin`` (RewardTrainer can use it;
DPOTrainer ignores it). The same inputs always give the same pairs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from data_recipes import toy
from data_recipes.accounting import RowAccount
from data_recipes.preference_formats import (
    content_hash,
    dedupe_preference_rows,
    load_preference_file,
)
from data_recipes.prompts import prompt_key
from data_recipes.toy import ToyTaskConfig

__all__ = ["prompt_key"]  # re-exported: pairs and prompts compare prompts the same way

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]
Row = dict[str, Any]

# Bump when the pairing algorithm changes, so stale cached sets are not reused.
PAIRS_VERSION = 1
STRATEGIES = ("best_vs_worst", "best_vs_random", "ground_truth_vs_sample")
DROP_REASONS = ("ties", "identical", "margin", "length", "contaminated", "duplicates")
# The same reasons in the words of `data_recipes.accounting.DROP_REASONS`.
ACCOUNT_REASONS = {
    "ties": "tie",
    "identical": "identical_pair",
    "margin": "below_min_margin",
    "length": "length_ratio",
    "contaminated": "decontaminated",
    "duplicates": "duplicate",
}


# ------------------------------------------------------------------------------ judges


@dataclass(frozen=True)
class Judge:
    """Scores a reply to a prompt; higher is better.

    ``name`` identifies the judge in cache keys and manifests: a reward-model judge should
    include its checkpoint's manifest sha256 so a new RM never reuses pairs judged by the old
    one. ``score_batch`` is optional: a model-based judge scores many replies per forward.
    """

    name: str
    score: Callable[[Messages, str], float]
    score_batch: Callable[[Sequence[Messages], Sequence[str]], list[float]] | None = None

    def score_all(self, prompts: Sequence[Messages], replies: Sequence[str]) -> list[float]:
        if self.score_batch is not None:
            scores = list(self.score_batch(prompts, replies))
            if len(scores) != len(replies):
                raise ValueError(
                    f"judge {self.name!r} returned {len(scores)} scores for {len(replies)} replies"
                )
            return [float(s) for s in scores]
        return [float(self.score(p, r)) for p, r in zip(prompts, replies)]


def _toy_problem(prompt: Messages) -> toy.AdditionProblem:
    problem = toy.parse_prompt(prompt)
    if problem is None:
        raise ValueError(
            f"the toy judge only scores 'What is A + B?' prompts, got {prompt!r}; use "
            "data.pairs.judge=reward_model for other prompts"
        )
    return problem


def toy_judge() -> Judge:
    """The embedded task's rule judge: 1.0 when the first integer in the reply is A + B."""
    return Judge(name="toy", score=lambda prompt, reply: toy.judge(_toy_problem(prompt), reply))


def toy_reversal_judge() -> Judge:
    """The embedded second skill's rule judge: 1.0 when the reply's first word is the prompt's
    string reversed."""

    def score(prompt: Messages, reply: str) -> float:
        problem = toy.parse_reversal_prompt(prompt)
        if problem is None:
            raise ValueError(f"the reversal judge only scores 'Reverse: abc', got {prompt!r}")
        return toy.reversal_judge(problem, reply)

    return Judge(name="toy/reversal", score=score)


# ----------------------------------------------------------------------------- prompts


def toy_pair_prompts(toy_cfg: ToyTaskConfig, num_prompts: int, seed: int) -> list[Messages]:
    """Distinct prompts from the toy *train* pool (the eval pool is excluded entirely)."""
    # Asking for more eval prompts than exist returns the whole eval pool (public API only).
    eval_pool = set(toy.problems(dataclasses.replace(toy_cfg, num_eval=10**9), "eval"))
    pool = [
        toy.AdditionProblem(a, b)
        for a in toy.OPERANDS
        for b in toy.OPERANDS
        if toy.AdditionProblem(a, b) not in eval_pool
    ]
    rng = random.Random(f"alignpipe-pairs-prompts:{seed}")
    if num_prompts <= len(pool):
        chosen = rng.sample(pool, num_prompts)
    else:  # more prompts than the pool holds: repeat prompts (their samples still differ)
        chosen = [rng.choice(pool) for _ in range(num_prompts)]
    return [p.messages() for p in chosen]


def toy_eval_prompt_keys(toy_cfg: ToyTaskConfig) -> set[str]:
    """Held-out eval prompts that no training pair may contain."""
    return {prompt_key(p.prompt) for p in toy.eval_prompts(toy_cfg)}


# ----------------------------------------------------------------------------- pairing


def _row(prompt: Messages, chosen: str, rejected: str, margin: float) -> Row:
    return {
        "prompt": [dict(m) for m in prompt],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
        "margin": float(margin),
    }


def build_pairs(
    prompts: Sequence[Messages],
    samples: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    *,
    strategy: str = "best_vs_worst",
    min_margin: float = 0.5,
    max_length_ratio: float | None = None,
    seed: int = 0,
    eval_prompt_keys: set[str] | frozenset[str] = frozenset(),
    references: Sequence[str | None] | None = None,
    reference_scores: Sequence[float | None] | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """At most one pair per prompt from its scored samples; pure and seeded.

    ``references``/``reference_scores`` (the demonstration and its judge score) are needed by
    ``ground_truth_vs_sample``. Among equally scored candidates the pick is random, from an
    RNG keyed by (seed, prompt), so a pair never depends on the order of the prompts.
    Returns the rows and stats: counts dropped per reason (`DROP_REASONS`), kept, mean margin.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"data.pairs.strategy={strategy!r} is not one of {list(STRATEGIES)}")
    if not len(prompts) == len(samples) == len(scores):
        raise ValueError(
            f"prompts, samples and scores differ in length: "
            f"{len(prompts)}, {len(samples)}, {len(scores)}"
        )
    if strategy == "ground_truth_vs_sample" and (references is None or reference_scores is None):
        raise ValueError("ground_truth_vs_sample needs references and reference_scores")
    dropped = dict.fromkeys(DROP_REASONS, 0)
    rows: list[Row] = []
    for i, (prompt, texts, marks) in enumerate(zip(prompts, samples, scores)):
        if len(texts) != len(marks) or not texts:
            raise ValueError(f"prompt {i}: {len(texts)} samples but {len(marks)} scores")
        if prompt_key(prompt) in eval_prompt_keys:
            dropped["contaminated"] += 1
            continue
        rng = random.Random(f"alignpipe-pairs:{seed}:{json.dumps(prompt, sort_keys=True)}")
        if strategy == "ground_truth_vs_sample":
            assert references is not None and reference_scores is not None
            chosen, chosen_score = references[i], reference_scores[i]
            if chosen is None or chosen_score is None:
                raise ValueError(f"prompt {i} has no ground-truth reply for {strategy}")
            candidates = [j for j, t in enumerate(texts) if t != chosen]
            if not candidates:
                dropped["identical"] += 1
                continue
            j = rng.choice(candidates)
            rejected, rejected_score = texts[j], marks[j]
        else:
            best = max(marks)
            worst = min(marks)
            if best == worst:
                dropped["ties"] += 1
                continue
            b = rng.choice([j for j, s in enumerate(marks) if s == best])
            if strategy == "best_vs_worst":
                pool = [j for j, s in enumerate(marks) if s == worst]
            else:
                pool = [j for j in range(len(texts)) if j != b]
            r = rng.choice(pool)
            chosen, chosen_score = texts[b], marks[b]
            rejected, rejected_score = texts[r], marks[r]
        margin = chosen_score - rejected_score
        if chosen == rejected:
            dropped["identical"] += 1
        elif margin == 0:
            dropped["ties"] += 1
        elif margin < min_margin - 1e-9:  # tolerance: 0.7 - 0.2 < 0.5 in floating point
            dropped["margin"] += 1
        elif max_length_ratio is not None and len(chosen) > max_length_ratio * max(
            len(rejected), 1
        ):
            # A judge that likes long answers teaches length, not quality: cap the ratio.
            dropped["length"] += 1
        else:
            rows.append(_row(prompt, chosen, rejected, margin))
    kept, dedupe = dedupe_preference_rows(rows)
    dropped["duplicates"] = dedupe["duplicates_dropped"]
    dropped["identical"] += dedupe["identical_chosen_rejected_dropped"]
    margins = [r["margin"] for r in kept]
    stats = {
        "prompts": len(prompts),
        "kept": len(kept),
        "dropped": dropped,
        "mean_margin": sum(margins) / len(margins) if margins else 0.0,
    }
    return kept, stats


def split_heldout(rows: Sequence[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Split by prompt (all pairs of one prompt land on the same side), keyed by a hash.

    The side of a prompt depends only on (seed, prompt), never on the other rows, so adding
    prompts does not reshuffle the held-out set.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"heldout fraction must be in [0, 1), got {fraction}")
    train: list[Row] = []
    heldout: list[Row] = []
    for row in rows:
        digest = hashlib.sha256(
            f"alignpipe-heldout:{seed}:{prompt_key(row['prompt'])}".encode()
        ).digest()
        is_heldout = int.from_bytes(digest[:8], "big") / 2**64 < fraction
        (heldout if is_heldout else train).append(row)
    return train, heldout


# ---------------------------------------------------------------------------- pair sets


@dataclass
class PairSet:
    """Train and held-out preference rows plus what the run manifest records."""

    train: list[Row]
    heldout: list[Row]
    info: dict[str, Any] = field(default_factory=dict)  # recipe, stats, content hashes, cache
    # Rows (file rows, or prompts for on-policy pairs) read, kept and dropped by reason.
    account: RowAccount | None = None

    def train_dataset(self) -> Any:
        """The train rows as a `datasets.Dataset` (what DPOTrainer / RewardTrainer take)."""
        import datasets

        if not self.train:
            account = self.account or RowAccount(str(self.info.get("recipe")))
            raise account.no_rows_left(
                "every kept pair was held out: lower data.pairs.heldout_fraction, or add pairs"
                if account.kept
                else "relax the filters named above, or add data"
            )
        return datasets.Dataset.from_list(self.train)


def on_policy_account(info: dict[str, Any]) -> RowAccount:
    """The account of a generated set from its stats: one row read per prompt sampled."""
    stats = info["stats"]
    account = RowAccount(
        str(info.get("recipe", "on_policy")), read=stats["prompts"], unit="prompts"
    )
    for reason, count in stats["dropped"].items():
        account.drop(ACCOUNT_REASONS[reason], count)
    return account


def cache_key(inputs: dict[str, Any]) -> str:
    """Short sha256 of the canonical JSON of everything that determines a generated set."""
    payload = json.dumps({"version": PAIRS_VERSION, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class FilePairsConfig(Protocol):
    """What `file_pairs` reads (`stages.core.schema.PairsConfig` validates it)."""

    path: str | None
    format: str
    heldout_fraction: float
    seed: int


def file_pairs(pairs_cfg: FilePairsConfig, eval_prompt_keys: set[str] | None = None) -> PairSet:
    """Pairs from a local preference file (TRL, HH-RLHF, UltraFeedback, ...), decontaminated
    against ``eval_prompt_keys`` and split into train / held-out by prompt."""
    if not pairs_cfg.path:  # the config check names the key before any stage gets here
        raise ValueError("data.pairs.source=file needs data.pairs.path=/path/to/pairs.jsonl")
    data = load_preference_file(pairs_cfg.path, format=pairs_cfg.format)
    keys = eval_prompt_keys or set()
    rows = [dict(r) for r in data.dataset]
    kept = [r for r in rows if prompt_key(r["prompt"]) not in keys]
    account = data.account or RowAccount(str(pairs_cfg.path), read=len(rows))
    account.drop("decontaminated", len(rows) - len(kept))
    if not kept:
        raise account.no_rows_left(
            "every prompt is one of the held-out eval prompts: use prompts the eval never asks"
        )
    train, heldout = split_heldout(kept, pairs_cfg.heldout_fraction, pairs_cfg.seed)
    stats = {
        **data.stats,
        "contaminated_dropped": len(rows) - len(kept),
        "kept": len(kept),
        "train": len(train),
        "heldout": len(heldout),
    }
    return PairSet(
        train,
        heldout,
        {
            "recipe": "file",
            "path": str(pairs_cfg.path),
            "format": data.format,
            "file_content_hash": data.content_hash,
            "stats": stats,
            "content_hash": content_hash(train),
            "heldout_content_hash": content_hash(heldout),
        },
        account,
    )
