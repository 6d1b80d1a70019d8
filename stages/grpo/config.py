"""Online RL stage knobs (GRPO, RLOO): sample a group of replies per prompt from the current
policy, reward each with the task's judge or the reward model, and push the policy towards
the replies that beat their group, KL-penalised to the SFT policy. No critic, no value model.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive, unit_interval
from stages.core.schema import StageConfig, check_choice, report_problem

# TRL's GRPOConfig.loss_type and scale_rewards choices.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
GRPO_REWARD_SCALINGS = ("group", "batch", "none")
# stage.reward: the task's own judge, or this experiment's reward model.
REWARD_SOURCES = ("task", "rm")


@dataclass
class OnlineRLStageConfig(StageConfig):
    """Knobs GRPO and RLOO share (both are TRL trainers with the same generation loop)."""

    parent: str | None = "sft"  # starts from, and is KL-penalised to, the SFT policy
    # LoRA: keep training the SFT adapter; TRL keeps a frozen copy as the reference.
    parent_adapter: str = "continue"
    # task: the task's judge (the toy's rule judge: a verifiable reward, no reward model);
    # rm: this experiment's reward model (runs/<exp>/rm; a learned, exploitable proxy).
    reward: str = "task"
    learning_rate: float = 1e-4  # higher learns faster but collapses the group's diversity
    max_steps: int = 400  # optimiser steps; the time/quality knob
    # Completions per micro-batch: per_device_batch_size / num_generations prompts each.
    per_device_batch_size: int = 64
    logging_steps: int = 10  # log every N steps
    # Replies sampled per prompt (the group): more = a steadier baseline, more sampling time.
    num_generations: int = 8
    num_prompts: int = 2048  # training prompts drawn from the task (never held-out ones)
    # KL coefficient to the SFT reference: lower drifts further (more reward, more risk of
    # exploiting an RM); 0 skips the reference forward entirely.
    beta: float = 0.04
    temperature: float = 1.0  # sampling temperature of the rollouts; lower = less exploration
    # Reply budget in tokens; None = model.max_new_tokens (what eval generates with).
    max_completion_length: int | None = None
    # Drop replies cut at the budget from the loss: no credit for unfinished answers.
    mask_truncated_completions: bool = False
    epsilon: float = 0.2  # PPO-style ratio clip; only bites with num_iterations > 1
    num_iterations: int = 1  # optimiser passes per sampled batch; >1 reuses samples off-policy

    BOUNDS = {
        **StageConfig.BOUNDS,
        "num_generations": at_least(2),
        "num_prompts": at_least(1),
        "beta": at_least(0),
        "temperature": positive(),
        "max_completion_length": at_least(1, nullable=True),
        "epsilon": unit_interval(),
        "num_iterations": at_least(1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.reward", self.reward, REWARD_SOURCES)
        completions = self.per_device_batch_size * self.gradient_accumulation_steps
        if self.num_generations >= 2 and completions >= 1 and completions % self.num_generations:
            fit = max(
                self.num_generations, completions // self.num_generations * self.num_generations
            )
            report_problem(
                f"stage.per_device_batch_size={self.per_device_batch_size} x "
                f"stage.gradient_accumulation_steps={self.gradient_accumulation_steps} = "
                f"{completions} completions per step is not a multiple of "
                f"stage.num_generations={self.num_generations} (each prompt's group must fit "
                f"in a step): e.g. stage.per_device_batch_size={fit}"
            )


@dataclass
class GRPOStageConfig(OnlineRLStageConfig):
    name: str = "grpo"
    # How token losses are averaged: dapo (over all tokens of the batch) and dr_grpo (a
    # constant) have no length bias; grpo (per reply) favours short correct replies.
    loss_type: str = "dapo"
    # Advantage = (reward - group mean) / std of the group (group), of the batch (batch), or
    # unscaled (none: no bias towards easy or hard prompts, per Dr. GRPO).
    scale_rewards: str = "group"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.loss_type", self.loss_type, GRPO_LOSS_TYPES)
        check_choice("stage.scale_rewards", self.scale_rewards, GRPO_REWARD_SCALINGS)
