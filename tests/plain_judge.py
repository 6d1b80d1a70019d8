"""Score a stage's final/ the way an outside user would: plain transformers / peft, the
checkpoint's own chat template, greedy decoding, and this file's own rule (the first integer
of the reply equals A + B). Nothing from alignpipe's eval code is used."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

_INTEGER = re.compile(r"-?\d+")


def plain_greedy_accuracy(final_dir: Path, pairs: list[tuple[int, int]]) -> float:
    """Share of ``What is A + B?`` prompts whose greedy reply starts with the right sum."""
    if (final_dir / "adapter_config.json").is_file():
        model = AutoPeftModelForCausalLM.from_pretrained(final_dir).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is {a} + {b}?"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for a, b in pairs
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    replies = tokenizer.batch_decode(
        out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
    )
    correct = 0
    for (a, b), reply in zip(pairs, replies):
        found = _INTEGER.search(reply)
        correct += bool(found) and int(found.group()) == a + b
    return correct / len(pairs)
