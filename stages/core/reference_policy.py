"""The frozen SFT reference of the preference stages trained by TRL (DPO, KTO).

DPOTrainer and KTOTrainer build their reference the same way, and it must be the SFT
policy, never the bare base:

- a policy with an adapter continuing the SFT adapter: ``ref_model=None``, and TRL copies the
  adapter into a frozen "ref" adapter on the same base before the first step;
- full weights: the frozen SFT model loaded from the parent's final/ is passed as
  ``ref_model`` (with None, TRL would reload ``model.config._name_or_path``: the bare base).

This module owns choosing that argument, checking what TRL built, describing it for the
manifest, and saving ``final/`` without the frozen copy.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from stages.core.handoff import ParentStage
from stages.core.models import LoadedModel, save_final

REFERENCE_ADAPTER = "ref"  # the name TRL gives its frozen copy of the policy's adapter


def reference_model_arg(loaded: LoadedModel, sft_policy: torch.nn.Module) -> Any:
    """``ref_model`` for the TRL trainer: None with an adapter (TRL freezes a copy of it),
    else the frozen SFT model."""
    return None if isinstance(loaded.model, PeftModel) else sft_policy


def describe_reference(loaded: LoadedModel, parent: ParentStage) -> dict[str, Any]:
    """What the reference is, for the manifest (checked against the built model)."""
    if isinstance(loaded.model, PeftModel):
        if loaded.provenance.get("parent_adapter") == "continued":
            kind = "sft_adapter_frozen_copy"  # TRL's frozen "ref" copy of the SFT adapter
        else:
            kind = "sft_weights_fresh_adapter_frozen_copy"  # zero-init adapter on SFT weights
    else:
        kind = "sft_full_weights"
    ref = parent.as_manifest_ref()
    return {**ref, "kind": kind, "checkpoint_kind": ref["kind"]}


def check_reference(model: torch.nn.Module, trainer_name: str) -> None:
    """After the trainer is built: with an adapter, TRL's frozen "ref" copy must exist (else
    the reference would be the bare base), with the trained adapter's dtype."""
    if not isinstance(model, PeftModel):
        return
    if REFERENCE_ADAPTER not in model.peft_config:
        raise RuntimeError(
            f"{trainer_name} did not create a frozen {REFERENCE_ADAPTER!r} adapter: the "
            "reference would be the bare base, not the SFT policy"
        )
    _match_reference_dtype(model)


def _match_reference_dtype(model: PeftModel) -> None:
    """Give TRL's frozen "ref" adapter the dtype of the trained one.

    With a 4-bit base TRL casts the trainable adapter to bf16 (QLoRA paper) *after* copying it
    into "ref", which stays fp32: same values (the SFT adapter was saved in bf16) but a
    different compute path, so step-0 rewards would be ~1e-5 instead of exactly 0.
    """
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{REFERENCE_ADAPTER}." in name:
            policy_param = params.get(name.replace(f".{REFERENCE_ADAPTER}.", ".default."))
            if policy_param is not None and policy_param.dtype != param.dtype:
                param.data = param.data.to(policy_param.dtype)


def save_without_reference(
    loaded: LoadedModel, tokenizer: PreTrainedTokenizerBase, trainer: Any
) -> Callable[[Path], None]:
    """The ``save`` of ``StageRun.save_final``: the trained policy alone. The frozen reference
    is the parent's adapter, already saved by the parent; final/ is a plain PEFT adapter."""

    def save(final_dir: Path) -> None:
        model = trainer.model
        if isinstance(model, PeftModel) and REFERENCE_ADAPTER in model.peft_config:
            model.delete_adapter(REFERENCE_ADAPTER)
        save_final(loaded, tokenizer, final_dir, model=model)

    return save
