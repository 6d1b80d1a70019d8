"""The proxy reward of finished runs: this experiment's reward model scores their greedy
held-out replies, for the proxy-vs-true frontier of `make frontier` (Gao et al. 2022).

Every policy stage records the held-out prompts with its greedy replies in
``eval_samples.jsonl`` (``prompt``: the prompt's text, ``reply``); the true reward is the
task's judge on those replies (``eval/accuracy``), the proxy reward is the mean score the
experiment's RM (``runs/<exp>/rm/final``) gives them. The RM's scores are on an arbitrary
scale (a Bradley-Terry logit): only differences between runs mean something.

Scores are cached in a JSON file keyed by each run's manifest sha256 (what its DONE records)
and the sha256 of its eval_samples.jsonl, under the RM's manifest sha256: re-plotting scores
only runs that are new or changed, and another RM rescores everything. A run without
eval_samples.jsonl, or with a row that has no prompt / reply, is left out with a note.

Each sample's prompt is scored as one user turn (how the toy task and the prompt files of
`stages/tasks` ask; eval_samples.jsonl records the text of the last turn only).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from data_recipes.rows import DataFormatError, iter_rows
from stages.core import handoff
from stages.core.task import JUDGE_REWARD_STAGE

if TYPE_CHECKING:
    from stages.compare import Run
    from stages.core.handoff import ParentStage

# Scores a batch: (chat prompts, replies) -> one reward each.
BatchScorer = Callable[[list[list[dict[str, str]]], list[str]], list[float]]
CACHE_VERSION = 1


@dataclass
class ProxyRewards:
    """Mean RM score per run dir, what was left out and why, and the RM that scored."""

    by_run: dict[Path, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    reward_model: str | None = None  # "<rm run dir> (manifest sha256 <12 hex>...)"
    scored: int = 0  # runs scored now (the rest came from the cache)


def load_rm_scorer(rm: ParentStage) -> BatchScorer:
    """A finished RM stage as a batch scorer, loaded as its own manifest describes it (model
    config, precision, peft kind): the same loading and tokenisation as PPO's reward role."""
    from omegaconf import OmegaConf

    from stages.core.reward_scoring import RewardScorer
    from stages.core.runtime import resolve_precision
    from stages.core.schema import ModelConfig

    model_cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), rm.manifest["config"]["model"])
    )
    precision = resolve_precision(str(rm.manifest.get("precision") or "auto"))
    return RewardScorer.from_stage(rm, model_cfg, precision).score  # type: ignore[arg-type]


def _run_key(run: Run) -> str:
    # DONE records the manifest's sha256; hash the manifest for a DONE without one.
    recorded = handoff.read_done(run.path).get("manifest_sha256")
    return str(recorded or handoff.file_sha256(run.path / handoff.MANIFEST))


def _samples(path: Path) -> tuple[list[list[dict[str, str]]], list[str]]:
    prompts, replies = [], []
    for row_number, row in iter_rows(path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("reply"), str):
            raise DataFormatError(
                "a held-out sample without a text prompt and reply",
                path=path,
                row=row_number,
                expected='{"prompt": str, "reply": str, ...} as the stages write it',
                hint="re-run the stage with force=true to rewrite its eval_samples.jsonl",
            )
        prompts.append([{"role": "user", "content": row["prompt"]}])
        replies.append(row["reply"])
    if not replies:
        raise DataFormatError("no samples", path=path, expected="one row per held-out prompt")
    return prompts, replies


def _read_cache(path: Path, reward_model_sha: str) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if (
        not isinstance(cache, dict)
        or cache.get("version") != CACHE_VERSION
        or cache.get("reward_model_sha256") != reward_model_sha
    ):
        return {}  # scores of another RM (or format) are not this RM's
    return cache.get("runs") or {}


def proxy_rewards(
    runs: Sequence[Run],
    runs_root: str | Path,
    experiment: str,
    cache_path: Path,
    *,
    load_scorer: Callable[[ParentStage], BatchScorer] | None = None,
) -> ProxyRewards:
    """The mean RM score of each run's held-out replies (cached in ``cache_path``).

    No finished RM stage (``runs/<experiment>/rm``): no proxy rewards, one note saying how
    to make it. The RM is loaded at most once (by ``load_scorer``, default `load_rm_scorer`),
    and only when a run is not in the cache."""
    load_scorer = load_scorer or load_rm_scorer
    result = ProxyRewards()
    try:
        rm = handoff.resolve_parent(runs_root, experiment, JUDGE_REWARD_STAGE, child="frontier")
    except handoff.HandoffError as err:
        result.notes.append(f"no proxy reward: {err}")
        return result
    result.reward_model = f"{rm.run_dir} (manifest sha256 {rm.manifest_sha256[:12]}...)"
    cached = _read_cache(cache_path, rm.manifest_sha256)
    entries: dict[str, Any] = {}
    scorer: BatchScorer | None = None
    for run in runs:
        samples_path = run.path / handoff.EVAL_SAMPLES
        if not samples_path.is_file():
            result.notes.append(f"{run.label}: no {handoff.EVAL_SAMPLES}, so no proxy reward")
            continue
        key = _run_key(run)
        samples_sha = handoff.file_sha256(samples_path)
        entry = cached.get(key)
        if not (isinstance(entry, dict) and entry.get("eval_samples_sha256") == samples_sha):
            try:
                prompts, replies = _samples(samples_path)
            except DataFormatError as err:
                detail = " ".join(str(err).splitlines())  # one line per note
                result.notes.append(f"{run.label}: no proxy reward: {detail}")
                continue
            scorer = scorer or load_scorer(rm)
            scores = scorer(prompts, replies)
            entry = {
                "run": run.label,
                "eval_samples_sha256": samples_sha,
                "num_samples": len(scores),
                "proxy_reward": sum(scores) / len(scores),
            }
            result.scored += 1
        entries[key] = entry
        result.by_run[run.path] = float(entry["proxy_reward"])
    merged = {**cached, **entries}  # runs scored before and not plotted now stay cached
    if merged != cached:
        handoff.write_json_atomic(
            cache_path,
            {
                "version": CACHE_VERSION,
                "reward_model": str(rm.run_dir),
                "reward_model_sha256": rm.manifest_sha256,
                "runs": merged,
            },
        )
    return result
