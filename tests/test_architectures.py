"""SFT -> DPO with peft=lora and peft=qlora on three architectures (Llama, Qwen2 and GPT-2
shapes: locally saved, random-initialised, tiny), with the default target modules (peft's
all-linear): the adapter covers the architecture's linear layers and trains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from stages.core.tiny_model import build_tokenizer
from stages.dpo import recipe as dpo
from stages.sft import recipe as sft
from tests.conftest import saved_tensors
from tests.test_dpo import PAIRS_FAST

# The linear layers each architecture has (the output head aside), named as peft saves them.
LINEAR_LAYERS = {
    "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "qwen2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_attn", "c_proj", "c_fc"},  # transformers' Conv1D, not nn.Linear
}


def _build(arch: str, vocab_size: int, pad: int, eos: int):
    common = dict(vocab_size=vocab_size, pad_token_id=pad, eos_token_id=eos, bos_token_id=None)
    if arch == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=256, **common)
        return GPT2LMHeadModel(config)
    shape = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **common,
    )
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**shape))
    return LlamaForCausalLM(LlamaConfig(**shape))


@pytest.fixture(scope="module")
def local_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved random-init model per architecture, with the embedded tokenizer (its chat
    template has {% generation %} markers)."""
    root = tmp_path_factory.mktemp("local_models")
    tokenizer = build_tokenizer()
    paths = {}
    for arch in LINEAR_LAYERS:
        torch.manual_seed(0)
        model = _build(arch, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        paths[arch] = root / arch
        model.save_pretrained(paths[arch])
        tokenizer.save_pretrained(paths[arch])
    return paths


def _linear_layers(model_dir: Path) -> set[str]:
    """Module paths of the model's linear layers but the output head, read from the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    output = model.get_output_embeddings()
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D) and module is not output
    }


@pytest.mark.parametrize("peft", ["lora", "qlora"])
@pytest.mark.parametrize("arch", sorted(LINEAR_LAYERS))
def test_sft_then_dpo_adapts_every_linear_layer(compose_cfg, local_models, arch, peft) -> None:
    model = [f"model.name={arch}", f"model.name_or_path={local_models[arch]}"]
    sft.run(compose_cfg(*model, f"peft={peft}"))
    dpo.run(compose_cfg(*model, "stage=dpo", f"peft={peft}", *PAIRS_FAST, "stage.max_steps=4"))

    runs = Path(compose_cfg().paths.runs_root) / "toy"
    sft_final, dpo_final = runs / "sft" / "final", runs / "dpo" / "final"
    expected = LINEAR_LAYERS[arch]
    linear_layers = _linear_layers(local_models[arch])
    assert {path.rsplit(".", 1)[-1] for path in linear_layers} == expected
    for final in (sft_final, dpo_final):
        config = json.loads((final / "adapter_config.json").read_text())
        # peft saves all-linear resolved: layer names, or full paths where names repeat
        targets = {name.rsplit(".", 1)[-1] for name in config["target_modules"]}
        assert targets == expected, "all-linear = these layers"
    sft_weights, dpo_weights = saved_tensors(sft_final), saved_tensors(dpo_final)
    # every linear layer of every block is adapted (key: base_model.model.<path>.lora_A.weight)
    adapted = {
        key.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
        for key in sft_weights
        if ".lora_A." in key
    }
    assert adapted == linear_layers
    # SFT trained the adapter (lora_B starts at zero), DPO moved every tensor of it further.
    assert all(sft_weights[k].abs().sum() > 0 for k in sft_weights if ".lora_B." in k)
    assert sft_weights.keys() == dpo_weights.keys()
    unchanged = [k for k in sft_weights if torch.equal(sft_weights[k], dpo_weights[k])]
    assert not unchanged, f"DPO left {unchanged[:3]} unchanged"
    manifest = json.loads((runs / "dpo" / "manifest.json").read_text())
    assert manifest["kind"] == peft
