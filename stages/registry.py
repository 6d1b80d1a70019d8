"""The stage registry: one ``StageSpec`` per stage, the only list of stages there is.

Dispatch (``stages/runner.py``), the config schemas Hydra validates against, ``alignpipe
--help`` and the Makefile's stage targets (one per ``conf/stage/*.yaml``, checked against this
list by tests/test_registry.py) all come from here. Adding a stage is a package
``stages/<name>/`` (``config.py`` with its schema, ``recipe.py`` with ``run(cfg)``), one entry
below and one ``conf/stage/<name>.yaml``: docs/extending.md walks through it.

Importing this module imports only the stages' config schemas (dataclasses), never a recipe:
composing and validating a config must not import torch.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from stages.core.run_paths import register_resolvers
from stages.core.schema import (
    Config,
    DataConfig,
    ModelConfig,
    PathsConfig,
    PeftConfig,
    TrackingConfig,
)
from stages.core.stage_spec import KNOWN_PEFT_METHODS, StageSpec, register_stage, stage_spec
from stages.dpo.config import DPOStageConfig
from stages.eval.config import EvalStageConfig
from stages.export.config import ExportStageConfig
from stages.grpo.config import GRPOStageConfig
from stages.kto.config import KTOStageConfig
from stages.ppo.config import PPOStageConfig
from stages.rloo.config import RLOOStageConfig
from stages.rm.config import RMStageConfig
from stages.sft.config import SFTStageConfig

# peft methods by what a stage needs of an adapter. Policy stages trained by TRL take any
# peft method. The reward model needs trained layers under its value head (prefix / prompt
# tuning only prepend virtual tokens); PPO hosts its four roles as LoRA-shaped adapters on one
# base and starts its value model from the RM's.
ALL_PEFT_METHODS = KNOWN_PEFT_METHODS
LAYER_ADAPTER_METHODS = ("none", "lora", "dora")
# The online RL trainers (GRPO, RLOO) sample with the adapter on and copy it into a frozen
# "ref" adapter: tested with LoRA / DoRA (and 4-bit); prefix / prompt / IA3 are not offered.
ONLINE_RL_PEFT_METHODS = LAYER_ADAPTER_METHODS

STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        name="sft",
        schema=SFTStageConfig,
        recipe="stages.sft.recipe",
        parent="none",
        reads=("sft",),
        summary="supervised instruction tuning on demonstrations (TRL SFTTrainer)",
        peft_methods=ALL_PEFT_METHODS,
    ),
    StageSpec(
        name="rm",
        schema=RMStageConfig,
        recipe="stages.rm.recipe",
        parent="policy",
        reads=("pairs",),
        summary="reward model on preference pairs (TRL RewardTrainer)",
        peft_methods=LAYER_ADAPTER_METHODS,
    ),
    StageSpec(
        name="ppo",
        schema=PPOStageConfig,
        recipe="stages.ppo.recipe",
        parent="policy",
        reads=("prompts",),
        summary="PPO against the reward model, KL-penalised to SFT (our trainer)",
        peft_methods=LAYER_ADAPTER_METHODS,
        frontier=("PPO", "^", "tab:orange"),
    ),
    StageSpec(
        name="dpo",
        schema=DPOStageConfig,
        recipe="stages.dpo.recipe",
        parent="policy",
        reads=("pairs",),
        summary="direct preference optimisation from SFT (TRL DPOTrainer)",
        peft_methods=ALL_PEFT_METHODS,
        frontier=("DPO", "o", "tab:blue"),
    ),
    StageSpec(
        name="kto",
        schema=KTOStageConfig,
        recipe="stages.kto.recipe",
        parent="policy",
        reads=("pairs", "labelled"),
        summary="KTO from SFT on replies labelled desirable / undesirable (TRL KTOTrainer)",
        peft_methods=ALL_PEFT_METHODS,
        frontier=("KTO", "s", "tab:green"),
    ),
    StageSpec(
        name="grpo",
        schema=GRPOStageConfig,
        recipe="stages.grpo.recipe",
        parent="policy",
        reads=("prompts",),
        summary="GRPO from SFT: group-baseline RL on the task's judge or the RM (TRL GRPOTrainer)",
        peft_methods=ONLINE_RL_PEFT_METHODS,
        frontier=("GRPO", "D", "tab:red"),
    ),
    StageSpec(
        name="rloo",
        schema=RLOOStageConfig,
        recipe="stages.rloo.recipe",
        parent="policy",
        reads=("prompts",),
        summary="RLOO from SFT: leave-one-out RL on the task's judge or the RM (TRL RLOOTrainer)",
        peft_methods=ONLINE_RL_PEFT_METHODS,
        frontier=("RLOO", "v", "tab:purple"),
    ),
    StageSpec(
        name="eval",
        schema=EvalStageConfig,
        recipe="stages.eval.recipe",
        parent="none",  # it evaluates stage.target against that stage's own parent
        trains=False,
        summary="compare a finished stage with its parent",
        peft_methods=ALL_PEFT_METHODS,
    ),
    StageSpec(
        name="export",
        schema=ExportStageConfig,
        recipe="stages.export.recipe",
        parent="none",  # it reads stage.target; the adapter kind comes from its manifest
        trains=False,
        summary="write a finished stage as one merged, plain transformers model",
        peft_methods=ALL_PEFT_METHODS,
    ),
)

for _spec in STAGES:
    register_stage(_spec)


def spec_of(name: str) -> StageSpec:
    """The spec of a registered stage; KeyError names the known ones."""
    spec = stage_spec(name)
    if spec is None:
        raise KeyError(f"stage {name!r} is not one of {[s.name for s in STAGES]}")
    return spec


def register_configs() -> None:
    """Register every schema so YAML options can name them in their defaults lists."""
    register_resolvers()  # ${run_path:...} in conf/config.yaml's hydra.sweep.dir
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for spec in STAGES:
        cs.store(group="stage", name=f"{spec.name}_schema", node=spec.schema)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="peft", name="peft_schema", node=PeftConfig)
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="tracking", name="tracking_schema", node=TrackingConfig)
    cs.store(group="paths", name="paths_schema", node=PathsConfig)
