"""PPO hyper-parameters: every knob of our PPO, its default, and its trade-off.

``PPOHyperparams`` is a plain dataclass with OmegaConf-compatible field types, so the Hydra
stage schema can inherit from it and every field stays overridable from the command line
(``stage.kl_coef=0.1``). Defaults follow trl 1.12.0's ``PPOConfig`` and "The N Implementation
Details of RLHF with PPO" (Huang et al.) unless a comment says otherwise.

Batch vocabulary (one *update* = one rollout + several PPO epochs over it):

* ``rollout_batch_size`` prompts per update, over all processes (each rank samples
  ``rollout_batch_size / world_size`` of them, one completion per prompt);
* each rank splits its share into ``num_minibatches`` minibatches: one optimiser step each,
  repeated for ``num_ppo_epochs`` epochs over freshly shuffled minibatches;
* each minibatch is split again into ``gradient_accumulation_steps`` micro-batches
  (memory knob only: the step is the same whatever the split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from stages.core.bounds import (
    NULLABLE_SEED,
    Bound,
    at_least,
    out_of_bounds,
    positive,
    unit_interval,
)
from stages.core.schema import StageConfig, check_bounds, check_choice, report_problem

KL_ESTIMATORS = ("k1", "k3")
LR_SCHEDULERS = ("linear", "constant", "cosine")


class PPOConfigError(ValueError):
    """A PPO hyper-parameter (or a combination of them) is invalid; the message names it."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


@dataclass
class PPOHyperparams:
    """All PPO knobs. Every field has a default (the Hydra schema inherits from this class)."""

    # ------------------------------------------------------------------ batch and schedule
    rollout_batch_size: int = field(
        default=64,
        metadata={"help": "Prompts sampled per update over all processes. Bigger: less noisy "
                  "advantages, slower updates."},
    )  # fmt: skip
    num_ppo_epochs: int = field(
        default=4,
        metadata={"help": "Passes over each rollout. More reuse per sample, but the policy "
                  "drifts further from the one that sampled it (more clipping)."},
    )  # fmt: skip
    num_minibatches: int = field(
        default=1,
        metadata={"help": "Optimiser steps per PPO epoch (the rollout is split into this many "
                  "minibatches). More steps per rollout, noisier each."},
    )  # fmt: skip
    gradient_accumulation_steps: int = field(
        default=1,
        metadata={"help": "Micro-batches per minibatch. Memory knob only: same update, "
                  "smaller activations, more passes."},
    )  # fmt: skip
    total_updates: int = field(
        default=100,
        metadata={"help": "Updates (rollout + PPO epochs) to run. Ignored when total_episodes "
                  "is set."},
    )  # fmt: skip
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "If set, total prompts to sample; updates = ceil(total_episodes / "
                  "rollout_batch_size)."},
    )  # fmt: skip
    rollout_forward_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per no-grad forward during the rollout (generation and "
                  "scoring). None = the whole local batch: fastest, most memory."},
    )  # fmt: skip

    # ------------------------------------------------------------------ sampling
    response_length: int = field(
        default=53,
        metadata={"help": "Max new tokens per completion. Longer: more room to answer, "
                  "slower rollouts."},
    )  # fmt: skip
    temperature: float = field(
        default=0.7,
        metadata={"help": "Sampling temperature; log-probs are taken at the same temperature "
                  "(logits / T). Lower: less exploration."},
    )  # fmt: skip
    stop_token: str | None = field(
        default="eos",
        metadata={"help": "'eos' (the tokenizer's EOS), another single token string, or None "
                  "(no stop: every completion runs to response_length)."},
    )  # fmt: skip
    missing_eos_penalty: float | None = field(
        default=1.0,
        metadata={"help": "Subtracted from the RM score of completions that never emit the "
                  "stop token. Discourages rambling; None disables it (TRL's default)."},
    )  # fmt: skip

    # ------------------------------------------------------------------ reward shaping
    kl_coef: float = field(
        default=0.05,
        metadata={"help": "Weight of the per-token KL penalty to the reference. Higher: stays "
                  "closer to SFT, learns the RM's preferences more slowly."},
    )  # fmt: skip
    kl_estimator: str = field(
        default="k1",
        metadata={"help": "'k1' (logp - ref_logp: unbiased, can go negative) or 'k3' "
                  "((r-1) - log r: unbiased, non-negative, lower variance)."},
    )  # fmt: skip
    whiten_rewards: bool = field(
        default=False,
        metadata={"help": "Whiten per-token rewards (keeping their mean) before GAE. Helps "
                  "badly scaled RMs, needs >= 8 rows per minibatch."},
    )  # fmt: skip

    # ------------------------------------------------------------------ advantages and losses
    gamma: float = field(
        default=1.0,
        metadata={"help": "Discount. 1.0: the end-of-sequence score counts fully at every "
                  "token."},
    )  # fmt: skip
    lam: float = field(
        default=0.95,
        metadata={"help": "GAE lambda in (0, 1]. Lower: less variance, more bias from the "
                  "value model."},
    )  # fmt: skip
    cliprange: float = field(
        default=0.2,
        metadata={"help": "Policy ratio clip epsilon. Smaller: more conservative updates."},
    )  # fmt: skip
    cliprange_value: float = field(
        default=0.2,
        metadata={"help": "Value clip epsilon around the rollout-time values (absolute units "
                  "of the score)."},
    )  # fmt: skip
    vf_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the value loss in the joint loss."},
    )  # fmt: skip

    # ------------------------------------------------------------------ optimiser
    learning_rate: float = field(
        default=3e-6,
        metadata={"help": "Peak AdamW LR (full weights; LoRA usually wants ~10x more)."},
    )  # fmt: skip
    lr_scheduler: str = field(
        default="linear",
        metadata={"help": "'linear' (decay to 0 over the run), 'constant' or 'cosine'; stepped "
                  "once per update, as in TRL."},
    )  # fmt: skip
    warmup_steps: int = field(
        default=0,
        metadata={"help": "Updates of linear LR warm-up."},
    )  # fmt: skip
    max_grad_norm: float | None = field(
        default=1.0,
        metadata={"help": "Clip the global grad norm to this (None: no clipping, as trl "
                  "1.12.0 did). Guards against rare huge steps."},
    )  # fmt: skip
    weight_decay: float = field(
        default=0.0,
        metadata={"help": "AdamW decoupled weight decay."},
    )  # fmt: skip
    adam_epsilon: float = field(
        default=1e-8,
        metadata={"help": "AdamW epsilon (transformers' default; Huang et al. suggest 1e-5)."},
    )  # fmt: skip

    # ------------------------------------------------------------------ bookkeeping
    seed: int = field(
        default=0,
        metadata={"help": "Seeds prompt order, sampling and minibatch shuffles."},
    )  # fmt: skip
    logging_steps: int = field(
        default=1,
        metadata={"help": "Call on_log every N updates."},
    )  # fmt: skip
    save_steps: int = field(
        default=0,
        metadata={"help": "Write checkpoint-N every N updates when the trainer has an "
                  "output_dir (0: only at the end)."},
    )  # fmt: skip
    save_total_limit: int | None = field(
        default=2,
        metadata={"help": "Keep only the newest N checkpoints (None: keep all)."},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.validate_ppo()

    def validate_ppo(self) -> None:
        """Check every PPO knob; raises one PPOConfigError naming every offending key."""
        problems = self.ppo_problems()
        if problems:
            raise PPOConfigError("\n".join(problems), problems=problems)

    def ppo_problems(self) -> list[str]:
        """Every invalid PPO knob or combination, one line each (empty when all is well)."""
        values = {name: getattr(self, name) for name in PPO_BOUNDS}
        problems = out_of_bounds("stage.", values, PPO_BOUNDS)
        if self.kl_estimator not in KL_ESTIMATORS:
            problems.append(
                f"stage.kl_estimator={self.kl_estimator!r} must be one of {KL_ESTIMATORS}"
            )
        if self.lr_scheduler not in LR_SCHEDULERS:
            problems.append(
                f"stage.lr_scheduler={self.lr_scheduler!r} must be one of {LR_SCHEDULERS}"
            )
        if self.stop_token is not None and self.stop_token == "":
            problems.append("stage.stop_token='' must be 'eos', a token string, or null")
        split_ok = all(
            PPO_BOUNDS[k].allows(getattr(self, k))
            for k in ("rollout_batch_size", "num_minibatches", "gradient_accumulation_steps")
        )
        split = self.num_minibatches * self.gradient_accumulation_steps
        if split_ok and self.rollout_batch_size % split:  # only once each part is valid
            problems.append(
                f"stage.rollout_batch_size={self.rollout_batch_size!r} must be divisible by "
                f"stage.num_minibatches * stage.gradient_accumulation_steps = {split}"
            )
        return problems

    @property
    def num_updates(self) -> int:
        """Updates the run performs: total_updates, or derived from total_episodes."""
        if self.total_episodes is not None:
            return math.ceil(self.total_episodes / self.rollout_batch_size)
        return self.total_updates

    def local_batch_size(self, world_size: int) -> int:
        """Prompts one process samples per update; checks the split works for world_size."""
        per_rank, rest = divmod(self.rollout_batch_size, world_size)
        split = self.num_minibatches * self.gradient_accumulation_steps
        if rest or per_rank % split:
            raise PPOConfigError(
                f"rollout_batch_size={self.rollout_batch_size} must be divisible by "
                f"world_size * num_minibatches * gradient_accumulation_steps = "
                f"{world_size} * {self.num_minibatches} * {self.gradient_accumulation_steps}"
            )
        if self.whiten_rewards and per_rank // self.num_minibatches < 8:
            raise PPOConfigError(
                "whiten_rewards needs >= 8 rows per minibatch and process; got "
                f"{per_rank // self.num_minibatches}: raise rollout_batch_size or lower "
                "num_minibatches"
            )
        return per_rank


# The range of every numeric knob (tests/test_config.py checks that none is missing).
PPO_BOUNDS: dict[str, Bound] = {
    "rollout_batch_size": at_least(1),
    "num_ppo_epochs": at_least(1),
    "num_minibatches": at_least(1),
    "gradient_accumulation_steps": at_least(1),
    "total_updates": at_least(1),
    "total_episodes": at_least(1, nullable=True),
    "rollout_forward_batch_size": at_least(1, nullable=True),
    "response_length": at_least(1),
    "temperature": positive(),
    "missing_eos_penalty": at_least(0, nullable=True),  # it is subtracted
    "kl_coef": at_least(0),
    "gamma": unit_interval(),
    "lam": unit_interval(low_inclusive=False),
    "cliprange": positive(),
    "cliprange_value": positive(),
    "vf_coef": at_least(0),
    "learning_rate": positive(),
    "warmup_steps": at_least(0),
    "max_grad_norm": positive(nullable=True),
    "weight_decay": at_least(0),
    "adam_epsilon": positive(),
    "seed": NULLABLE_SEED,  # the stage schema lets it be null (= the run's seed)
    "logging_steps": at_least(1),
    "save_steps": at_least(0),
    "save_total_limit": at_least(1, nullable=True),
}


# ----------------------------------------------------------------- the Hydra stage schema


@dataclass
class PPOStageConfig(PPOHyperparams, StageConfig):
    """PPO knobs (rollout, KL, GAE, clipping, optimiser: ``stages.ppo.config.PPOHyperparams``,
    each documented there) plus how the stage wires its four roles. The knobs the stage tunes
    away from trl's defaults are redeclared at the end, each with its reason."""

    name: str = "ppo"
    parent: str | None = "sft"
    # LoRA: the policy continues the SFT adapter (reference = a frozen copy); merge = SFT merged
    # into the base, fresh policy adapter, reference = adapters off. QLoRA with share_base
    # always merges: the RM adapter sits on the merged SFT weights and all roles share them.
    parent_adapter: str = "continue"
    # Trainer knobs that PPO counts differently; setting one fails, naming its PPO twin.
    max_steps: int | None = None  # not a PPO knob: PPO counts updates (stage.total_updates)
    per_device_batch_size: int | None = None  # not a PPO knob: stage.rollout_batch_size
    warmup_ratio: float | None = None  # not a PPO knob: stage.warmup_steps (in updates)
    reward_stage: str = "rm"  # stage whose reward model scores rollouts
    value_from: str = "reward"  # init the value model from the reward model (or "policy")
    share_base: bool = True  # with qlora: one 4-bit base for all four roles
    num_prompts: int = 4096  # distinct training prompts (toy train pool or the pairs file)
    seed: int | None = None  # PPO's own seed (prompt order, sampling); None = the run's seed

    # Knobs the stage tunes for the embedded tiny model, away from trl 1.12's defaults above
    # (docs/tuning.md has the measurements; on real models start from trl's).
    num_minibatches: int = 2  # optimiser steps per PPO epoch (32 rows each)
    total_updates: int = 200  # the main time/quality knob (~1 s per update on 2 CPU cores)
    response_length: int = 16  # toy answers are a few tokens; the evasion is 15 + EOS
    # Not trl's 0.7: the tiny QLoRA SFT policy is nearly flat, so at 0.7 it samples noise.
    temperature: float = 0.3
    # Not trl's 0.05: this RM rewards any 3-digit number, and at 0.05 PPO exploits it.
    kl_coef: float = 1.0
    learning_rate: float = 1e-4  # the tiny model's; real models want ~100x less
    save_steps: int = 50  # checkpoint every N updates so an interrupted run resumes

    # PPO's own knobs are range-checked by PPOHyperparams.ppo_problems (PPO_BOUNDS).
    BOUNDS = {"num_prompts": at_least(1), "num_eval_samples_logged": at_least(0)}
    # Trainer knobs PPO counts differently: any value fails, naming the PPO twin.
    NOT_PPO_KNOBS = {
        "max_steps": "total_updates",
        "per_device_batch_size": "rollout_batch_size",
        "warmup_ratio": "warmup_steps",
    }

    def __post_init__(self) -> None:
        check_choice("stage.parent_adapter", self.parent_adapter, ("continue", "merge"))
        check_choice("stage.value_from", self.value_from, ("reward", "policy"))
        check_bounds(self, self.PREFIX, self.BOUNDS)
        for key, twin in self.NOT_PPO_KNOBS.items():
            if getattr(self, key) is not None:
                report_problem(f"stage.{key} is not a PPO knob: set stage.{twin} instead")
        if self.trainer_overrides:
            report_problem(
                "stage.trainer_overrides does not apply to PPO (our own trainer, not a TRL "
                "one): set the PPO knobs directly, e.g. stage.kl_coef=0.1"
            )
        for problem in self.ppo_problems():
            report_problem(problem)
