"""GRPO stage: online RL from the SFT policy with TRL's GRPOTrainer, rewarded by the task's
judge (a verifiable rule, no reward model) or by this experiment's reward model.

Recipe: resolve the SFT parent (through its manifest) and the reward (``stage.reward``: the
task's judge, or the RM stage, checked to be trained on this SFT) -> build TRL args (validated
before any weights load) -> the task's training prompts (never a held-out one) -> load the
trainable policy (continuing the SFT adapter, or the SFT full weights) and the judge -> train:
each step samples ``num_generations`` replies per prompt, rewards them, and pushes the policy
towards the replies that beat their group, KL-penalised (``beta``) to the SFT policy -> save
final/ -> compare with the SFT parent on held-out prompts -> manifest, DONE. A rerun after a
failure past training loads final/ and only compares.

RLOO (``stages/rloo``) runs this same recipe (`run_online_rl`) with TRL's RLOOTrainer.

The reference is always the SFT policy, never the bare base (`stages.core.reference_policy`):
with an adapter TRL freezes a "ref" copy of the continued SFT adapter; with full weights it
reloads the policy's own checkpoint, the parent's final/ (checked after the trainer is built).
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset
from omegaconf import DictConfig
from peft import PeftModel
from trl import GRPOConfig, GRPOTrainer

from stages.core.lifecycle import StageRun
from stages.core.models import load_tokenizer
from stages.core.reference_policy import check_reference, describe_reference, save_without_reference
from stages.core.reward_functions import reward_function, stage_reward_judge
from stages.core.schema import ConfigError
from stages.core.stage_steps import compare_and_report, frozen_policy, trainable_model
from stages.core.task import stage_task
from stages.core.trainer_args import first_and_last, trainer_arguments
from stages.core.training import train_resumably

log = logging.getLogger(__name__)

# Logged by TRL's online trainers -> our metric names (first and last logged value of each).
LOGGED_TRENDS = {
    "reward": "train/reward",  # mean reward of the sampled replies: the thing being optimised
    "kl": "train/kl",  # per-token KL to the reference (logged when beta > 0)
    "entropy": "train/entropy",
    "completions/mean_length": "train/completion_length",
    "completions/clipped_ratio": "train/clipped_ratio",  # replies cut at the token budget
    "frac_reward_zero_std": "train/frac_reward_zero_std",  # groups with nothing to learn
}


@dataclass(frozen=True)
class OnlineRLAlgorithm:
    """What differs between GRPO and RLOO: TRL's trainer, its config, and its own knobs."""

    trainer: type
    config: type
    knobs: tuple[str, ...]  # stage knobs passed to the TRL config under the same name


GRPO = OnlineRLAlgorithm(GRPOTrainer, GRPOConfig, ("loss_type", "scale_rewards"))


def run(cfg: DictConfig) -> dict[str, Any]:
    return run_online_rl(cfg, "grpo", GRPO)


def run_online_rl(cfg: DictConfig, name: str, algorithm: OnlineRLAlgorithm) -> dict[str, Any]:
    stage = StageRun.begin(cfg, name)
    if stage.finished:
        return stage.metrics
    c, knobs = stage.cfg, stage.cfg.stage
    parent = stage.parent
    assert parent is not None  # the schema requires a parent for online RL
    with stage.guard():  # a missing or stale RM fails here, before any weights load
        task = stage_task(stage, parent)
        if task is None:
            raise ConfigError(
                f"{name} samples replies to the task's training prompts, but "
                "data.prompts.source=none: set data.prompts.source=toy or "
                "data.prompts.path=<your prompt file>"
            )
        reward = stage_reward_judge(stage, task)

    with stage:
        # 1. Tokenizer (with its chat template) from the parent, and TRL args: both fail fast.
        tokenizer = load_tokenizer(parent.final_dir, c.model)
        online_args = {
            "beta": knobs.beta,
            "num_generations": knobs.num_generations,
            "temperature": knobs.temperature,
            "max_completion_length": knobs.max_completion_length or c.model.max_new_tokens,
            "mask_truncated_completions": knobs.mask_truncated_completions,
            "epsilon": knobs.epsilon,
            "num_iterations": knobs.num_iterations,
            "log_completions": False,  # eval_samples.jsonl records replies; no rich tables
            **{knob: getattr(knobs, knob) for knob in algorithm.knobs},
        }
        args = algorithm.config(**{**online_args, **trainer_arguments(stage)})

        # 2. Training prompts from the task: the toy train pool or your prompt file.
        prompts = task.training_prompts(knobs.num_prompts, c.seed)
        log.info(
            "%s: %d training prompts, %d replies each, reward: %s",
            name, len(prompts), knobs.num_generations, reward.source,
        )  # fmt: skip

        if stage.final_record is None:
            # 3. Policy: the SFT adapter continued (LoRA/QLoRA) or the SFT full weights; and
            #    the judge that rewards its samples (the RM loads only now).
            loaded = trainable_model(stage)
            with stage.phase("data"):
                trainer = algorithm.trainer(
                    model=loaded.model,
                    reward_funcs=reward_function(reward.load(), f"{reward.source}_reward"),
                    args=args,
                    train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                    processing_class=tokenizer,
                )
            if knobs.beta > 0:
                check_reference(trainer.model, algorithm.trainer.__name__)
                _check_full_weight_reference(trainer, parent.final_dir)

            # 4. Train.
            train_metrics = train_resumably(stage, trainer, expected_rows=len(prompts))
            history = trainer.state.log_history
            # At the first log the policy is the SFT's: the reward trend is what RL added.
            for logged, metric in LOGGED_TRENDS.items():
                train_metrics.update(first_and_last(history, logged, metric))

            # 5. final/ (with the reference in the manifest) now, before the comparison: if
            #    that fails, the rerun loads final/ and only compares.
            stage.manifest_extra["reference"] = (
                describe_reference(loaded, parent) if knobs.beta > 0 else {"kind": "none"}
            )
            stage.manifest_extra["reward"] = reward.description
            stage.save_final(
                kind=loaded.kind,
                base_model=loaded.base.as_dict(),
                train_metrics=train_metrics,
                save=save_without_reference(loaded, tokenizer, trainer),
            )
            policy = trainer.model
            del trainer  # the reward model and reference copy go before the comparison loads
            gc.collect()
        else:  # an earlier attempt trained and saved final/, then failed
            policy = frozen_policy(stage, stage.final_stage())
        metrics: dict[str, Any] = dict(stage.final_record["train_metrics"])

        # 6. Compare with the SFT parent on held-out prompts (greedy accuracy, KL, ...).
        sft_policy = frozen_policy(stage, parent)
        comparison = compare_and_report(stage, policy, sft_policy, tokenizer, task, metrics)

        # 7. Hand off: metrics.json, manifest.json, DONE.
        stage.finish(
            metrics=metrics,
            data={"prompts": len(prompts), "reward": reward.description},
            eval_samples=comparison.samples,
        )
    return stage.metrics


def _check_full_weight_reference(trainer: Any, sft_final: Path) -> None:
    """Full weights: TRL reloads the reference from the policy's ``_name_or_path``, which must
    be the SFT parent's final/ (else the reference would be another model)."""
    if isinstance(trainer.model, PeftModel) or trainer.ref_model is None:
        return
    source = Path(trainer.ref_model.config._name_or_path)
    if not source.is_dir() or source.resolve() != Path(sft_final).resolve():
        raise RuntimeError(
            f"{type(trainer).__name__} loaded its reference from {source}, not the SFT "
            f"policy in {sft_final}: the KL penalty would pull towards the wrong model"
        )
