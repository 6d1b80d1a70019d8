"""Everything about peft adapters, in one place: building a peft config from ``peft.*``,
rebuilding a finished stage's config from its manifest, and loading, copying and saving
adapter weights through peft's own API (state dicts per adapter name, ``modules_to_save``).

A stage's manifest records its checkpoint ``kind`` (``PeftConfig.checkpoint_kind``: full,
lora, qlora, dora, ia3, prefix, prompt, or ``<method>-4bit``) and its ``config.peft``; older
manifests hold ``peft.kind`` (none | lora | qlora) instead of method + quantize, and still load.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
    load_peft_weights,
    set_peft_model_state_dict,
)
from peft import PeftConfig as AdapterConfig
from peft.utils import get_peft_model_state_dict
from peft.utils.constants import TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
from safetensors.torch import save_file

from stages.core.handoff import HandoffError, ParentStage
from stages.core.schema import ALL_LINEAR, ConfigError, PeftConfig, method_of_kind

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "seq_cls": "SEQ_CLS"}


def build_peft_config(
    peft_cfg: PeftConfig, task: str, model_type: str | None = None
) -> AdapterConfig:
    """The peft config of a fresh adapter for ``peft.method`` on a ``task`` model of
    ``model_type`` (``config.model_type``; ia3 needs it for its default feedforward layers)."""
    task_type = PEFT_TASK_TYPES[task]
    # SEQ_CLS adapters save the new score head through modules_to_save automatically.
    targets = peft_cfg.target_modules
    targets = ALL_LINEAR if targets == ALL_LINEAR else list(targets)
    method = peft_cfg.method
    if method in ("lora", "dora"):
        return LoraConfig(
            r=peft_cfg.r,
            lora_alpha=peft_cfg.alpha,
            lora_dropout=peft_cfg.dropout,
            target_modules=targets,
            use_dora=method == "dora",
            task_type=task_type,
        )
    if method == "ia3":
        return IA3Config(
            target_modules=targets,
            feedforward_modules=_ia3_feedforward_pattern(peft_cfg, model_type),
            task_type=task_type,
        )
    if method == "prefix":
        return PrefixTuningConfig(
            num_virtual_tokens=peft_cfg.num_virtual_tokens, task_type=task_type
        )
    if method == "prompt":
        return PromptTuningConfig(
            num_virtual_tokens=peft_cfg.num_virtual_tokens, task_type=task_type
        )
    raise ValueError(f"peft.method={method!r} has no adapter (full weights are trained)")


def _ia3_feedforward_pattern(peft_cfg: PeftConfig, model_type: str | None) -> str:
    """IA3's feedforward layers as a regex over full module names.

    A list would do for explicit targets, but peft saves ``all-linear`` resolved to full module
    paths while a list of feedforward names stays short, and its reload then fails the
    "feedforward_modules must be a subset of target_modules" check; a pattern is matched per
    module instead (peft: ``re.fullmatch``) and reloads with plain peft.
    """
    names = peft_cfg.ia3_feedforward_modules
    if names is None:
        names = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type or "")
        if names is None:
            raise ConfigError(
                f"peft.method=ia3: peft has no default feedforward layers for model type "
                f"{model_type!r}; name them, e.g. peft.ia3_feedforward_modules=[down_proj] "
                "(the MLP's output projection)"
            )
    return r"(.*\.)?(" + "|".join(re.escape(name) for name in names) + ")"


def stage_peft_config(stage: ParentStage, given: PeftConfig | None = None) -> PeftConfig:
    """The peft settings a finished stage was trained with, rebuilt from its manifest (the
    4-bit settings that reproduce its outputs), unless ``given`` is of the same kind."""
    if given is not None and given.checkpoint_kind() == stage.kind:
        return given
    method, quantize = method_of_kind(stage.kind)
    saved = dict(stage.manifest.get("config", {}).get("peft") or {})
    # Manifests before peft.method / peft.quantize: kind none | lora | qlora, and
    # target_modules null (then meaning the model's Llama list; the layers are in the adapter).
    saved.pop("kind", None)
    if saved.get("target_modules") is None:
        saved.pop("target_modules", None)
    known = {f.name for f in dataclasses.fields(PeftConfig)}
    saved = {k: v for k, v in saved.items() if k in known}
    return PeftConfig(**{**saved, "method": method, "quantize": quantize})


def causal_lm_copy(config: AdapterConfig) -> AdapterConfig:
    """A copy of an adapter config re-targeted at a causal LM: no heads saved or trained."""
    return dataclasses.replace(
        config, task_type="CAUSAL_LM", modules_to_save=None, inference_mode=False
    )


def head_keys(keys: Any, modules_to_save: Any) -> set[str]:
    """The state-dict keys of ``modules_to_save`` (a reward model's score head), matched the
    way peft matches them (PeftModel: ``module_name in name``)."""
    heads = list(modules_to_save or ())
    return {key for key in keys if any(f".{head}." in f".{key}" for head in heads)}


def continue_adapter(model: torch.nn.Module, adapter_dir: Path) -> PeftModel:
    """``model`` + the saved adapter in ``adapter_dir``, trainable (a child stage continuing
    its parent's adapter)."""
    config = AdapterConfig.from_pretrained(str(adapter_dir))
    if not config.is_prompt_learning:
        return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
    # peft's from_pretrained refuses is_trainable for prefix / prompt tuning; a fresh adapter
    # of the same config holding the saved weights is the same adapter, trainable.
    peft_model = get_peft_model(model, dataclasses.replace(config, inference_mode=False))
    _load_complete(peft_model, load_peft_weights(str(adapter_dir)), adapter_dir)
    return peft_model


def _load_complete(
    peft_model: PeftModel,
    weights: dict[str, torch.Tensor],
    source: Path,
    fresh: frozenset[str] = frozenset(),
) -> None:
    """Load ``weights`` into the default adapter; every adapter weight but ``fresh`` ones
    (a new score head) must come from them, and none may be left over."""
    expected = get_peft_model_state_dict(peft_model)
    keep = {k: expected[k] for k in fresh}
    # Both in peft's saved-key format (get_peft_model_state_dict), so they compare directly.
    unfilled = sorted(set(expected) - fresh - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if unfilled or unexpected:
        raise HandoffError(
            f"{source}: the adapter does not fit this model's layers (missing "
            f"{unfilled[:2]}, unexpected {unexpected[:2]})"
        )
    set_peft_model_state_dict(peft_model, {**keep, **weights})


def continue_as_seq_cls(model: torch.nn.Module, adapter_dir: Path) -> PeftModel:
    """A trainable SEQ_CLS adapter on ``model`` whose adapter weights start as the causal-LM
    adapter in ``adapter_dir`` (same method and targets); the score head starts fresh and is
    saved through modules_to_save like any SEQ_CLS adapter."""
    config = AdapterConfig.from_pretrained(str(adapter_dir))
    config = dataclasses.replace(
        config,
        task_type="SEQ_CLS",
        inference_mode=False,
        modules_to_save=None,  # peft adds the `score` head for SEQ_CLS
        # The parent's config names the base it was saved against (for QLoRA its 4-bit copy);
        # here it goes onto ``model``, and save_final records the real base again.
        base_model_name_or_path=None,
    )
    peft_model = get_peft_model(model, config)
    # peft's loader also expects the (fresh) score head, which the parent adapter lacks.
    heads = head_keys(get_peft_model_state_dict(peft_model), peft_model.modules_to_save)
    weights = load_peft_weights(str(adapter_dir))
    _load_complete(peft_model, weights, adapter_dir, fresh=frozenset(heads))
    return peft_model


def read_seq_cls_adapter(
    directory: Path,
) -> tuple[AdapterConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(causal-LM adapter config, adapter weights, score-head weights) of a SEQ_CLS adapter
    dir: the head is what its config saves through ``modules_to_save``."""
    config_file, weights_file = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise FileNotFoundError(
            f"{directory} is not a peft adapter directory (needs {ADAPTER_CONFIG} and "
            f"{ADAPTER_WEIGHTS})"
        )
    saved = AdapterConfig.from_pretrained(str(directory))
    if saved.is_prompt_learning:
        raise ValueError(
            f"{config_file}: a {saved.peft_type} adapter adds virtual tokens, not layers; the "
            "shared base needs a layer adapter (peft=lora or dora)"
        )
    weights = load_peft_weights(str(directory))
    in_head = head_keys(weights, saved.modules_to_save)
    head = {key.rsplit(".", 1)[-1]: weights[key] for key in in_head}
    adapter = {key: tensor for key, tensor in weights.items() if key not in in_head}
    if "weight" not in head or head["weight"].shape[0] != 1:
        raise ValueError(
            f"{weights_file}: no 1-output score head; train the RM adapter with "
            "task_type='SEQ_CLS' and num_labels=1 so peft saves `score` via modules_to_save"
        )
    return causal_lm_copy(saved), adapter, head


def add_adapter_with_weights(
    model: PeftModel, name: str, config: AdapterConfig, state: dict[str, torch.Tensor]
) -> None:
    """Add adapter ``name`` and load its weights; every weight of it must be filled."""
    model.add_adapter(name, causal_lm_copy(config))
    expected = set(get_peft_model_state_dict(model, adapter_name=name))
    unfilled, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if unfilled:
        raise ValueError(
            f"adapter '{name}': {len(unfilled)} adapter weights not found in its checkpoint "
            f"(e.g. {unfilled[0]}); was it trained on a different architecture?"
        )
    if unexpected:
        raise ValueError(
            f"adapter '{name}': checkpoint keys match no module of the base model "
            f"(e.g. {unexpected[0]}); was it trained on a different architecture?"
        )
    set_peft_model_state_dict(model, state, adapter_name=name)


def save_adapter(model: PeftModel, adapter_name: str, directory: str | Path) -> None:
    """Write adapter ``adapter_name`` of ``model`` as a standalone *default* adapter
    (adapter_config.json + adapter_model.safetensors at the top of ``directory``), loadable
    with ``PeftModel.from_pretrained(base, directory)`` like any SFT/DPO output."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in state.items()},
        str(directory / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    config = model.peft_config[adapter_name]
    dataclasses.replace(config, inference_mode=True).save_pretrained(str(directory))
