"""Iterative (online) DPO: ``stage.rounds`` rounds of sample -> judge -> DPO.

Round 1 is plain DPO on the SFT policy's judged samples (trained in the run dir, as with
``rounds=1``). Round r > 1 samples fresh pairs from round r-1's policy on the task's training
prompts (``data.pairs.seed + r - 1``), cached under a key holding the sha256 of round r-1's
saved weights, and trains more DPO steps from that policy (``max_steps``, capped at
``round_max_epochs`` epochs of the round's pairs) against the reference of
``stage.round_reference``: the SFT policy, or round r-1's.

Each round r < K is saved like a stage, in ``round-<r>/``: ``final/`` (the policy), its
trainer checkpoints (r > 1), and ``round.json``, written last (file hashes, the config and
upstream shas it was trained with, the round's record). A rerun continues after the last
round with a valid ``round.json``; a round that was interrupted resumes from its own
checkpoints. Round K is the stage's ``final/``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import PeftModel
from trl import DPOConfig, DPOTrainer

from data_recipes.pairs import PairSet
from data_recipes.prompts import prompt_key
from stages.core import handoff
from stages.core.comparison import compare_with_parent
from stages.core.data_accounting import preference_pairs_to_train
from stages.core.on_policy_pairs import load_cached
from stages.core.reference_policy import (
    REFERENCE_ADAPTER,
    check_reference,
    save_without_reference,
)
from stages.core.runtime import is_main_process, main_process_first
from stages.core.stage_pairs import stage_preference_pairs
from stages.core.stage_steps import frozen_policy, trainable_model
from stages.core.trainer_args import first_and_last, trainer_arguments
from stages.core.training import train_resumably

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from stages.core.lifecycle import StageRun
    from stages.core.models import LoadedModel
    from stages.core.task import Task

log = logging.getLogger(__name__)

ROUND_RECORD = "round.json"  # in round-<r>/, written last: the round is complete
_ROUND_DIR = re.compile(r"^round-(\d+)$")


def round_dir(run_dir: Path, r: int) -> Path:
    return run_dir / f"round-{r}"


@dataclass
class RoundInputs:
    """What every round shares: the recipe's tokenizer, DPO arguments, the frozen SFT policy
    (parent, sampler of round 1, reference with ``sft``), the task, and round 1's pairs (their
    held-out pairs score every round, so the rounds' preference metrics compare)."""

    tokenizer: PreTrainedTokenizerBase
    dpo_args: dict[str, Any]
    sft_policy: torch.nn.Module
    task: Task | None
    first_pairs: PairSet
    trainer_class: type = DPOTrainer  # DPOTrainer, or its replay subclass (data.mix)


def train_dpo(
    stage: StageRun,
    trainer: DPOTrainer,
    pair_set: PairSet,
    *,
    sft_reference: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Check the reference TRL built, train (resuming from ``stage.resume_checkpoint``), and
    return the training metrics.

    ``sft_reference`` (adapters only): the frozen SFT policy whose adapter must be the
    reference, although the adapter trained is a later round's (TRL copies that one).
    """
    if sft_reference is not None:
        restore_sft_reference(trainer.model, sft_reference)
    check_reference(trainer.model, "DPOTrainer")
    train_metrics = train_resumably(stage, trainer, expected_rows=len(pair_set.train))
    history = trainer.state.log_history
    # rewards/* at the first log are ~0 (reference = policy); at the end they show how far DPO
    # separated chosen from rejected.
    train_metrics.update(first_and_last(history, "rewards/margins", "train/reward_margin"))
    train_metrics.update(first_and_last(history, "rewards/accuracies", "train/reward_accuracy"))
    return train_metrics


def restore_sft_reference(model: torch.nn.Module, sft_policy: torch.nn.Module) -> None:
    """Put the SFT adapter's weights into TRL's frozen "ref" adapter of ``model``.

    TRL fills "ref" with a copy of the adapter it trains: round r-1's from round 2 on. With
    ``stage.round_reference=sft`` the reference must stay the SFT policy, never that copy and
    never the bare base: every "ref" parameter gets its SFT value, or this fails.
    """
    if not isinstance(model, PeftModel) or REFERENCE_ADAPTER not in model.peft_config:
        raise RuntimeError("DPOTrainer built no frozen 'ref' adapter to hold the SFT adapter")
    sft_params = {
        name.replace(".default.", f".{REFERENCE_ADAPTER}."): param
        for name, param in sft_policy.named_parameters()
        if ".default." in name
    }
    ref_params = {n: p for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n}
    if set(sft_params) != set(ref_params):
        missing = sorted(set(ref_params) ^ set(sft_params))[:3]
        raise RuntimeError(f"the SFT adapter does not fit TRL's 'ref' adapter: {missing} ...")
    with torch.no_grad():
        for name, param in ref_params.items():
            param.copy_(sft_params[name].to(param.device, param.dtype))


def _weights_sha256(files: dict[str, str]) -> str:
    """One sha256 for a saved policy: of its files' sha256s."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _round_stage(stage: StageRun, saved: dict[str, Any]) -> handoff.ParentStage:
    """A finished round's ``round-<r>/final`` as a stage reference (to load it like a parent)."""
    manifest = {
        "kind": saved["kind"],
        "base_model": saved["base_model"],
        "config": stage.resolved_config,
    }
    directory = round_dir(stage.run_dir, saved["record"]["round"])
    return handoff.ParentStage(stage.name, directory, manifest, saved["weights_sha256"])


def _upstream_shas(stage: StageRun) -> dict[str, str]:
    return {name: p.manifest_sha256 for name, p in stage.upstream.items()}


def _saved_round(stage: StageRun, r: int) -> tuple[dict[str, Any] | None, str | None]:
    """(round.json, None) of a complete round r made with this config and these upstream
    stages, else (None, why not) -- why is None when the round was simply never finished."""
    directory = round_dir(stage.run_dir, r)
    try:
        saved = json.loads((directory / ROUND_RECORD).read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as err:
        return None, f"{directory / ROUND_RECORD} is unreadable ({err})"
    if saved.get("config_sha256") != stage.config_sha256:
        return None, "it was trained with another config"
    if saved.get("upstream") != _upstream_shas(stage):
        return None, "a stage it was trained from was re-run since"
    changed = handoff.changed_files(
        saved.get("files") or {}, handoff.final_file_hashes(directory / handoff.FINAL)
    )
    if changed:
        return None, f"its final/ changed since it was saved ({changed[:3]})"
    return saved, None


def finished_rounds(stage: StageRun, rounds: int) -> list[dict[str, Any]]:
    """The rounds a rerun keeps (1, 2, ... up to the first not complete), after clearing what
    must not be reused: everything with ``force=true``; a round made with another config or
    upstream, and every round after it; a half-saved ``final/`` of the round to continue
    (its checkpoints stay: it resumes from them)."""
    run_dir = stage.run_dir
    existing = sorted(
        int(m.group(1)) for p in run_dir.glob("round-*") if (m := _ROUND_DIR.match(p.name))
    )
    kept: list[dict[str, Any]] = []
    with main_process_first():
        for r in range(1, rounds):
            saved, why_not = (None, None) if stage.cfg.force else _saved_round(stage, r)
            if saved is None:
                if why_not:
                    log.warning("%s: %s; training it again", round_dir(run_dir, r), why_not)
                break
            kept.append(saved)
        open_round = len(kept) + 1
        if is_main_process():
            for r in existing:
                directory = round_dir(run_dir, r)
                if r > open_round or (r == open_round and stage.cfg.force):
                    shutil.rmtree(directory)  # built on a round that is trained again
                elif r == open_round and (directory / ROUND_RECORD).exists():
                    shutil.rmtree(directory)  # complete, but for another config or upstream
                elif r == open_round:
                    shutil.rmtree(directory / handoff.FINAL, ignore_errors=True)
    if kept:
        log.info("dpo: rounds 1-%d already trained (%s): continuing", len(kept), run_dir)
    return kept


def _resume_checkpoint(directory: Path) -> Path | None:
    """The last complete checkpoint of a round's own trainer dir; half-written ones go."""
    for checkpoint in handoff.incomplete_checkpoints(directory):
        log.warning("%s is incomplete: skipping it", checkpoint)
        if is_main_process():
            shutil.rmtree(checkpoint, ignore_errors=True)
    return handoff.last_complete_checkpoint(directory)


def reference_description(stage: StageRun, loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's ``reference`` of an iterative run: the SFT parent as the anchor, and
    what each round's reference was (every round's record names its own)."""
    assert stage.parent is not None
    adapter = isinstance(loaded.model, PeftModel)
    knob = stage.cfg.stage.round_reference
    if knob == "previous":
        kind = "previous_round_adapter_frozen_copy" if adapter else "previous_round_full_weights"
    else:
        kind = "sft_adapter_restored_each_round" if adapter else "sft_full_weights"
    ref = stage.parent.as_manifest_ref()
    return {**ref, "kind": kind, "checkpoint_kind": ref["kind"], "round_reference": knob}


def round_console_line(record: dict[str, Any], rounds: int) -> str:
    def number(key: str) -> str:
        value = record.get(key)
        return f"{value:.4g}" if isinstance(value, (int, float)) else "-"

    return (
        f"dpo round {record['round']}/{rounds}: {record['train_pairs']} train pairs "
        f"(sampled by {record['sampled_by']}) | accuracy {number('eval/accuracy')} | "
        f"KL/seq {number('compare/kl_per_sequence')} | KL/token {number('compare/kl_per_token')}"
        f" | reference {record['reference_policy']}"
    )


def report_round(stage: StageRun, record: dict[str, Any]) -> None:
    """One console line and one W&B log per finished round."""
    log.info(round_console_line(record, stage.cfg.stage.rounds))
    logged = {
        "round": record["round"],
        "round/accuracy": record.get("eval/accuracy"),
        "round/reward": record.get("compare/policy_reward"),
        "round/kl_per_sequence": record.get("compare/kl_per_sequence"),
        "round/kl_per_token": record.get("compare/kl_per_token"),
        "round/train_pairs": record["train_pairs"],
    }
    # A task that judges no correctness (an RM-judged prompt file) has no accuracy.
    stage.tracker.log({k: v for k, v in logged.items() if v is not None})


def _with_comparison(record: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    accuracy = metrics.get("eval/accuracy", metrics.get("compare/policy_accuracy"))
    return {
        **record,
        "eval/accuracy": accuracy,
        "compare/kl_per_sequence": metrics.get("compare/kl_per_sequence"),
        "compare/kl_per_token": metrics.get("compare/kl_per_token"),
        "compare/policy_reward": metrics.get("compare/policy_reward"),  # the judge's mean score
    }


def train_rounds(stage: StageRun, inputs: RoundInputs) -> tuple[torch.nn.Module, list[dict]]:
    """Train every round not finished yet; the last one is saved as the stage's ``final/``.
    Returns the last round's policy and the records of rounds 1..K (round K without its
    comparison: the recipe's final comparison fills it in, `finish_rounds`)."""
    c, knobs = stage.cfg, stage.cfg.stage
    rounds = knobs.rounds
    if stage.final_record is not None:  # every round trained; the final comparison failed
        return frozen_policy(stage, stage.final_stage()), list(stage.manifest_extra["rounds"])

    done = finished_rounds(stage, rounds)
    for saved in done:
        report_round(stage, saved["record"])
    base_model = done[0]["base_model"] if done else None
    policy: torch.nn.Module | None = None
    for r in range(len(done) + 1, rounds + 1):
        previous = _round_stage(stage, done[-1]) if r > 1 else None
        sampler: torch.nn.Module | None = None
        if previous is None:
            pair_set = inputs.first_pairs
        else:
            # Fresh on-policy pairs: round r-1's samples on new training prompts, cached under
            # the sha256 of its weights (a retrained round r-1 never reuses them).
            sampler = frozen_policy(stage, previous)
            pair_set = stage_preference_pairs(
                stage,
                inputs.tokenizer,
                policy=sampler,
                task=inputs.task,
                sampled_by={
                    "stage": stage.name,
                    "round": r - 1,
                    "weights_sha256": previous.manifest_sha256,
                    "kind": previous.kind,
                },
                seed=c.data.pairs.seed + r - 1,
            )
        fresh_pairs = len(pair_set.train)
        if previous is not None and knobs.round_pairs == "accumulate":
            pair_set = with_earlier_pairs(stage, inputs, done, pair_set)
        log.info("dpo round %d/%d: %d train pairs (%d fresh), %d held out", r, rounds,
                 len(pair_set.train), fresh_pairs, len(pair_set.heldout))  # fmt: skip

        # Round r > 1 continues round r-1's policy (its adapter, or its full weights).
        loaded = trainable_model(stage, start_from=previous)
        base_model = base_model or loaded.base.as_dict()
        adapter = isinstance(loaded.model, PeftModel)
        follow_previous = previous is not None and knobs.round_reference == "previous"
        if adapter:
            ref_model = None  # TRL's frozen copy of the adapter trained: round r-1's
        else:
            ref_model = sampler if follow_previous else inputs.sft_policy
        if sampler is not None and ref_model is not sampler:
            sampler = None  # done sampling: free it before training
            gc.collect()
        sft_reference = inputs.sft_policy if adapter and previous and not follow_previous else None

        trainer_dir = stage.run_dir if r == 1 else round_dir(stage.run_dir, r)
        if r > 1:  # round 1's checkpoints are the run dir's, found by StageRun.begin
            stage.resume_checkpoint = _resume_checkpoint(trainer_dir)
        args = DPOConfig(
            **{**inputs.dpo_args, **trainer_arguments(stage), "output_dir": str(trainer_dir)}
        )
        if r > 1:
            args.max_steps = round_steps(args, len(pair_set.train), knobs.round_max_epochs)
            args.warmup_steps = int(knobs.warmup_ratio * args.max_steps)
        with stage.phase("data"):
            trainer = inputs.trainer_class(
                model=loaded.model,
                ref_model=ref_model,
                args=args,
                train_dataset=pair_set.train_dataset(),
                processing_class=inputs.tokenizer,
            )
        train_metrics = train_dpo(stage, trainer, pair_set, sft_reference=sft_reference)
        record: dict[str, Any] = {
            "round": r,
            "train_pairs": len(pair_set.train),
            "fresh_pairs": fresh_pairs,
            "heldout_pairs": len(pair_set.heldout),
            "pairs_cache": pair_set.info.get("cache", {}).get("path"),
            "reference": knobs.round_reference,
            "reference_policy": f"round-{r - 1}" if follow_previous else "sft",
            "sampled_by": "sft" if previous is None else f"round-{r - 1}",
            "sampled_by_sha256": (
                stage.parent.manifest_sha256 if previous is None else previous.manifest_sha256
            ),
            "train_steps": args.max_steps,
            "train/reward_accuracy_last": train_metrics.get("train/reward_accuracy_last"),
        }
        save = save_without_reference(loaded, inputs.tokenizer, trainer)
        if r == rounds:
            # The stage's final/ (with every round's record) now, before the comparison.
            stage.manifest_extra["reference"] = reference_description(stage, loaded)
            stage.manifest_extra["rounds"] = [s["record"] for s in done] + [record]
            stage.save_final(
                kind=loaded.kind, base_model=base_model, train_metrics=train_metrics, save=save
            )
            policy = trainer.model
            break
        saved = _save_round(stage, r, record, save, loaded.kind, base_model, train_metrics)
        comparison = compare_with_parent(
            trainer.model,
            inputs.sft_policy,
            inputs.tokenizer,
            task=inputs.task,
            model_cfg=c.model,
            heldout_pairs=inputs.first_pairs.heldout,
            seed=c.seed,
            policy_name=f"dpo round {r}",
            parent_name=stage.parent.stage,
        )
        saved["record"] = _with_comparison(record, comparison.metrics)
        if is_main_process():  # last: round r is complete
            handoff.write_json_atomic(round_dir(stage.run_dir, r) / ROUND_RECORD, saved)
        report_round(stage, saved["record"])
        done.append(saved)
        del trainer, loaded, sampler, ref_model
        gc.collect()
    assert policy is not None
    return policy, list(stage.manifest_extra["rounds"])


def with_earlier_pairs(
    stage: StageRun, inputs: RoundInputs, done: list[dict[str, Any]], fresh: PairSet
) -> PairSet:
    """``fresh`` (round r's own pairs) plus the train pairs of rounds 1..r-1, each once, none
    on a prompt of round 1's held-out pairs (they score every round). Earlier rounds' pairs
    come from their caches (``pairs_cache`` in each round's record)."""
    c = stage.cfg
    earlier = [inputs.first_pairs]
    for saved in done[1:]:
        cache = Path(saved["record"]["pairs_cache"])
        cached = load_cached(cache)
        if cached is None:
            raise handoff.HandoffError(
                f"stage.round_pairs=accumulate needs round {saved['record']['round']}'s pairs, "
                f"but their cache {cache} is gone: re-run with force=true (or "
                "stage.round_pairs=fresh)"
            )
        # The same too-long filter as when that round trained on them.
        max_length = c.stage.trainer_overrides.get("max_length", c.model.max_length)
        earlier.append(
            preference_pairs_to_train(
                cached, inputs.tokenizer, max_length, stage.name, c.data.max_dropped_fraction
            )
        )
    held = {prompt_key(row["prompt"]) for row in inputs.first_pairs.heldout}
    seen: set[str] = set()
    rows = []
    for row in [*fresh.train, *(r for pairs in earlier for r in pairs.train)]:
        key = json.dumps([prompt_key(row["prompt"]), row["chosen"], row["rejected"]])
        if key not in seen and prompt_key(row["prompt"]) not in held:
            seen.add(key)
            rows.append(row)
    return PairSet(rows, fresh.heldout, fresh.info, fresh.account)


def round_steps(args: DPOConfig, pairs: int, max_epochs: float) -> int:
    """Steps of a round after the first: ``args.max_steps``, capped at ``max_epochs`` epochs
    of the round's ``pairs`` at the effective batch (per device x accumulation x processes)."""
    batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    return max(1, min(args.max_steps, math.ceil(max_epochs * pairs / batch)))


def _save_round(
    stage: StageRun,
    r: int,
    record: dict[str, Any],
    save: Any,
    kind: str,
    base_model: dict[str, Any],
    train_metrics: dict[str, Any],
) -> dict[str, Any]:
    """Save round r's policy to ``round-<r>/final`` (fsynced); returns its round.json
    payload, which the caller writes last, after the round's comparison."""
    final_dir = round_dir(stage.run_dir, r) / handoff.FINAL
    with main_process_first():  # the other ranks hash (and later load) it once it is written
        if is_main_process():
            shutil.rmtree(final_dir, ignore_errors=True)
            save(final_dir)
            handoff.fsync_tree(final_dir)
        files = handoff.final_file_hashes(final_dir)
    return {
        "config_sha256": stage.config_sha256,
        "upstream": _upstream_shas(stage),
        "kind": kind,
        "base_model": base_model,
        "files": files,
        "weights_sha256": _weights_sha256(files),
        "train_metrics": train_metrics,
        "record": record,
    }


def finish_rounds(stage: StageRun, records: list[dict[str, Any]], metrics: dict[str, Any]) -> None:
    """After the stage's final comparison: the last round's record gets it, the manifest
    gets every round (``rounds``), metrics.json the flat ``round<r>/...`` numbers."""
    records = [*records[:-1], _with_comparison(records[-1], metrics)]
    report_round(stage, records[-1])
    stage.manifest_extra["rounds"] = records
    for record in records:
        r = record["round"]
        flat = {
            f"round{r}/accuracy": record["eval/accuracy"],
            f"round{r}/kl_per_sequence": record["compare/kl_per_sequence"],
            f"round{r}/train_pairs": record["train_pairs"],
        }
        metrics.update({k: v for k, v in flat.items() if v is not None})
