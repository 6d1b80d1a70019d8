"""DPO stage knobs: TRL DPOTrainer's loss on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass

from stages.core.bounds import Bound, at_least, positive
from stages.core.schema import StageConfig


@dataclass
class DPOStageConfig(StageConfig):
    name: str = "dpo"
    parent: str | None = "sft"  # reference = the frozen SFT policy
    learning_rate: float = 2e-4  # far below SFT's: DPO moves a trained policy
    max_steps: int = 300  # steps of per_device_batch_size pairs (~5 epochs of the toy pairs)
    beta: float = 0.1  # KL strength: lower lets the policy drift further from the reference
    # sigmoid (DPO), ipo, hinge, robust, ... (any TRL loss_type); ipo wants a smaller beta.
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    precompute_ref_log_probs: bool = False  # one ref pass up front: saves memory, costs a pass
    # + weight * NLL of the chosen replies (RPO, Pang et al. 2024); 0 = plain DPO, which lowers
    # chosen and rejected likelihoods together and broke easy toy prompts (docs/tuning.md).
    sft_weight: float = 1.0

    BOUNDS = {
        **StageConfig.BOUNDS,
        "beta": positive(),
        "label_smoothing": Bound(low=0, high=0.5, high_inclusive=False),  # 0.5 = coin flips
        "sft_weight": at_least(0),
    }
