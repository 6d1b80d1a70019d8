"""KTO stage knobs: TRL KTOTrainer's loss on top of the shared stage knobs.

KTO learns from single replies labelled desirable or not (preference pairs are unpaired into
one of each), against the frozen SFT policy as reference.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import at_least, positive
from stages.core.schema import StageConfig, check_choice, report_problem
from stages.core.validation import VALIDATION_BOUNDS, ValidationKnobs

# TRL's KTOConfig.loss_type choices.
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


@dataclass
class KTOStageConfig(ValidationKnobs, StageConfig):
    name: str = "kto"
    parent: str | None = "sft"  # reference = the frozen SFT policy
    # LoRA: keep training the SFT adapter; TRL keeps a frozen copy as the reference.
    parent_adapter: str = "continue"
    learning_rate: float = 2e-4  # far below SFT's: higher moves faster but can collapse replies
    max_steps: int = 300  # steps of per_device_batch_size replies; the time/quality knob
    # Replies per micro-batch. KTO's KL estimate pairs each prompt with another row's reply
    # inside the micro-batch, so it must be > 1; bigger = a steadier KL baseline.
    per_device_batch_size: int = 32
    logging_steps: int = 20  # log every N steps
    # KL strength: lower lets the policy drift further from SFT (more reward, more risk).
    beta: float = 0.1
    # Loss weights of desirable / undesirable replies: raise the rarer side's so that
    # weight * count is about equal (TRL warns when the ratio is outside [1, 4/3]).
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0  # the other side of desirable_weight's balance
    # kto: the KTO paper's loss with a batch KL baseline; apo_zero_unpaired: no KL term
    # (cheaper: one forward pass less), for when desirable replies beat the model's own.
    loss_type: str = "kto"
    precompute_ref_log_probs: bool = False  # one ref pass up front: saves memory, costs a pass

    BOUNDS = {
        **StageConfig.BOUNDS,
        **VALIDATION_BOUNDS,
        "beta": positive(),
        "desirable_weight": at_least(0),
        "undesirable_weight": at_least(0),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.loss_type", self.loss_type, KTO_LOSS_TYPES)
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            report_problem(
                "stage.desirable_weight and stage.undesirable_weight are both 0: nothing to "
                "learn from; set at least one > 0 (default 1.0)"
            )
        if self.loss_type == "kto" and self.per_device_batch_size < 2:
            report_problem(
                f"stage.per_device_batch_size={self.per_device_batch_size}: loss_type=kto "
                "estimates its KL baseline from the other replies of a micro-batch, so it needs "
                "at least 2 (e.g. stage.per_device_batch_size=8), or stage.loss_type="
                "apo_zero_unpaired"
            )
