"""Typed schemas for every Hydra config group, registered in Hydra's ConfigStore.

Each YAML option under ``conf/<group>/`` names one of these schemas in its defaults list, so
Hydra validates keys and value types when it composes: a typo such as ``stage.bta=0.1`` or a
bad value such as ``stage.beta=abc`` fails before anything heavy is imported, naming the key.
Cross-field checks live in ``__post_init__`` and run when ``validate_config`` turns the
composed DictConfig into these dataclasses (``OmegaConf.to_object``), still before any
weights load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from stages.ppo.config import PPOConfigError, PPOHyperparams

STAGES = ("sft", "rm", "ppo", "dpo", "eval")
PEFT_KINDS = ("none", "lora", "qlora")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value or combination that cannot work; the message names the key."""


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not one of {list(allowed)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


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

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
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
    # LoRA targets for this architecture; the peft group may override them.
    lora_target_modules: list[str] = field(
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )

    def __post_init__(self) -> None:
        if self.name_or_path.startswith("builtin:") and self.tiny is None:
            raise ConfigError(f"model.name_or_path={self.name_or_path!r} needs a model.tiny spec")
        _positive("model.max_length", self.max_length)
        _positive("model.max_new_tokens", self.max_new_tokens)


# ------------------------------------------------------------------------------ peft


@dataclass
class PeftConfig:
    """How weights are trained: all of them, a LoRA adapter, or LoRA on a 4-bit base."""

    kind: str = "none"  # none = full weights; lora = adapters; qlora = NF4 4-bit base + adapters
    r: int = 16  # LoRA rank: more capacity and memory per adapted layer
    alpha: int = 32  # LoRA scale numerator (scale = alpha / r)
    dropout: float = 0.0  # LoRA dropout; regularises but makes PPO/DPO log-probs noisy
    target_modules: list[str] | None = None  # None = model.lora_target_modules
    bnb_4bit_quant_type: str = "nf4"  # 4-bit data type: nf4 (QLoRA paper) or fp4
    # Quantise the quantisation constants too (~0.4 bit/param saved).
    bnb_4bit_use_double_quant: bool = True
    # Dtype of the 4-bit matmuls: auto = bf16 (CPU needs it; fp32 mixes dtypes and fails).
    bnb_4bit_compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        _choice("peft.kind", self.kind, PEFT_KINDS)
        _choice("peft.bnb_4bit_quant_type", self.bnb_4bit_quant_type, ("nf4", "fp4"))
        _choice("peft.bnb_4bit_compute_dtype", self.bnb_4bit_compute_dtype, PRECISIONS)
        _positive("peft.r", self.r)


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

    def __post_init__(self) -> None:
        for prefix in ("", "hard_"):
            fracs = [
                getattr(self, f"{prefix}frac_{k}") for k in ("correct", "evasive", "near_miss")
            ]
            if min(fracs) < 0 or abs(sum(fracs) - 1.0) > 1e-6:
                raise ConfigError(
                    f"data.toy.{prefix}frac_correct + {prefix}frac_evasive + "
                    f"{prefix}frac_near_miss must be >= 0 and sum to 1, got {sum(fracs):.4f}"
                )
        if self.train_seed == self.eval_seed:
            raise ConfigError("data.toy.train_seed and data.toy.eval_seed must differ")


@dataclass
class SFTDataConfig:
    """Where SFT demonstrations come from."""

    source: str = "toy"  # toy = embedded task; file = a local JSONL/JSON/Parquet file
    path: str | None = None  # file for source=file
    format: str = "auto"  # auto-detect, or messages|prompt_completion|alpaca|sharegpt

    def __post_init__(self) -> None:
        _choice("data.sft.source", self.source, ("toy", "file"))
        if self.source == "file" and not self.path:
            raise ConfigError("data.sft.source=file needs data.sft.path=/path/to/file.jsonl")


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

    def __post_init__(self) -> None:
        _choice("data.pairs.source", self.source, ("on_policy", "file"))
        _choice("data.pairs.judge", self.judge, ("toy", "reward_model"))
        _choice(
            "data.pairs.strategy",
            self.strategy,
            ("best_vs_worst", "best_vs_random", "ground_truth_vs_sample"),
        )
        if self.source == "file" and not self.path:
            raise ConfigError("data.pairs.source=file needs data.pairs.path=/path/to/pairs.jsonl")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError("data.pairs.heldout_fraction must be in [0, 1)")
        if self.samples_per_prompt < 2:
            raise ConfigError("data.pairs.samples_per_prompt must be >= 2 to form a pair")


@dataclass
class DataConfig:
    """Data recipes for every stage of an experiment."""

    name: str = MISSING  # recipe name recorded in manifests
    toy: ToyTaskConfig = field(default_factory=ToyTaskConfig)  # the embedded addition task
    sft: SFTDataConfig = field(default_factory=SFTDataConfig)  # demonstrations for SFT
    pairs: PairsConfig = field(default_factory=PairsConfig)  # comparisons for DPO and the RM


# ---------------------------------------------------------------------------- stages


@dataclass
class StageConfig:
    """Knobs shared by every stage. Trainer knobs map onto TRL/transformers arguments."""

    name: str = MISSING  # sft | rm | ppo | dpo | eval
    parent: str | None = None  # stage whose output this one starts from (None = base model)
    # What to do with a parent LoRA adapter: continue training it, or merge it into the base
    # and start a fresh adapter. DPO continues (the frozen copy is the reference).
    parent_adapter: str = "continue"
    learning_rate: float = 1e-4  # peak LR; LoRA tolerates ~10x the full-weight LR
    max_steps: int = 100  # optimiser steps; the main time/quality knob
    per_device_batch_size: int = 32  # rows per device per micro-batch; bounded by memory
    gradient_accumulation_steps: int = 1  # micro-batches per step: bigger effective batch
    lr_scheduler: str = "cosine"  # transformers scheduler name
    warmup_ratio: float = 0.05  # share of steps spent warming the LR up
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    max_grad_norm: float = 1.0  # gradient clipping norm
    logging_steps: int = 10  # log every N steps
    save_steps: int = 200  # checkpoint every N steps (resume point)
    save_total_limit: int = 2  # keep the newest N checkpoints
    num_eval_samples_logged: int = 4  # eval samples printed to the log at stage end
    # Any extra TRL/transformers training argument, passed through verbatim and validated by
    # TRL's own dataclass before weights load (e.g. {optim: adamw_torch_fused}).
    trainer_overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _choice("stage.name", self.name, STAGES)
        _choice("stage.parent_adapter", self.parent_adapter, ("continue", "merge"))
        _positive("stage.learning_rate", self.learning_rate)
        _positive("stage.max_steps", self.max_steps)
        _positive("stage.per_device_batch_size", self.per_device_batch_size)


@dataclass
class SFTStageConfig(StageConfig):
    name: str = "sft"
    learning_rate: float = 3e-3
    max_steps: int = 800
    per_device_batch_size: int = 64
    assistant_only_loss: bool = True  # loss on assistant tokens only (needs {% generation %})
    packing: bool = False  # pack short rows into max_length blocks: faster, cross-row attention


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    parent: str | None = "sft"
    learning_rate: float = 2e-4
    max_steps: int = 600
    beta: float = 0.1  # KL strength: lower lets the policy drift further from the reference
    # sigmoid (DPO), ipo, hinge, robust, ... (any TRL loss_type); ipo wants a smaller beta.
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    precompute_ref_log_probs: bool = False  # one ref pass up front: saves memory, costs a pass
    sft_weight: float = 0.0  # + weight * NLL of the chosen replies (RPO); 0 = plain DPO

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("stage.beta", self.beta)
        _positive("stage.sft_weight", self.sft_weight, allow_zero=True)


@dataclass
class RMStageConfig(StageConfig):
    name: str = "rm"
    parent: str | None = "sft"
    # continue: a SEQ_CLS adapter initialised from the SFT adapter, on the same base (PPO then
    # shares one 4-bit base); merge: SFT merged into the base, fresh SEQ_CLS adapter.
    parent_adapter: str = "continue"
    learning_rate: float = 1e-3
    max_steps: int = 300
    center_rewards_coefficient: float | None = None  # pull mean reward to 0 (0.01 in the paper)
    use_margin: bool = False  # use a `margin` column in the loss when the data has one
    head_learning_rate: float | None = None  # LR of the new score head; None = learning_rate

    def __post_init__(self) -> None:  # the head LR, when set, must be positive too
        super().__post_init__()
        if self.head_learning_rate is not None:
            _positive("stage.head_learning_rate", self.head_learning_rate)


@dataclass
class PPOStageConfig(PPOHyperparams, StageConfig):
    """PPO knobs (rollout, KL, GAE, clipping, optimiser: ``stages.ppo.config.PPOHyperparams``,
    each documented there) plus how the stage wires its four roles."""

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

    def __post_init__(self) -> None:
        _choice("stage.name", self.name, STAGES)
        _choice("stage.parent_adapter", self.parent_adapter, ("continue", "merge"))
        _choice("stage.value_from", self.value_from, ("reward", "policy"))
        _positive("stage.num_prompts", self.num_prompts)
        for key, twin in (
            ("max_steps", "total_updates"),
            ("per_device_batch_size", "rollout_batch_size"),
            ("warmup_ratio", "warmup_steps"),
        ):
            if getattr(self, key) is not None:
                raise ConfigError(f"stage.{key} is not a PPO knob: set stage.{twin} instead")
        if self.trainer_overrides:
            raise ConfigError(
                "stage.trainer_overrides does not apply to PPO (our own trainer, not a TRL "
                "one): set the PPO knobs directly, e.g. stage.kl_coef=0.1"
            )
        try:
            self.validate_ppo()
        except PPOConfigError as err:
            raise ConfigError(str(err)) from None


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    target: str = "dpo"  # stage to evaluate; it is compared with its own parent
    num_kl_samples: int = 64  # policy samples used to estimate KL(policy || parent)
    temperature: float = 1.0  # sampling temperature for the KL estimate


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
        _choice("tracking.backend", self.backend, ("wandb", "none"))
        if self.mode is not None:
            _choice("tracking.mode", self.mode, ("online", "offline", "disabled"))


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
    peft: PeftConfig = MISSING  # full weights, LoRA or QLoRA
    data: DataConfig = MISSING  # data recipes
    tracking: TrackingConfig = MISSING  # W&B or none
    paths: PathsConfig = field(default_factory=PathsConfig)  # where runs live
    experiment: Any = None  # the experiment group's own node (a bundle of overrides)
    experiment_name: str = "toy"  # run dirs live under runs/<experiment_name>/
    seed: int = 42  # seeds Python, NumPy, torch and the trainers: same seed -> same weights on CPU
    force: bool = False  # re-run a finished stage from scratch instead of a no-op
    precision: str = "auto"  # auto = fp32 on CPU, bf16 on GPUs that have it, else fp16
    objective: str | None = None  # metric returned to Hydra sweepers (e.g. Optuna): eval/accuracy

    def __post_init__(self) -> None:
        _choice("precision", self.precision, PRECISIONS)
        if not self.experiment_name or "/" in self.experiment_name:
            raise ConfigError(f"experiment_name={self.experiment_name!r} must be a plain name")
        stage = self.stage
        if stage.parent is not None and stage.parent not in STAGES:
            raise ConfigError(f"stage.parent={stage.parent!r} is not one of {list(STAGES)}")
        if isinstance(stage, (DPOStageConfig, RMStageConfig, PPOStageConfig)) and (
            stage.parent is None
        ):
            raise ConfigError(f"stage {stage.name} needs a parent stage (stage.parent=sft)")


_STAGE_SCHEMAS = {
    "sft": SFTStageConfig,
    "dpo": DPOStageConfig,
    "rm": RMStageConfig,
    "ppo": PPOStageConfig,
    "eval": EvalStageConfig,
}


def register_configs() -> None:
    """Register every schema so YAML options can name them in their defaults lists."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in _STAGE_SCHEMAS.items():
        cs.store(group="stage", name=f"{name}_schema", node=schema)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="peft", name="peft_schema", node=PeftConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)


def validate_config(cfg: DictConfig) -> Config:
    """Instantiate the typed config, running every ``__post_init__`` cross-field check."""
    try:
        typed = OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except Exception as err:  # omegaconf wraps errors raised inside __post_init__
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    assert isinstance(typed, Config)
    return typed
