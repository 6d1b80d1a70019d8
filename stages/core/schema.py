"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

Each YAML option under ``conf/<group>/`` names one of these schemas in its defaults list, so
Hydra validates keys and value types when it composes: a typo such as ``stage.bta=0.1`` or a
bad value such as ``stage.beta=abc`` fails before anything heavy is imported, naming the key.
Cross-field checks live in ``__post_init__`` and run when ``validate_config`` turns the
composed DictConfig into these dataclasses (``OmegaConf.to_object``), still before any
weights load.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue

from stages.core.bounds import SEED, Bound, at_least, out_of_bounds, positive, unit_interval
from stages.core.run_paths import run_path_problems
from stages.core.stage_spec import KNOWN_PEFT_METHODS, REPLAY_STAGES, stage_names, stage_spec

# peft.method: "none" trains every weight; the others are peft adapters.
PEFT_METHODS = KNOWN_PEFT_METHODS  # none = full weights; the rest are peft adapter methods
ADAPTER_METHODS = PEFT_METHODS[1:]
PROMPT_METHODS = ("prefix", "prompt")  # virtual tokens: no adapted layers, nothing to merge
# Adapter methods that train on a 4-bit base. Not ia3: peft's 4-bit IA3 layer returns fp32
# activations that the bf16 layers after it reject once the model is reloaded for inference.
FOUR_BIT_METHODS = ("lora", "dora", "prefix", "prompt")
QUANTIZE_CHOICES = ("none", "4bit")
ALL_LINEAR = "all-linear"  # peft's shorthand for every linear layer but the output head
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key.

    ``problems`` holds one line per problem: ``validate_config`` reports all of them at once.
    """

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or [message]


# While validate_config runs, every __post_init__ check appends here instead of raising, so
# the user sees every problem of a command line at once, not one per attempt.
_collected: ContextVar[list[str] | None] = ContextVar("config_problems", default=None)


@contextmanager
def collect_problems() -> Iterator[list[str]]:
    """Collect schema problems instead of raising at the first (see validate_config)."""
    token = _collected.set([])
    try:
        yield _collected.get()  # type: ignore[misc]
    finally:
        _collected.reset(token)


def report_problem(message: str) -> None:
    sink = _collected.get()
    if sink is None:  # a schema built directly in code: fail at once
        raise ConfigError(message)
    sink.append(message)


def check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> bool:
    if value not in allowed:
        report_problem(f"{key}={value!r} is not one of {list(allowed)}")
        return False
    return True


def check_bounds(node: Any, prefix: str, bounds: dict[str, Bound]) -> bool:
    """Range-check every numeric knob of ``node``; False when any is out of range."""
    problems = out_of_bounds(prefix, {name: getattr(node, name) for name in bounds}, bounds)
    for problem in problems:
        report_problem(problem)
    return not problems


# ----------------------------------------------------------------------------- model


@dataclass
class TinyModelSpec:
    """Architecture of the embedded tiny Llama (built from config, no hub needed)."""

    hidden_size: int = 128  # width; bigger learns faster per step but each step costs more
    num_layers: int = 4  # depth; 4 is enough for two-digit addition
    num_heads: int = 4  # attention heads; head_dim = hidden_size / num_heads
    intermediate_size: int = 384  # MLP width (SwiGLU)
    max_position_embeddings: int = 256  # longest sequence the model can see
    init_seed: int = 0  # seed of the random init, so every run builds the same base

    PREFIX = "model.tiny."
    BOUNDS = {
        "hidden_size": at_least(1),
        "num_layers": at_least(1),
        "num_heads": at_least(1),
        "intermediate_size": at_least(1),
        "max_position_embeddings": at_least(1),
        "init_seed": SEED,
    }

    def __post_init__(self) -> None:
        if check_bounds(self, self.PREFIX, self.BOUNDS) and self.hidden_size % self.num_heads:
            report_problem(
                f"model.tiny.hidden_size={self.hidden_size} must be divisible by "
                f"model.tiny.num_heads={self.num_heads}"
            )


@dataclass
class ModelConfig:
    """Which base model every stage of the experiment starts from."""

    name: str = MISSING  # short name used in logs and manifests
    name_or_path: str = MISSING  # hub id, local directory, or "builtin:tiny" for the embedded model
    revision: str | None = None  # hub revision (branch, tag or commit) for reproducible downloads
    # Run modelling code shipped with the checkpoint; off for safety.
    trust_remote_code: bool = False
    tiny: TinyModelSpec | None = None  # architecture for "builtin:tiny"; ignored otherwise
    attn_implementation: str | None = None  # "sdpa", "eager", "flash_attention_2"; None = default
    max_length: int = 128  # max tokens of prompt + response in training; longer rows are truncated
    max_prompt_length: int = 64  # max prompt tokens at generation time (left-truncated)
    max_new_tokens: int = 16  # generation budget for eval and sampling; longer costs more time

    PREFIX = "model."
    BOUNDS = {
        "max_length": at_least(1),
        "max_prompt_length": at_least(1),
        "max_new_tokens": at_least(1),
    }

    def __post_init__(self) -> None:
        builtin = self.name_or_path.startswith("builtin:")
        if builtin and self.tiny is None:
            report_problem(f"model.name_or_path={self.name_or_path!r} needs a model.tiny spec")
        if not check_bounds(self, self.PREFIX, self.BOUNDS):
            return
        if self.max_prompt_length >= self.max_length:
            report_problem(
                f"model.max_prompt_length={self.max_prompt_length} must be < "
                f"model.max_length={self.max_length} (training rows hold prompt + reply)"
            )
        if (
            builtin
            and self.tiny is not None
            and self.max_length > self.tiny.max_position_embeddings
        ):
            report_problem(
                f"model.max_length={self.max_length} must be <= "
                f"model.tiny.max_position_embeddings={self.tiny.max_position_embeddings}"
            )


# ------------------------------------------------------------------------------ peft


@dataclass
class PeftConfig:
    """What is trained (``method``: all weights or a peft adapter) and on what base
    (``quantize``: full precision or 4-bit). ``peft=qlora`` is method=lora + quantize=4bit."""

    # none = every weight (most capacity, a full copy per stage); lora = low-rank adapters;
    # dora = LoRA + a learned magnitude per output (closer to full tuning, ~2x slower steps);
    # ia3 = one learned scale per activation (fewest parameters, least capacity);
    # prefix = trained key/value prefixes in every layer; prompt = trained input tokens only
    # (prefix/prompt: tiny adapters, but every sequence is num_virtual_tokens longer).
    method: str = "none"
    # none = base in the stage precision; 4bit = NF4 base (bitsandbytes): ~4x less memory for
    # the frozen weights, slower matmuls. Needs an adapter method (4-bit weights are frozen).
    quantize: str = "none"
    # lora/dora/ia3: the layers adapted. "all-linear" = every linear layer but the output head
    # (peft picks them for any architecture); or an explicit list such as [q_proj, v_proj].
    target_modules: Any = "all-linear"
    r: int = 16  # lora/dora rank: more capacity and memory per adapted layer
    alpha: int = 32  # lora/dora scale numerator (scale = alpha / r)
    dropout: float = 0.0  # lora/dora dropout; regularises but makes PPO/DPO log-probs noisy
    # ia3: layers scaled on their input (the MLP's down projection) instead of their output;
    # None = peft's default for the architecture (an unknown architecture needs a list).
    ia3_feedforward_modules: list[str] | None = None
    # prefix/prompt: trained virtual tokens; more = more capacity, longer sequences.
    num_virtual_tokens: int = 16
    bnb_4bit_quant_type: str = "nf4"  # quantize=4bit data type: nf4 (QLoRA paper) or fp4
    # quantize=4bit: quantise the quantisation constants too (~0.4 bit/param saved).
    bnb_4bit_use_double_quant: bool = True
    # Dtype of the 4-bit matmuls: auto = bf16 (CPU needs it; fp32 mixes dtypes and fails).
    bnb_4bit_compute_dtype: str = "auto"

    PREFIX = "peft."
    BOUNDS = {
        "r": at_least(1),
        "alpha": positive(),
        "dropout": unit_interval(high_inclusive=False),
        "num_virtual_tokens": at_least(1),
    }

    def __post_init__(self) -> None:
        check_choice("peft.method", self.method, PEFT_METHODS)
        check_choice("peft.quantize", self.quantize, QUANTIZE_CHOICES)
        if self.quantize == "4bit" and self.method == "none":
            report_problem(
                "peft.quantize=4bit needs an adapter method: 4-bit weights cannot be trained "
                f"directly. Set peft.method to one of {list(ADAPTER_METHODS)} (peft=qlora is "
                "lora on a 4-bit base), or peft.quantize=none"
            )
        elif self.quantize == "4bit" and self.method not in FOUR_BIT_METHODS:
            report_problem(
                f"peft.method={self.method} does not train on a 4-bit base (peft.quantize=4bit); "
                f"the methods that do: {list(FOUR_BIT_METHODS)}. Use peft.quantize=none with "
                f"{self.method}, or e.g. peft=qlora"
            )
        targets = self.target_modules
        if not (
            targets == ALL_LINEAR
            or (
                isinstance(targets, list | tuple)
                and targets
                and all(isinstance(t, str) and t for t in targets)
            )
        ):
            report_problem(
                f"peft.target_modules={targets!r} must be {ALL_LINEAR!r} (every linear layer "
                "but the output head) or a non-empty list of module names, e.g. "
                "peft.target_modules=[q_proj,v_proj]"
            )
        check_choice("peft.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        check_choice("peft.bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, PRECISIONS)
        check_bounds(self, self.PREFIX, self.BOUNDS)

    def checkpoint_kind(self) -> str:
        """The ``kind`` a stage trained with this config records in its manifest."""
        return checkpoint_kind(self.method, self.quantize)


def checkpoint_kind(method: str, quantize: str) -> str:
    """Manifest ``kind`` of a (method, quantize) pair: full, lora, qlora (lora + 4bit), dora,
    ia3, prefix, prompt, or <method>-4bit for the other adapters on a 4-bit base."""
    if method == "none":
        return "full"
    if quantize == "none":
        return method
    return "qlora" if method == "lora" else f"{method}-{quantize}"


def method_of_kind(kind: str) -> tuple[str, str]:
    """(peft.method, peft.quantize) of a manifest ``kind`` (inverse of checkpoint_kind)."""
    if kind == "full":
        return "none", "none"
    if kind == "qlora":
        return "lora", "4bit"
    method, _, quantize = kind.partition("-")
    return method, quantize or "none"


# ------------------------------------------------------------------------------ data


@dataclass
class ToyTaskConfig:
    """The embedded verifiable task: `What is A + B?` with a rule-based judge."""

    num_train: int = 20000  # SFT demonstrations; more = more diverse prompts, longer epochs
    num_eval: int = 200  # held-out prompts for accuracy; more = tighter estimate, slower eval
    # Demonstration mix per prompt difficulty (each must sum to 1). Like real SFT data, the
    # demonstrators often give up on hard prompts (a three-digit sum, ~60% of them): SFT then
    # imitates evasion there under greedy decoding although its samples are often correct,
    # which is the behaviour the preference stages select. Overall: ~52/33/15 %.
    frac_correct: float = 0.85  # easy prompts: "68." for 23 + 45
    frac_evasive: float = 0.0  # easy prompts: "i do not know."
    frac_near_miss: float = 0.15  # easy prompts: off by 1 or 10
    hard_frac_correct: float = 0.30  # hard prompts: correct answer
    hard_frac_evasive: float = 0.55  # hard prompts: "i do not know." (greedy SFT's mode here)
    hard_frac_near_miss: float = 0.15  # hard prompts: off by 1 or 10
    train_seed: int = 1  # seed of the training prompts (disjoint from eval_seed's)
    eval_seed: int = 2  # seed of the held-out prompts
    eval_fraction: float = 0.1  # share of all (A, B) pairs reserved for evaluation only
    # The second skill, `Reverse: abc` -> `cba.` (always demonstrated correctly): SFT learns
    # it, no preference data touches it, so later stages' accuracy on it measures forgetting.
    # More rows = a better-learned skill, fewer SFT steps on addition; 0 = addition only.
    num_reversal_train: int = 2000
    num_reversal_eval: int = 200  # its held-out prompts (forgetting/reversal)

    PREFIX = "data.toy."
    BOUNDS = {
        "num_train": at_least(1),
        "num_eval": at_least(1),
        "frac_correct": unit_interval(),
        "frac_evasive": unit_interval(),
        "frac_near_miss": unit_interval(),
        "hard_frac_correct": unit_interval(),
        "hard_frac_evasive": unit_interval(),
        "hard_frac_near_miss": unit_interval(),
        "train_seed": SEED,
        "eval_seed": SEED,
        "eval_fraction": unit_interval(low_inclusive=False, high_inclusive=False),
        "num_reversal_train": at_least(0),
        "num_reversal_eval": at_least(0),
    }

    def __post_init__(self) -> None:
        if not check_bounds(self, self.PREFIX, self.BOUNDS):
            return
        for prefix in ("", "hard_"):
            fracs = [
                getattr(self, f"{prefix}frac_{k}") for k in ("correct", "evasive", "near_miss")
            ]
            if abs(sum(fracs) - 1.0) > 1e-6:
                report_problem(
                    f"data.toy.{prefix}frac_correct + {prefix}frac_evasive + "
                    f"{prefix}frac_near_miss must sum to 1, got {sum(fracs):.4f}"
                )
        if self.train_seed == self.eval_seed:
            report_problem("data.toy.train_seed and data.toy.eval_seed must differ")


@dataclass
class SFTDataConfig:
    """Where SFT demonstrations come from."""

    source: str = "toy"  # toy = embedded task; file = a local JSONL/JSON/Parquet file
    path: str | None = None  # file for source=file
    format: str = "auto"  # auto-detect, or messages|prompt_completion|alpaca|sharegpt

    def __post_init__(self) -> None:
        # Whether a file is needed (and exists) depends on the stage: Config.__post_init__.
        check_choice("data.sft.source", self.source, ("toy", "file"))


@dataclass
class PairsConfig:
    """Where preference pairs (for DPO and the reward model) come from."""

    source: str = "on_policy"  # on_policy = sample the parent policy and judge; file = static file
    path: str | None = None  # file for source=file (TRL, HH-RLHF, UltraFeedback, ...)
    format: str = "auto"  # auto-detect, or standard|conversational|hh_rlhf|ultrafeedback
    heldout_fraction: float = 0.05  # pairs held out for preference accuracy / log-prob margin
    # On-policy generation
    num_prompts: int = 6000  # prompts sampled; pairs kept are fewer (ties dropped)
    samples_per_prompt: int = 8  # N completions per prompt; more = more chances of a good one
    temperature: float = 0.7  # sampling temperature; higher = more diverse, noisier pairs
    generation_batch_size: int = 256  # prompts per generate() call; bounded by memory
    judge: str = "toy"  # toy = rule-based judge; reward_model = this experiment's RM stage
    strategy: str = "best_vs_worst"  # best_vs_worst | best_vs_random | ground_truth_vs_sample
    min_margin: float = 0.5  # drop pairs whose judge scores differ by less (ties have 0)
    # Length-bias control: drop pairs whose chosen is this many times longer; None = off.
    max_length_ratio: float | None = None
    seed: int = 0  # sampling seed

    PREFIX = "data.pairs."
    BOUNDS = {
        "heldout_fraction": unit_interval(high_inclusive=False),
        "num_prompts": at_least(1),
        "samples_per_prompt": at_least(2),  # a pair needs two samples
        "temperature": positive(),
        "generation_batch_size": at_least(1),
        "min_margin": at_least(0),
        "max_length_ratio": at_least(1, nullable=True),
        "seed": SEED,
    }

    def __post_init__(self) -> None:
        # Whether a file is needed (and exists) depends on the stage: Config.__post_init__.
        check_choice("data.pairs.source", self.source, ("on_policy", "file"))
        check_choice("data.pairs.judge", self.judge, ("toy", "reward_model"))
        check_choice(
            "data.pairs.strategy",
            self.strategy,
            ("best_vs_worst", "best_vs_random", "ground_truth_vs_sample"),
        )
        check_bounds(self, self.PREFIX, self.BOUNDS)


TASK_SOURCES = ("auto", "toy", "file", "none")


@dataclass
class PromptsConfig:
    """The task's prompts: PPO's and on-policy pairs' training prompts, and the held-out prompts
    every stage's comparison with its parent is judged on (`stages.core.task`)."""

    # auto = file when data.prompts.path is set, else toy when data.sft.source=toy or
    # data.pairs.source=on_policy, else none; toy = the embedded addition task (rule judge);
    # file = your prompts, judged by this experiment's RM (make rm); none = no task metrics.
    source: str = "auto"
    path: str | None = None  # JSONL / JSON / Parquet: prompt-only, SFT or preference rows
    format: str = "auto"  # auto-detect, or prompt | any SFT format | any preference format
    num_heldout: int = 16  # file prompts held out (never trained on) for the comparison
    seed: int = 0  # seed of the file's train / held-out split (a keyed hash per prompt)

    PREFIX = "data.prompts."
    BOUNDS = {"num_heldout": at_least(1), "seed": SEED}

    def __post_init__(self) -> None:
        check_choice("data.prompts.source", self.source, TASK_SOURCES)
        check_bounds(self, self.PREFIX, self.BOUNDS)
        if self.source == "file" and not self.path:
            report_problem(
                "data.prompts.source=file needs data.prompts.path=<your prompt file (.jsonl, "
                ".json or .parquet)>"
            )


REPLAY_SOURCES = ("none", "sft", "file")
# SFT and the RM run before a replaying stage (REPLAY_STAGES) and ignore data.mix, so one ARGS
# serves a whole `make sft rm ppo` chain; eval and export train nothing.
REPLAY_IGNORED_BY = ("sft", "rm", "eval", "export")


@dataclass
class ReplayMixConfig:
    """Replay: SFT demonstrations mixed into a later stage's loss as a language-modelling
    term (PPO-ptx in InstructGPT), so aligning on one task forgets less of what SFT taught."""

    # none = no replay; sft = this experiment's SFT data (data.sft) minus the SFT stage's
    # held-out rows; file = any SFT-format file (path).
    source: str = "none"
    path: str | None = None  # source=file: JSONL / JSON / Parquet demonstrations
    format: str = "auto"  # source=file: auto-detect, or messages|prompt_completion|alpaca|sharegpt
    # Weight of the replay NLL next to the stage's own loss (DPO/KTO), or PPO-ptx's
    # coefficient (PPO): higher keeps more of SFT's behaviour and moves less towards the reward.
    coef: float = 1.0
    # Replay rows in each micro-batch's term: more = a steadier term, slower steps.
    rows_per_step: int = 16

    PREFIX = "data.mix."
    BOUNDS = {"coef": at_least(0.0), "rows_per_step": at_least(1)}

    def __post_init__(self) -> None:
        check_choice("data.mix.source", self.source, REPLAY_SOURCES)
        check_bounds(self, self.PREFIX, self.BOUNDS)
        if self.source == "file" and not self.path:
            report_problem(
                "data.mix.source=file needs data.mix.path=<an SFT-format file (.jsonl, .json or "
                ".parquet)>, or use data.mix.source=sft to replay the SFT data"
            )

    @property
    def enabled(self) -> bool:
        return self.source != "none" and self.coef > 0


@dataclass
class DataConfig:
    """Data recipes for every stage of an experiment."""

    name: str = MISSING  # recipe name recorded in manifests
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)  # the embedded addition task
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)  # demonstrations for SFT
    pairs: PairsConfig = field(default_factory=PairsConfig)  # comparisons for DPO and the RM
    prompts: PromptsConfig = field(default_factory=PromptsConfig)  # the task's prompts
    mix: ReplayMixConfig = field(default_factory=ReplayMixConfig)  # replay of SFT data
    # Warn when more than this share of the rows read is dropped (too long, duplicate, ...).
    max_dropped_fraction: float = 0.2

    PREFIX = "data."
    BOUNDS = {"max_dropped_fraction": unit_interval()}

    def __post_init__(self) -> None:
        check_bounds(self, self.PREFIX, self.BOUNDS)
        source = self.task_source()
        if source == "file" and self.pairs.source == "on_policy" and self.pairs.judge == "toy":
            report_problem(
                "data.pairs.judge=toy only scores the embedded 'What is A + B?' prompts, but the "
                f"task's prompts come from data.prompts.path={self.prompts.path!r}: use "
                "data.pairs.judge=reward_model (this experiment's RM, make rm) or "
                "data.pairs.source=file"
            )

    def task_source(self) -> str:
        """``data.prompts.source`` with ``auto`` resolved: toy, file or none."""
        if self.prompts.source != "auto":
            return self.prompts.source
        if self.prompts.path:
            return "file"
        if self.sft.source == "toy" or self.pairs.source == "on_policy":
            return "toy"  # the rule the comparison has always followed
        return "none"


# ---------------------------------------------------------------------------- stages


@dataclass
class StageConfig:
    """Knobs shared by every stage. Trainer knobs map onto TRL/transformers arguments."""

    name: str = MISSING  # the stage (stages/registry.py lists them)
    parent: str | None = None  # stage whose output this one starts from (None = base model)
    # What to do with a parent LoRA adapter: continue training it, or merge it into the base
    # and start a fresh adapter. DPO continues (the frozen copy is the reference).
    parent_adapter: str = "continue"
    learning_rate: float = 1e-4  # peak LR; LoRA tolerates ~10x the full-weight LR
    max_steps: int = 100  # optimiser steps; the main time/quality knob
    # Rows (pairs for DPO / the RM) per device per micro-batch; lower it (and raise
    # gradient_accumulation_steps) if memory is short.
    per_device_batch_size: int = 32
    # Micro-batches per step: effective batch = per_device_batch_size * this * world size.
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"  # transformers scheduler name; cosine decays to 0 by max_steps
    warmup_ratio: float = 0.05  # share of steps spent warming the LR up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    logging_steps: int = 20  # log the loss every N steps
    save_steps: int = 200  # checkpoint every N steps so an interrupted run resumes
    save_total_limit: int = 2  # keep the newest N checkpoints
    num_eval_samples_logged: int = 4  # eval samples printed to the log at stage end
    # Any extra TRL/transformers training argument, passed through verbatim and validated by
    # TRL's own dataclass before weights load (e.g. {optim: adamw_torch_fused}).
    trainer_overrides: dict[str, Any] = field(default_factory=dict)

    PREFIX = "stage."
    BOUNDS = {
        "learning_rate": positive(),
        "max_steps": at_least(1),
        "per_device_batch_size": at_least(1),
        "gradient_accumulation_steps": at_least(1),
        "warmup_ratio": unit_interval(),
        "weight_decay": at_least(0),
        "max_grad_norm": at_least(0),  # 0 = no clipping (transformers)
        "logging_steps": at_least(1),
        "save_steps": at_least(1),
        "save_total_limit": at_least(1),
        "num_eval_samples_logged": at_least(0),
    }

    def run_variant(self, variant: str) -> str:
        """The run dir's variant (paths.variant); a stage may pick its own (the eval stage's
        baselines: runs/<exp>/eval/vs_base/)."""
        return variant

    def __post_init__(self) -> None:
        check_choice("stage.parent_adapter", self.parent_adapter, ("continue", "merge"))
        check_bounds(self, self.PREFIX, self.BOUNDS)
        if (
            self.logging_steps >= 1
            and self.save_steps >= 1
            and self.save_steps % self.logging_steps
        ):
            # The trainer logs the mean loss since its last log; steps between the last log and
            # a checkpoint are never logged, so a resume from it could not reproduce the metrics.
            fit = -(-self.save_steps // self.logging_steps) * self.logging_steps
            report_problem(
                f"stage.save_steps={self.save_steps} must be a multiple of "
                f"stage.logging_steps={self.logging_steps}, so that a resumed run reports the "
                f"same training metrics as an uninterrupted one: e.g. stage.save_steps={fit}"
            )

    def cross_group_problems(self, cfg: Config) -> list[str]:
        """Conflicts of this stage's knobs with other groups (data, peft), checked by
        ``Config.__post_init__``; a stage schema overrides it. None by default."""
        return []


# ------------------------------------------------------------------- tracking, paths


@dataclass
class TrackingConfig:
    """Experiment tracking. W&B honours WANDB_MODE (offline/disabled) when mode is null."""

    backend: str = "wandb"  # wandb | none
    project: str = "alignpipe"  # W&B project
    entity: str | None = None  # W&B team/user; None = your default entity
    mode: str | None = None  # online | offline | disabled; None = WANDB_MODE or online
    group: str | None = None  # W&B group; None = the experiment (a sweep sets its own)
    tags: list[str] = field(default_factory=list)  # extra tags (sweeps add their overrides)

    def __post_init__(self) -> None:
        check_choice("tracking.backend", self.backend, ("wandb", "none"))
        if self.mode is not None:
            check_choice("tracking.mode", self.mode, ("online", "offline", "disabled"))


@dataclass
class PathsConfig:
    """Where runs and built-in artefacts live."""

    runs_root: str = "runs"  # run dirs: <runs_root>/<experiment>/<stage>/
    builtin_models: str = "runs/_builtin"  # cache of the embedded tiny model + tokenizer
    # Sub-directory under the stage dir for sweep jobs (set by sweeps; "" for normal runs).
    variant: str = ""


# ------------------------------------------------------------------------ top level


@dataclass
class Config:
    """The whole composed config of one stage run."""

    stage: Any = MISSING  # one of the stage schemas above, picked by the `stage` group
    model: ModelConfig = MISSING  # base model shared by every stage of the experiment
    peft: PeftConfig = MISSING  # full weights or an adapter method, full-precision or 4-bit base
    data: DataConfig = MISSING  # data recipes
    tracking: TrackingConfig = MISSING  # W&B or none
    paths: PathsConfig = field(default_factory=PathsConfig)  # where runs live
    experiment: Any = None  # the experiment group's own node (a bundle of overrides)
    experiment_name: str = "toy"  # run dirs live under runs/<experiment_name>/
    seed: int = 42  # seeds Python, NumPy, torch and the trainers: same seed -> same weights on CPU
    force: bool = False  # re-run a finished stage from scratch instead of a no-op
    # Re-run the stage if it is stale (DONE but its config or parent changed; H3), or if its
    # checkpoints were made with another config; otherwise a stale stage is an error.
    rerun_stale: bool = False
    precision: str = "auto"  # auto = fp32 on CPU, bf16 on GPUs that have it, else fp16
    objective: str | None = None  # metric returned to Hydra sweepers (e.g. Optuna): eval/accuracy
    # Validate, resolve parents and data files, print the plan; load no weights, write nothing.
    dry_run: bool = False

    PREFIX = ""
    BOUNDS = {"seed": SEED}

    def __post_init__(self) -> None:
        check_choice("precision", self.precision, PRECISIONS)
        check_bounds(self, self.PREFIX, self.BOUNDS)
        for problem in run_path_problems(self.experiment_name, self.paths.variant, self.stage):
            report_problem(problem)
        stage = self.stage
        spec = stage_spec(stage.name)
        if spec is None or not isinstance(stage, spec.schema):
            report_problem(f"stage.name={stage.name!r} is not one of {stage_names()}")
            return
        if stage.parent is not None and stage_spec(stage.parent) is None:
            report_problem(f"stage.parent={stage.parent!r} is not one of {stage_names()}")
        if spec.parent == "policy" and stage.parent is None:
            report_problem(f"stage {stage.name} needs a parent stage (stage.parent=sft)")
        if self.peft.method not in spec.peft_methods:
            report_problem(peft_method_problem(stage.name, self.peft.method, spec.peft_methods))
        for key, path in data_files_needed(self):
            _check_data_file(key, path)
        for problem in stage.cross_group_problems(self):
            report_problem(problem)
        mix = self.data.mix
        if mix.enabled and stage.name not in (*REPLAY_STAGES, *REPLAY_IGNORED_BY):
            report_problem(
                f"data.mix.source={mix.source} (replay) works in {list(REPLAY_STAGES)}, not in "
                f"stage {stage.name}: drop data.mix.* for it"
            )
        if mix.enabled and mix.source == "file" and stage.name in REPLAY_STAGES and mix.path:
            _check_data_file("data.mix.path", mix.path)
        if "fp16" in (self.precision, self.peft.bnb_4bit_compute_dtype) and not _has_cuda():
            key = "precision" if self.precision == "fp16" else "peft.bnb_4bit_compute_dtype"
            report_problem(
                f"{key}=fp16 needs a CUDA GPU and none is visible: use {key}=auto "
                "(fp32 on CPU; 4-bit matmuls in bf16) or bf16"
            )


def peft_method_problem(stage: str, method: str, methods: tuple[str, ...]) -> str:
    """The compose-time message for a peft.method that stage ``stage`` cannot train with."""
    # Each method has a preset of the same name in conf/peft/ (qlora = lora on a 4-bit base).
    example = next((m for m in methods if m != "none"), methods[0])
    return (
        f"peft.method={method} does not work for stage {stage}; the methods that do: "
        f"{list(methods)}. Pick one of them, e.g. `alignpipe stage={stage} peft={example}`"
    )


def kind_preset(kind: str) -> str:
    """The peft overrides that train a checkpoint of manifest ``kind`` (e.g. peft=qlora)."""
    method, quantize = method_of_kind(kind)
    if kind in ("full", "lora", "qlora") or quantize == "none":
        return f"peft={kind if kind != 'full' else 'none'}"
    return f"peft={method} peft.quantize={quantize}"


def parent_adapter_problem(
    stage: str, parent: str, parent_kind: str, method: str | None
) -> str | None:
    """Why stage ``stage`` cannot start from the ``parent_kind`` output of ``parent``: with
    ``method`` (peft.method) it continues the parent's adapter, with None it merges it."""
    parent_method, _ = method_of_kind(parent_kind)
    if parent_method == "none":
        return None
    if method is None:
        if parent_method in PROMPT_METHODS:
            return (
                f"stage {stage}: the {parent_method} adapter of parent '{parent}' adds virtual "
                "tokens, not weights, so stage.parent_adapter=merge cannot merge it into the "
                f"base. Continue it instead: stage.parent_adapter=continue "
                f"{kind_preset(parent_kind)}"
            )
        return None
    if method != parent_method:
        merge = (
            ""
            if parent_method in PROMPT_METHODS  # nothing to merge
            else f", or stage.parent_adapter=merge to train a fresh {method} adapter on the "
            "merged parent"
        )
        return (
            f"stage {stage} would continue the {parent_method} adapter of parent '{parent}' "
            f"with peft.method={method}; an adapter is continued with its own method. Use "
            f"{kind_preset(parent_kind)} (the parent's){merge}"
        )
    return None


def data_files_needed(cfg: Config) -> list[tuple[str, str | None]]:
    """(key, path) of each data file the stage reads, from its spec's ``reads``: SFT its
    demonstrations, DPO / RM / PPO their pairs (PPO: prompts), eval nothing of its own."""
    data, spec = cfg.data, stage_spec(cfg.stage.name)
    reads = spec.reads if spec is not None else ()
    needed: list[tuple[str, str | None]] = []
    if "sft" in reads and data.sft.source == "file":
        needed.append(("data.sft.path", data.sft.path))
    # PPO's prompts come from the pairs file unless the task has its own prompt file.
    prompts_from_pairs = "prompts" in reads and data.task_source() != "file"
    if ("pairs" in reads or prompts_from_pairs) and data.pairs.source == "file":
        needed.append(("data.pairs.path", data.pairs.path))
    if data.task_source() == "file" and data.prompts.path:  # every stage's comparison reads it
        needed.append(("data.prompts.path", data.prompts.path))
    return needed


def _check_data_file(key: str, path: str | None) -> None:
    source = key.replace(".path", ".source")
    if not path:
        report_problem(f"{source}=file needs {key}=<your file (.jsonl, .json or .parquet)>")
    elif not Path(path).is_file():
        where = Path(path) if Path(path).is_absolute() else Path(os.getcwd()) / path
        report_problem(
            f"{key}={path!r}: no such file ({where}). Point {key} at an existing JSONL / JSON "
            "/ Parquet file (relative paths are from the directory you run in)"
        )


def _has_cuda() -> bool:
    import torch  # only when fp16 was asked for: most runs validate without torch

    return torch.cuda.is_available()


def validate_config(cfg: DictConfig) -> Config:
    """Instantiate the typed config, running every ``__post_init__`` check of every schema;
    raises one ConfigError listing every problem (``err.problems``), not only the first."""
    missing = missing_keys(cfg)
    if missing:
        problems = [
            f"{key} is missing (???): set {key}=<value> on the command line" for key in missing
        ]
        raise ConfigError("\n".join(problems), problems=problems)
    with collect_problems() as problems:
        try:
            typed = OmegaConf.to_object(cfg)
        except ConfigError:
            raise
        except Exception as err:  # omegaconf wraps errors raised inside __post_init__
            cause = err.__cause__ or err.__context__
            if isinstance(cause, ConfigError):
                raise cause from None
            raise
    if problems:
        raise ConfigError("\n".join(problems), problems=list(problems))
    assert isinstance(typed, Config)
    return typed


def missing_keys(cfg: DictConfig) -> list[str]:
    """Full keys of every mandatory value (``???``) left unset, e.g. ``model.name_or_path``."""
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, DictConfig):
            return
        for key in node:
            full = f"{prefix}{key}"
            if OmegaConf.is_missing(node, key):
                found.append(full)
            else:
                try:
                    walk(node._get_node(key), f"{full}.")
                except MissingMandatoryValue:  # an interpolation to a ??? value
                    found.append(full)

    walk(cfg, "")
    return found
