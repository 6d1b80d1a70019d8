"""What the core knows about a stage without importing it: its ``StageSpec``.

Each stage package (``stages/<name>/``) owns its config schema and its recipe; the registry
(``stages/registry.py``) lists one spec per stage and registers it here. Core code (config
validation, the plan, handoff hints) asks ``stage_spec(name)`` what a stage needs, so it never
imports a particular stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# What a stage reads: its parent's output ("policy": a trained policy it starts from), and which
# data: SFT demonstrations, preference pairs, replies labelled good / bad (in the pairs file's
# place: data.pairs.path), prompts.
PARENT_KINDS = ("none", "policy")
DATA_KINDS = ("sft", "pairs", "labelled", "prompts")
# Every peft.method (none = full weights): the one list, which the peft schema
# (stages.core.schema.PEFT_METHODS) and the registry use. This module imports nothing.
KNOWN_PEFT_METHODS = ("none", "lora", "dora", "ia3", "prefix", "prompt")
# Stages whose loss takes data.mix's replay term (DPO/KTO: an NLL term; PPO: PPO-ptx).
REPLAY_STAGES = ("dpo", "kto", "ppo")


@dataclass(frozen=True)
class StageSpec:
    """One stage: its name, config schema, recipe module, parent kind and the data it reads."""

    name: str  # `stage=<name>`, conf/stage/<name>.yaml, runs/<exp>/<name>/, `make <name>`
    schema: type[Any]  # the stage's config dataclass (a StageConfig subclass)
    recipe: str  # module with `run(cfg) -> metrics`, imported only when the stage runs
    parent: str  # "none": starts from the base model; "policy": from a trained policy stage
    reads: tuple[str, ...] = ()  # data kinds it reads (DATA_KINDS); their files are checked early
    trains: bool = True  # False for stages that only evaluate (no weights of their own)
    summary: str = ""  # one line for `alignpipe --help`
    # (legend name, marker, colour) of its runs on the reward-KL frontier of `make compare` /
    # `make frontier`; None = not plotted there (the reference and the RM are not policies).
    frontier: tuple[str, str, str] | None = None
    # peft.method values this stage can train with; any other fails at compose time, naming
    # these. Default: every method (a stage that only evaluates loads whatever it is given).
    peft_methods: tuple[str, ...] = KNOWN_PEFT_METHODS

    def __post_init__(self) -> None:
        if self.parent not in PARENT_KINDS:
            raise ValueError(f"StageSpec {self.name}: parent={self.parent!r} not in {PARENT_KINDS}")
        unknown = set(self.reads) - set(DATA_KINDS)
        if unknown:
            raise ValueError(f"StageSpec {self.name}: reads {sorted(unknown)} not in {DATA_KINDS}")
        unknown = set(self.peft_methods) - set(KNOWN_PEFT_METHODS)
        if unknown or not self.peft_methods:
            raise ValueError(
                f"StageSpec {self.name}: peft_methods {list(self.peft_methods)} must be a "
                f"non-empty subset of {KNOWN_PEFT_METHODS}"
            )


_SPECS: dict[str, StageSpec] = {}


def register_stage(spec: StageSpec) -> None:
    """Make ``spec`` known to config validation and the plan (the registry calls this)."""
    _SPECS[spec.name] = spec


def stage_spec(name: str) -> StageSpec | None:
    """The registered spec of stage ``name``, or None for an unknown name."""
    return _SPECS.get(name)


def stage_names() -> list[str]:
    """Every registered stage, in registry order."""
    return list(_SPECS)
