"""`runs/<exp>/sft/final` loads with plain transformers/peft and reproduces the stage's eval.

The replies are regenerated here without any alignpipe code (AutoTokenizer,
apply_chat_template, generate) and re-scored with this file's own judge.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.sft import recipe as sft


def independent_judge(prompt: str, reply: str) -> bool:
    a, b = map(int, re.findall(r"\d+", prompt)[:2])
    found = re.search(r"-?\d+", reply)
    return found is not None and int(found.group()) == a + b


def plain_greedy_accuracy(final: Path, prompts: list[str], adapter: bool) -> tuple[float, list]:
    tokenizer = AutoTokenizer.from_pretrained(final)
    loader = AutoPeftModelForCausalLM if adapter else AutoModelForCausalLM
    model = loader.from_pretrained(final).eval()
    replies = []
    for prompt in prompts:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=16, do_sample=False)
        replies.append(
            tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        )
    correct = [independent_judge(p, r) for p, r in zip(prompts, replies)]
    return sum(correct) / len(prompts), replies


def check_final_matches_manifest(run_dir: Path, adapter: bool) -> float:
    samples = [json.loads(line) for line in (run_dir / "eval_samples.jsonl").open()]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    accuracy, replies = plain_greedy_accuracy(
        run_dir / "final", [s["prompt"] for s in samples], adapter
    )
    assert replies == [s["reply"] for s in samples]
    assert accuracy == pytest.approx(manifest["metrics"]["eval/accuracy"])
    return accuracy


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_final_reloads_without_alignpipe(compose_cfg, tmp_path, peft) -> None:
    sft.run(compose_cfg(f"peft={peft}", "stage.max_steps=30"))
    run_dir = tmp_path / "runs" / "toy" / "sft"
    check_final_matches_manifest(run_dir, adapter=peft != "none")
    if peft == "qlora":  # the adapter points at the 4-bit base it was trained against
        config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
        base_config = json.loads(
            (Path(config["base_model_name_or_path"]) / "config.json").read_text()
        )
        assert base_config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"


@pytest.mark.slow
def test_default_sft_learns_the_task(default_sft) -> None:
    """The default `make sft` (full config, only tracking off): well above chance."""
    accuracy = check_final_matches_manifest(default_sft, adapter=False)
    # Chance (a random two-digit sum) is ~1/180; the mixed demonstrations cap greedy accuracy.
    assert accuracy >= 0.2
