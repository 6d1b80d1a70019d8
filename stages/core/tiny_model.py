"""The embedded default model: a tiny Llama and a byte-level tokenizer built from config.

Nothing here touches a hub. ``build_tiny_model`` writes a normal ``save_pretrained``
directory (config, safetensors, tokenizer, chat template, generation config), so every stage
loads it exactly like a hub checkpoint, and so can plain transformers/peft.

The tokenizer is byte-level BPE with no merges: every UTF-8 string round-trips losslessly
(users may bring their own data to the tiny model), and digits are single tokens, which makes
the addition task learnable by a model this small.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from stages.core.runtime import main_process_first
from stages.core.schema import TinyModelSpec

PAD, EOS = "<|pad|>", "<|end|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, EOS, *ROLE_TOKENS)

# Each turn is "<|role|>content<|end|>". The assistant reply and its <|end|> sit inside
# {% generation %} so assistant_only_loss trains the model to answer *and* to stop.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "<|assistant|>{% generation %}{{ message['content'] }}<|end|>{% endgeneration %}"
    "{%- else -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: 256 byte tokens + specials, with the chat template set."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(byte_alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=4096,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def spec_hash(spec: TinyModelSpec) -> str:
    """Short hash of the architecture + init seed: the identity of a built-in base model."""
    payload = json.dumps(asdict(spec), sort_keys=True).encode()
    return hashlib.sha256(payload).hexdigest()[:12]


def build_tiny_model(spec: TinyModelSpec, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """Random-init Llama; the init depends only on ``spec`` (seeded with spec.init_seed)."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attention_dropout=0.0,
    )
    # A private generator keeps the init independent of any global RNG state.
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(spec.init_seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def ensure_tiny_model(spec: TinyModelSpec, cache_root: str | os.PathLike) -> Path:
    """Build and save the tiny model once; return its directory (idempotent, atomic).

    Under `accelerate launch`, rank 0 builds it and the other ranks wait, then find it built
    (a rank on another node without a shared filesystem builds its own: same seed, same
    weights). Every rank must call this (it is a barrier).
    """
    with main_process_first():
        return _ensure_tiny_model(spec, cache_root)


def _ensure_tiny_model(spec: TinyModelSpec, cache_root: str | os.PathLike) -> Path:
    target = Path(cache_root) / f"tiny-llama-{spec_hash(spec)}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_tiny_model(spec, tokenizer)
    # Write into a temp dir and rename, so a crash never leaves a half-built base behind.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "alignpipe_builtin.json").write_text(
            json.dumps({"kind": "builtin:tiny", "spec": asdict(spec)}, indent=2)
        )
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another builder: fine
            raise
    return target
