"""RM stage: a reward model (1-label sequence classifier) on the SFT weights, trained on
preference pairs with TRL's RewardTrainer.

Recipe: resolve the SFT parent -> TRL args (validated before any weights load) -> preference
pairs (sampled from the SFT policy and judged by the toy judge, cached under the run dir; or a
local file) -> the classifier: SFT weights + a new score head (full), or a fresh SEQ_CLS LoRA
on the SFT weights (an SFT adapter is merged first; the head trains and is saved through
modules_to_save) -> train (Bradley-Terry loss, optional margin and reward centring) ->
save final/ (checked to hold the trained score head) -> held-out pairwise accuracy,
reward-margin summary, and a probe on the held-out toy prompts -> manifest, DONE. A rerun
after a failure past training loads final/ and only evaluates.

Loading the result (PPO's reward/value roles, the reward-model judge):
`stages.core.reward_scoring`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from peft import PeftModel
from safetensors import safe_open
from trl import RewardConfig, RewardTrainer

from data_recipes import toy
from data_recipes.validation_split import preference_row_prompt
from stages.core.handoff import write_jsonl_atomic
from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer
from stages.core.models import save_final as save_model
from stages.core.reward_scoring import RewardScorer, load_reward_model
from stages.core.runtime import is_main_process
from stages.core.schema import ConfigError
from stages.core.stage_pairs import stage_preference_pairs
from stages.core.stage_steps import trainable_model
from stages.core.trainer_args import (
    first_and_last,
    trainer_arguments,
)
from stages.core.training import train_resumably
from stages.core.validation import best_checkpoint_reloaded, hold_out_validation

log = logging.getLogger(__name__)

HELDOUT_REWARDS = "heldout_rewards.jsonl"  # held-out pairs with their rewards, for re-checking
HISTOGRAM_BINS = 10
# Parameter names of the score head: `score.weight`, or peft's trained copy of it
# (`...score.modules_to_save.default.weight`).
_SCORE_HEAD = re.compile(r"(^|\.)score\.")


class RewardTrainerWithHeadLR(RewardTrainer):
    """TRL's RewardTrainer, with its own learning rate for the new score head.

    The body starts from the SFT weights and the head from random: a large body LR wipes out
    the SFT features the head has to read (the tiny RM then never learns to tell a correct sum
    from a near miss), while a small head LR leaves the random head to drift for hundreds of
    steps before the body finds anything to feed it. So: small body LR, large head LR.
    """

    def __init__(self, *args: Any, head_learning_rate: float | None = None, **kwargs: Any):
        self.head_learning_rate = head_learning_rate
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        already_built = self.optimizer is not None
        optimizer = super().create_optimizer(model)
        if self.head_learning_rate is None or already_built:
            return optimizer
        named = (model if model is not None else self.model).named_parameters()
        head = [p for n, p in named if p.requires_grad and _SCORE_HEAD.search(n)]
        if not head:
            raise RuntimeError("stage.head_learning_rate is set but no trainable score head found")
        head_ids = {id(p) for p in head}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in head_ids]
        # The scheduler, created next, scales every group's own LR by the same schedule.
        optimizer.add_param_group(
            {"params": head, "lr": self.head_learning_rate, "weight_decay": 0.0}
        )
        return optimizer


def margin_summary(chosen: list[float], rejected: list[float]) -> dict[str, Any]:
    """Pairwise accuracy and the distribution of r(chosen) - r(rejected) on held-out pairs."""
    margins = torch.tensor([a - b for a, b in zip(chosen, rejected)], dtype=torch.float64)
    if margins.numel() == 0:
        return {"eval/heldout_pairs": 0}
    p10, p50, p90 = torch.quantile(margins, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    rewards = torch.tensor(chosen + rejected, dtype=torch.float64)
    return {
        "eval/heldout_pairs": margins.numel(),
        # Ties count as errors: a reward model that cannot separate a pair has not ranked it.
        "eval/pairwise_accuracy": float((margins > 0).double().mean()),
        "eval/margin_mean": float(margins.mean()),
        "eval/margin_std": float(margins.std(unbiased=False)),
        "eval/margin_p10": float(p10),
        "eval/margin_p50": float(p50),
        "eval/margin_p90": float(p90),
        "eval/margin_frac_negative": float((margins < 0).double().mean()),
        # Where rewards sit matters to PPO (its value model starts from them).
        "eval/reward_mean": float(rewards.mean()),
        "eval/reward_std": float(rewards.std(unbiased=False)),
    }


def margin_histogram(chosen: list[float], rejected: list[float]) -> dict[str, list[float]]:
    """Bin edges and counts of the held-out margins (for the manifest and the log)."""
    margins = torch.tensor([a - b for a, b in zip(chosen, rejected)], dtype=torch.float64)
    if margins.numel() == 0:
        return {"edges": [], "counts": []}
    low, high = float(margins.min()), float(margins.max())
    if math.isclose(low, high):
        low, high = low - 0.5, high + 0.5
    counts = torch.histc(margins, bins=HISTOGRAM_BINS, min=low, max=high)
    edges = torch.linspace(low, high, HISTOGRAM_BINS + 1)
    return {"edges": [round(float(e), 4) for e in edges], "counts": [int(n) for n in counts]}


def _log_histogram(histogram: dict[str, list[float]]) -> None:
    counts, edges = histogram["counts"], histogram["edges"]
    width = max(counts, default=0) or 1
    for n, lo, hi in zip(counts, edges, edges[1:]):
        log.info("margin [%7.2f, %7.2f) %5d %s", lo, hi, n, "#" * round(40 * n / width))


def toy_probe(scorer: RewardScorer, toy_cfg: Any) -> dict[str, float]:
    """On the held-out toy prompts (never in any pair), how often the RM ranks the correct
    answer above each kind of wrong reply: evasion, off by one, off by ten. PPO exploits
    whatever the RM gets wrong here."""
    problems = toy.eval_prompts(toy_cfg)
    kinds = {
        "evasive": lambda p: [toy.EVASIVE_REPLY],
        "off_by_1": lambda p: [f"{p.answer - 1}.", f"{p.answer + 1}."],
        "off_by_10": lambda p: [f"{p.answer - 10}.", f"{p.answer + 10}."],
    }
    prompts, replies, owners = [], [], []
    for p in problems:
        prompts.append(p.messages())
        replies.append(toy.correct_reply(p))
        owners.append(("correct", p))
        for kind, wrong in kinds.items():
            for reply in wrong(p):
                prompts.append(p.messages())
                replies.append(reply)
                owners.append((kind, p))
    scores = scorer.score(prompts, replies)
    correct = {p: s for (kind, p), s in zip(owners, scores) if kind == "correct"}
    wins: dict[str, list[bool]] = {kind: [] for kind in kinds}
    for (kind, p), s in zip(owners, scores):
        if kind != "correct":
            wins[kind].append(correct[p] > s)
    metrics = {f"eval/probe_vs_{kind}": sum(w) / max(len(w), 1) for kind, w in wins.items()}
    everything = [w for ws in wins.values() for w in ws]
    metrics["eval/probe_accuracy"] = sum(everything) / max(len(everything), 1)
    return metrics


def _saved_score_head(final_dir: Path) -> torch.Tensor:
    """The score-head weight in final/'s safetensors (full model or SEQ_CLS adapter)."""
    for path in sorted(final_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                if key.endswith("score.weight"):
                    return handle.get_tensor(key)
    raise RuntimeError(
        f"{final_dir} holds no score head (`score.weight`): the reward model would reload "
        "with a random head. With LoRA, the adapter must be task_type='SEQ_CLS'"
    )


def _trained_score_head(model: torch.nn.Module) -> torch.Tensor:
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    head = inner.score
    # peft wraps the head in ModulesToSaveWrapper: the trained copy is the active one.
    weight = (
        head.modules_to_save[head.active_adapter].weight
        if hasattr(head, "modules_to_save")
        else head.weight
    )
    return weight.detach().cpu()


def run(cfg: DictConfig) -> dict[str, Any]:
    stage = StageRun.begin(cfg, "rm")
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    parent = stage.parent
    assert parent is not None  # the schema requires a parent for rm
    if c.data.pairs.source == "on_policy" and c.data.pairs.judge != "toy":
        stage.release()
        raise ConfigError(
            f"data.pairs.judge={c.data.pairs.judge!r}: the RM stage trains the reward model, so "
            "its on-policy pairs must be judged by the rule judge (data.pairs.judge=toy)"
        )

    with stage:
        # 1. Tokenizer (with its chat template) from the parent, and TRL args: both fail fast.
        tokenizer = load_tokenizer(parent.final_dir, c.model)
        args = RewardConfig(
            **trainer_arguments(stage),
            max_length=c.model.max_length,
            center_rewards_coefficient=knobs.center_rewards_coefficient,
            dataset_num_proc=None,
        )

        # 2. Preference pairs; RewardTrainer subtracts a `margin` column whenever it is present.
        pair_set = stage_preference_pairs(stage, tokenizer)
        # stage.validation_fraction of the train pairs' prompts held out: evaluated every
        # eval_steps, the best checkpoint becomes final/.
        train_pairs, validation_pairs = hold_out_validation(
            stage, pair_set.train, preference_row_prompt
        )
        pair_set = dataclasses.replace(pair_set, train=train_pairs)
        train_rows = pair_set.train_dataset()
        validation_rows = validation_pairs and datasets.Dataset.from_list(validation_pairs)
        has_margin = "margin" in train_rows.column_names
        if knobs.use_margin and not has_margin:
            raise ConfigError(
                "stage.use_margin=true but the preference pairs have no `margin` column "
                f"({pair_set.info.get('path') or pair_set.info.get('recipe')}); add one or set "
                "stage.use_margin=false"
            )
        if has_margin and not knobs.use_margin:
            train_rows = train_rows.remove_columns("margin")
            if validation_rows:
                validation_rows = validation_rows.remove_columns("margin")
        log.info("rm: %d train pairs, %d held out", len(pair_set.train), len(pair_set.heldout))

        if stage.final_record is None:
            # 3. The classifier on the SFT weights: new score head (+ fresh SEQ_CLS adapter).
            loaded = trainable_model(stage, task="seq_cls", pad_token_id=tokenizer.pad_token_id)

            # 4. Train.
            with stage.phase("data"):
                trainer = RewardTrainerWithHeadLR(
                    model=loaded.model,
                    args=args,
                    train_dataset=train_rows,
                    eval_dataset=validation_rows or None,
                    processing_class=tokenizer,
                    head_learning_rate=knobs.head_learning_rate,
                )
            train_metrics = train_resumably(stage, trainer, expected_rows=len(pair_set.train))
            # RewardTrainer logs the batch accuracy r(chosen) > r(rejected) it trains on.
            train_metrics.update(
                first_and_last(trainer.state.log_history, "accuracy", "train/accuracy")
            )
            train_metrics["train/pairs"] = len(trainer.train_dataset)

            # final/ now (checked to hold the trained head), before the evaluation: if that
            # fails, the rerun loads final/ and only evaluates.
            def save(final_dir: Path) -> None:
                save_model(loaded, tokenizer, final_dir, model=trainer.model)
                saved, trained = _saved_score_head(final_dir), _trained_score_head(trainer.model)
                if not torch.equal(saved.to(trained.dtype), trained):
                    raise RuntimeError(f"{final_dir}: the saved score head is not the trained one")

            stage.save_final(
                kind=loaded.kind,
                base_model=loaded.base.as_dict(),
                train_metrics=train_metrics,
                save=save,
            )
            # The best checkpoint reloaded into the trainer can differ from final/: use final/.
            reward_model = None if best_checkpoint_reloaded(stage) else trainer.model
        else:  # an earlier attempt trained and saved final/, then failed
            reward_model = None
        if reward_model is None:
            with stage.phase("load"):
                reward_model = load_reward_model(
                    stage.final_stage(), c.model, stage.precision, peft_cfg=c.peft
                )
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])

        # 5. Held-out pairwise accuracy, margin distribution, and the toy probe.
        with stage.phase("eval"):
            scorer = RewardScorer(
                reward_model, tokenizer, batch_size=knobs.per_device_batch_size * 2,
                max_length=c.model.max_length,
            )  # fmt: skip
            chosen, rejected = scorer.score_pairs(pair_set.heldout)
            metrics.update(margin_summary(chosen, rejected))
            histogram = margin_histogram(chosen, rejected)
            if c.data.pairs.source == "on_policy" or c.data.sft.source == "toy":
                metrics.update(toy_probe(scorer, c.data.toy))
        if pair_set.heldout:
            log.info(
                "rm held-out pairwise accuracy %.3f on %d pairs (margin mean %.2f, p10 %.2f)",
                metrics["eval/pairwise_accuracy"], len(pair_set.heldout),
                metrics["eval/margin_mean"], metrics["eval/margin_p10"],
            )  # fmt: skip
            _log_histogram(histogram)
        else:
            log.warning("rm: no held-out pairs (data.pairs.heldout_fraction=0?): no accuracy")
        heldout_rewards = [
            {**row, "reward_chosen": a, "reward_rejected": b}
            for row, a, b in zip(pair_set.heldout, chosen, rejected)
        ]
        if is_main_process():
            write_jsonl_atomic(stage.run_dir / HELDOUT_REWARDS, heldout_rewards)

        # 6. Hand off: metrics, manifest, DONE.
        stage.manifest_extra["reward_margins"] = histogram
        stage.finish(
            metrics=metrics,
            data={**pair_set.info, "heldout_rewards_path": str(stage.run_dir / HELDOUT_REWARDS)},
        )
    return stage.metrics
