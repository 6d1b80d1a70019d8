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

KL_ESTIMATORS = ("k1", "k3")
LR_SCHEDULERS = ("linear", "constant", "cosine")


class PPOConfigError(ValueError):
    """A PPO hyper-parameter (or a combination of them) is invalid; the message names it."""


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
        """Check every PPO knob; raises PPOConfigError naming the offending key."""
        for name in ("rollout_batch_size", "num_ppo_epochs", "num_minibatches",
                     "gradient_accumulation_steps", "total_updates", "response_length",
                     "logging_steps"):  # fmt: skip
            _require(getattr(self, name) >= 1, name, "must be >= 1", getattr(self, name))
        for name in ("total_episodes", "rollout_forward_batch_size", "save_total_limit"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1 or null", value)
        _require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        _require(self.save_steps >= 0, "save_steps", "must be >= 0", self.save_steps)
        _require(self.temperature > 0, "temperature", "must be > 0", self.temperature)
        _require(
            self.kl_estimator in KL_ESTIMATORS, "kl_estimator", f"must be one of {KL_ESTIMATORS}",
            self.kl_estimator,
        )  # fmt: skip
        _require(
            self.lr_scheduler in LR_SCHEDULERS, "lr_scheduler", f"must be one of {LR_SCHEDULERS}",
            self.lr_scheduler,
        )  # fmt: skip
        _require(self.kl_coef >= 0, "kl_coef", "must be >= 0", self.kl_coef)
        _require(0 <= self.gamma <= 1, "gamma", "must be in [0, 1]", self.gamma)
        _require(0 < self.lam <= 1, "lam", "must be in (0, 1]", self.lam)
        _require(self.cliprange > 0, "cliprange", "must be > 0", self.cliprange)
        _require(self.cliprange_value > 0, "cliprange_value", "must be > 0", self.cliprange_value)
        _require(self.vf_coef >= 0, "vf_coef", "must be >= 0", self.vf_coef)
        _require(self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _require(self.adam_epsilon > 0, "adam_epsilon", "must be > 0", self.adam_epsilon)
        _require(
            self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm",
            "must be > 0 or null", self.max_grad_norm,
        )  # fmt: skip
        _require(
            self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
            "missing_eos_penalty", "must be >= 0 or null (it is subtracted)",
            self.missing_eos_penalty,
        )  # fmt: skip
        _require(
            self.stop_token is None or self.stop_token != "", "stop_token",
            "must be 'eos', a token string, or null", self.stop_token,
        )  # fmt: skip
        split = self.num_minibatches * self.gradient_accumulation_steps
        _require(
            self.rollout_batch_size % split == 0, "rollout_batch_size",
            f"must be divisible by num_minibatches * gradient_accumulation_steps = {split}",
            self.rollout_batch_size,
        )  # fmt: skip

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


def _require(ok: bool, key: str, rule: str, value: object) -> None:
    if not ok:
        raise PPOConfigError(f"stage.{key}={value!r}: {rule}")
