"""DPO stage knobs: TRL DPOTrainer's loss on top of the shared stage knobs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from stages.core.bounds import Bound, at_least, positive
from stages.core.schema import StageConfig, check_choice, report_problem
from stages.core.validation import VALIDATION_BOUNDS, ValidationKnobs

if TYPE_CHECKING:
    from stages.core.schema import Config

ROUND_REFERENCES = ("sft", "previous")
ROUND_PAIRS = ("accumulate", "fresh")


@dataclass
class DPOStageConfig(ValidationKnobs, StageConfig):
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
    # Iterative (online) DPO: rounds of sample from the current policy -> judge -> max_steps
    # of DPO; round r > 1 samples fresh pairs from round r-1's policy. 1 = plain DPO.
    rounds: int = 1
    # Reference of rounds > 1: sft keeps the KL anchor at SFT (drift is bounded, later rounds
    # move less); previous re-anchors at round r-1 (each round moves further, KL to SFT grows).
    round_reference: str = "sft"
    # Pairs of round r > 1: accumulate = its fresh pairs plus every earlier round's (the fresh
    # ones are few and all on prompts the policy still gets wrong: alone they pull it off the
    # rest); fresh = only its own pairs (pure on-policy, smaller, can forget).
    round_pairs: str = "accumulate"
    # Rounds > 1 train min(max_steps, this many epochs of their pairs): fewer pairs, fewer
    # steps, so a round on a few hundred pairs does not overfit them.
    round_max_epochs: float = 3.0

    # token_accuracy: the policy's top-1 agreement with the held-out chosen replies; it falls
    # when plain DPO over-optimises (pushes chosen and rejected likelihoods down together).
    VALIDATION_METRICS = ("loss", "reward_accuracy", "token_accuracy")
    BOUNDS = {
        **StageConfig.BOUNDS,
        **VALIDATION_BOUNDS,
        "beta": positive(),
        "label_smoothing": Bound(low=0, high=0.5, high_inclusive=False),  # 0.5 = coin flips
        "sft_weight": at_least(0),
        "rounds": at_least(1),
        "round_max_epochs": positive(),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("stage.round_reference", self.round_reference, ROUND_REFERENCES)
        check_choice("stage.round_pairs", self.round_pairs, ROUND_PAIRS)
        if self.rounds > 1 and self.parent_adapter == "merge":
            report_problem(
                f"stage.rounds={self.rounds} continues each round's adapter, which "
                "stage.parent_adapter=merge does not keep on the merged SFT base: use "
                "stage.parent_adapter=continue (the default) or stage.rounds=1"
            )
        if self.rounds > 1 and self.validation_fraction > 0:
            # Each round trains on new pairs: one split and one best step do not fit rounds.
            report_problem(
                f"stage.rounds={self.rounds} with stage.validation_fraction="
                f"{self.validation_fraction}: iterative DPO has no per-round validation; use "
                "stage.validation_fraction=0 (the default) or stage.rounds=1"
            )

    def cross_group_problems(self, cfg: Config) -> list[str]:
        """Rounds > 1 sample new pairs from the current policy: a pairs file has none."""
        if self.rounds <= 1:
            return []
        problems = []
        if cfg.data.pairs.source == "file":
            problems.append(
                f"stage.rounds={self.rounds} samples fresh on-policy pairs from each round's "
                "policy, but data.pairs.source=file has nothing new to sample: use "
                "data.pairs.source=on_policy (the default), or stage.rounds=1 for DPO on the file"
            )
        if (
            self.round_reference == "sft"
            and self.precompute_ref_log_probs
            and cfg.peft.method != "none"
        ):
            # TRL precomputes the reference log-probs inside DPOTrainer's __init__, from its
            # copy of the adapter being trained (round r-1's), before the SFT adapter can be
            # put back into its frozen "ref" adapter.
            problems.append(
                f"stage.rounds={self.rounds} with stage.round_reference=sft, "
                f"peft.method={cfg.peft.method} and stage.precompute_ref_log_probs=true: TRL "
                "would precompute the reference from the previous round's adapter, not SFT's. "
                "Use stage.precompute_ref_log_probs=false, stage.round_reference=previous, or "
                "peft=none"
            )
        return problems
