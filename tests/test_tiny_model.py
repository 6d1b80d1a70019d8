"""The embedded tiny model and byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.core.schema import TinyModelSpec
from stages.core.tiny_model import build_tokenizer, ensure_tiny_model


@pytest.mark.parametrize(
    "text", ["What is 23 + 45?", "héllo wörld — ünïcode ✓ 🙂", "tabs\tand\nnewlines  ", "数学"]
)
def test_tokenizer_round_trips_any_utf8(text: str) -> None:
    tok = build_tokenizer()
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chat_template_marks_assistant_reply_and_its_end_token() -> None:
    tok = build_tokenizer()
    msgs = [{"role": "user", "content": "What is 1 + 2?"}, {"role": "assistant", "content": "3."}]
    out = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(masked) == "3.<|end|>"
    prompt = tok.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(msgs, tokenize=False).startswith(prompt)


def test_unknown_role_is_rejected() -> None:
    with pytest.raises(Exception, match="unknown role: tool"):
        build_tokenizer().apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_tiny_model_is_built_once_deterministically(tmp_path) -> None:
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    a = ensure_tiny_model(spec, tmp_path / "a")
    b = ensure_tiny_model(spec, tmp_path / "b")
    assert ensure_tiny_model(spec, tmp_path / "a") == a  # second call reuses the build
    ma, mb = AutoModelForCausalLM.from_pretrained(a), AutoModelForCausalLM.from_pretrained(b)
    for (ka, va), (kb, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    tok = AutoTokenizer.from_pretrained(a)
    assert tok.chat_template and tok.eos_token == "<|end|>" and tok.pad_token == "<|pad|>"
    other = ensure_tiny_model(
        TinyModelSpec(init_seed=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        tmp_path / "a",
    )
    assert other != a
