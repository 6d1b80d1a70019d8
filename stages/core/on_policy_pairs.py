"""On-policy preference pairs: sample the parent policy on the task's training prompts, judge
every sample, pair them (`data_recipes.pairs.build_pairs`), split by prompt, and cache the set.

Owns what needs a model or the file system (the pure pairing lives in `data_recipes.pairs`):

- **sampling** N replies per prompt (KV-cached batched generation, seeded, temperature from
  ``data.pairs``) on `Task.training_prompts`, never a held-out prompt of the task;
- **judging** them with the judge of ``data.pairs.judge`` (`resolve_judge`: the rule judge, or
  this experiment's reward model built by the stage and passed in);
- the **cache** of a generated set under ``runs/<exp>/_pairs/<key>/``, keyed by a hash of every
  input (policy manifest sha256, pairs config, the task's prompts, generation budget, judge),
  so a re-run reuses it; rank 0 writes it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_recipes.pairs import (
    Judge,
    PairSet,
    build_pairs,
    cache_key,
    on_policy_account,
    split_heldout,
    toy_judge,
)
from data_recipes.preference_formats import content_hash
from stages.core.generation import generate_replies
from stages.core.handoff import write_json_atomic, write_jsonl_atomic
from stages.core.runtime import is_main_process
from stages.core.schema import ConfigError, ModelConfig, PairsConfig
from stages.core.task import Task

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

Row = dict[str, Any]

STATS_FILE = "stats.json"
TRAIN_FILE = "train.jsonl"
HELDOUT_FILE = "heldout.jsonl"


def resolve_judge(name: str) -> Judge:
    """The judge named by ``data.pairs.judge`` that needs no checkpoint.

    ``reward_model`` needs a finished RM stage: the training stages build that judge
    (`stages.core.stage_pairs`, `stages.core.reward_scoring.reward_model_judge`, named
    ``reward_model:<manifest sha256>``) and pass it to `generate_pairs(judge=...)`.
    """
    if name == "toy":
        return toy_judge()
    if name == "reward_model":
        raise ConfigError(
            "data.pairs.judge=reward_model needs a finished RM stage: the DPO stage loads "
            "this experiment's (make rm); called directly, pass "
            "judge=stages.core.reward_scoring.reward_model_judge(...) to generate_pairs"
        )
    raise ConfigError(f"data.pairs.judge={name!r} is not one of ['toy', 'reward_model']")


def _read_jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_cache(directory: Path, train: list[Row], heldout: list[Row], info: dict) -> None:
    write_jsonl_atomic(directory / TRAIN_FILE, train)
    write_jsonl_atomic(directory / HELDOUT_FILE, heldout)
    write_json_atomic(directory / STATS_FILE, info)  # last: its presence marks a complete set


def load_cached(directory: Path) -> PairSet | None:
    """A previously generated set, or None when absent or incomplete."""
    if not (directory / STATS_FILE).is_file():
        return None
    info = json.loads((directory / STATS_FILE).read_text())
    train, heldout = _read_jsonl(directory / TRAIN_FILE), _read_jsonl(directory / HELDOUT_FILE)
    if content_hash(train) != info.get("content_hash"):
        log.warning("cached pairs in %s do not match their hash; regenerating", directory)
        return None
    return PairSet(
        train,
        heldout,
        {**info, "cache": {"path": str(directory), "reused": True}},
        on_policy_account(info),
    )


def generate_pairs(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    *,
    pairs_cfg: PairsConfig,
    task: Task,
    model_cfg: ModelConfig,
    policy_id: dict[str, Any],
    cache_root: Path,
    judge: Judge | None = None,
) -> PairSet:
    """On-policy pairs from ``policy``'s own samples on ``task``'s training prompts, cached
    under ``cache_root/<key>/``.

    ``policy_id`` identifies the checkpoint sampled (e.g. the parent stage's manifest ref
    with its sha256): it is part of the cache key, so a retrained policy regenerates.
    ``judge`` defaults to ``resolve_judge(pairs_cfg.judge)``.
    """
    judge = judge or resolve_judge(pairs_cfg.judge)
    key_inputs = {
        "policy": policy_id,
        "pairs": dataclasses.asdict(pairs_cfg),
        **task.cache_inputs(),
        "generation": {
            "max_new_tokens": model_cfg.max_new_tokens,
            "max_prompt_length": model_cfg.max_prompt_length,
        },
        "judge": judge.name,
    }
    key = cache_key(key_inputs)
    directory = Path(cache_root) / key
    cached = load_cached(directory)
    if cached is not None:
        log.info("reusing %d cached pairs from %s", len(cached.train), directory)
        return cached

    prompts = task.training_prompts(pairs_cfg.num_prompts, pairs_cfg.seed)
    references = reference_scores = None
    if pairs_cfg.strategy == "ground_truth_vs_sample":
        references = [task.reference_reply(p) for p in prompts]
        if any(r is None for r in references):
            raise ConfigError(
                f"data.pairs.strategy=ground_truth_vs_sample needs a reference reply per prompt, "
                f"which the {task.name!r} task does not have: use data.pairs.strategy="
                "best_vs_worst"
            )
    samples = generate_replies(
        policy,
        tokenizer,
        prompts,
        max_new_tokens=model_cfg.max_new_tokens,
        max_prompt_length=model_cfg.max_prompt_length,
        batch_size=pairs_cfg.generation_batch_size,
        do_sample=True,
        temperature=pairs_cfg.temperature,
        num_return_sequences=pairs_cfg.samples_per_prompt,
        seed=pairs_cfg.seed,
        progress=f"pairs: sampling {pairs_cfg.samples_per_prompt} per prompt",
    )
    flat_prompts = [p for p, replies in zip(prompts, samples) for _ in replies]
    flat_scores = judge.score_all(flat_prompts, [r for replies in samples for r in replies])
    n = pairs_cfg.samples_per_prompt
    scores = [flat_scores[i * n : (i + 1) * n] for i in range(len(prompts))]
    if references is not None:
        reference_scores = judge.score_all(prompts, references)
    rows, stats = build_pairs(
        prompts,
        samples,
        scores,
        strategy=pairs_cfg.strategy,
        min_margin=pairs_cfg.min_margin,
        max_length_ratio=pairs_cfg.max_length_ratio,
        seed=pairs_cfg.seed,
        eval_prompt_keys=task.heldout_keys(),
        references=references,
        reference_scores=reference_scores,
    )
    train, heldout = split_heldout(rows, pairs_cfg.heldout_fraction, pairs_cfg.seed)
    stats.update(_sample_quality(task, prompts, samples, n))
    stats.update(
        {
            "mean_score": sum(flat_scores) / max(len(flat_scores), 1),
            "train": len(train),
            "heldout": len(heldout),
        }
    )
    info = {
        "recipe": f"on_policy/{pairs_cfg.strategy}",
        "judge": judge.name,
        "key": key,
        "key_inputs": key_inputs,
        "stats": stats,
        "content_hash": content_hash(train),
        "heldout_content_hash": content_hash(heldout),
    }
    log.info(
        "pairs: %d kept of %d prompts (pass@%d %s, dropped %s)",
        stats["kept"],
        stats["prompts"],
        n,
        f"{stats[f'pass_at_{n}']:.3f}" if f"pass_at_{n}" in stats else "-",
        stats["dropped"],
    )
    if is_main_process():
        _write_cache(directory, train, heldout, info)
    return PairSet(
        train,
        heldout,
        {**info, "cache": {"path": str(directory), "reused": False}},
        on_policy_account(info),
    )


def _sample_quality(
    task: Task, prompts: list[list[dict[str, str]]], samples: list[list[str]], n: int
) -> dict[str, float]:
    """Samples generated, and, where the task's own judge tells correct replies (the toy's
    rule), pass@n and the share of correct samples: how much the pairs can teach."""
    quality: dict[str, float] = {"generated": sum(len(s) for s in samples), "samples_per_prompt": n}
    if task.judge_needs_checkpoint or task.correct(1.0) is None:
        return quality
    rule = task.judge()
    correct = [
        [bool(task.correct(s)) for s in rule.score_all([p] * len(rs), rs)]
        for p, rs in zip(prompts, samples)
    ]
    quality[f"pass_at_{n}"] = sum(any(c) for c in correct) / max(len(prompts), 1)
    quality["sample_accuracy"] = sum(map(sum, correct)) / max(sum(map(len, correct)), 1)
    return quality
