"""Eval stage knobs: which finished stage to compare, with what (its parent or the base), and how."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig, check_choice

# What the target is compared with: the stage it was trained from, the experiment's base model
# (model.name_or_path), or that base prompted with stage.num_shots SFT demonstrations.
AGAINST = ("parent", "base", "base_fewshot")


@dataclass
class EvalStageConfig(StageConfig):
    name: str = "eval"
    target: str = "dpo"  # stage to evaluate (any finished stage; with against=parent, not sft)
    # Compare with: parent (the stage it was trained from) | base (the experiment's base model,
    # same chat template and prompts) | base_fewshot (the base with num_shots demonstrations).
    against: str = "parent"
    # base_fewshot: SFT demonstrations put before each held-out prompt as earlier chat turns.
    num_shots: int = 3
    # Policy samples used to estimate KL(policy || parent): more = tighter, slower.
    num_kl_samples: int = 64
    temperature: float = 1.0  # sampling temperature for the KL estimate

    BOUNDS = {
        **StageConfig.BOUNDS,
        "num_shots": at_least(1),
        "num_kl_samples": at_least(1),
        "temperature": positive(),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.against", self.against, AGAINST)

    def run_variant(self, variant: str) -> str:
        """The run dir's variant: a baseline eval gets its own (runs/<exp>/eval/vs_base/), so
        it never replaces the parent eval in runs/<exp>/eval/; an explicit one is kept."""
        if variant or self.against == "parent":
            return variant
        return f"vs_{self.against}"
