"""Export stage knobs: which finished stage to write as one merged, plain model, and how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig, check_choice, report_problem
from stages.core.stage_spec import stage_names

if TYPE_CHECKING:
    from stages.core.schema import Config

EXPORT_DTYPES = ("auto", "fp32", "bf16", "fp16")
# Stages that write no model of their own, so there is nothing to export.
NOT_EXPORTABLE = ("eval", "export")


@dataclass
class ExportStageConfig(StageConfig):
    name: str = "export"
    target: str = "dpo"  # stage whose final/ is merged and written as a plain model
    # Weights dtype of the export: fp32 keeps the merge exact; bf16 / fp16 halve the size at
    # a max logit error of ~0.2 / ~0.02; auto = the base's dtype on a GPU, fp32 on CPU.
    dtype: str = "auto"
    # Largest |logit difference| export vs the target's adapter model allowed on held-out
    # prompts; null = the measured default for the dtype (tighter catches more, flakes more).
    logit_tolerance: float | None = None
    # Held-out prompts the logit check runs on (the first N); more = a surer check, slower.
    check_prompts: int = 64

    BOUNDS = {
        **StageConfig.BOUNDS,
        "logit_tolerance": positive(nullable=True),
        "check_prompts": at_least(1),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.dtype", self.dtype, EXPORT_DTYPES)
        known = [name for name in stage_names() if name not in NOT_EXPORTABLE]
        if self.target in NOT_EXPORTABLE or (known and self.target not in known):
            report_problem(
                f"stage.target={self.target!r} is not a stage that trains a model; export one "
                f'of {known}, e.g. `make export ARGS="stage.target=dpo"`'
            )

    def cross_group_problems(self, cfg: Config) -> list[str]:
        """The export must load without remote code: refuse a custom architecture."""
        if cfg.model.trust_remote_code:
            return [
                "model.trust_remote_code=true: the export is meant to load with plain "
                "transformers (no remote code), which a custom architecture cannot. Export "
                "only models whose architecture transformers ships (model.trust_remote_code=false)"
            ]
        return []
