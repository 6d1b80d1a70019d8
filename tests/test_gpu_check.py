"""bench/gpu_check.py: the FLOPs / MFU arithmetic (hand-checked), the vocab-filling tokenizer,
the report of a failed stage, and (slow) the --tiny run end to end on CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

# bench/ is scripts, not a package: load the file (registered, for its dataclasses).
spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_check
spec.loader.exec_module(gpu_check)
QWEN2_5_0_5B, TINY, Row = gpu_check.QWEN2_5_0_5B, gpu_check.TINY, gpu_check.Row
forward_params, mfu, peak_flops = gpu_check.forward_params, gpu_check.mfu, gpu_check.peak_flops


def test_forward_params_of_qwen2_5_0_5b_by_hand() -> None:
    # Per layer (d=896, kv = 2 heads x 64 = 128, inter=4864): q 896*896 + 896 bias, k and v
    # 896*128 + 128 each, o 896*896, MLP 3*896*4864, two norms 2*896 = 14,912,384; x 24 layers
    # + final norm 896 + tied embedding as head 151936*896 = 494,032,768 (Qwen2.5-0.5B: 494M).
    assert forward_params(QWEN2_5_0_5B) == 494_032_768
    # A sequence classifier: no lm head (the embedding lookup is free), a 896 -> 1 score head.
    assert forward_params(QWEN2_5_0_5B, head="score") == 494_032_768 - 151936 * 896 + 896
    # LoRA r=16 on the 7 linears: 16 * (in + out) each = 366,592 per layer, x 24.
    assert forward_params(QWEN2_5_0_5B, lora_r=16) == 494_032_768 + 24 * 366_592


def test_forward_params_match_the_built_models() -> None:
    """The formula counts what transformers / peft build (tied embeddings once)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    config = Qwen2Config(**gpu_check.asdict(TINY), tie_word_embeddings=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == forward_params(TINY)
    lora = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear"))
    assert sum(p.numel() for p in lora.parameters()) == forward_params(TINY, lora_r=16)
    classifier = Qwen2ForSequenceClassification(Qwen2Config(**gpu_check.asdict(TINY), num_labels=1))
    embedding = TINY.vocab_size * TINY.hidden_size  # looked up, not multiplied
    total = sum(p.numel() for p in classifier.parameters())
    assert total - embedding == forward_params(TINY, head="score")


def test_mfu_arithmetic() -> None:
    # 6 * 494,032,768 * 100,000 tokens/s = 2.964e14 FLOP/s; / 989e12 = 0.29972
    assert mfu(494_032_768, 100_000.0, 989e12) == pytest.approx(0.299716, abs=1e-6)
    assert mfu(1_000_000, 1_000.0, 121e12) == pytest.approx(6e9 / 121e12)
    assert mfu(494_032_768, 100_000.0, None) is None  # CPU / unknown GPU: n/a
    assert mfu(494_032_768, None, 989e12) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("Tesla T4", None),
        (None, None),
    ],
)
def test_peak_flops_table(name, peak) -> None:
    assert peak_flops(name) == peak


def test_the_filled_vocab_decodes_every_id_and_keeps_the_chat_template() -> None:
    from stages.core.tiny_model import build_tokenizer

    base = build_tokenizer()
    tokenizer = gpu_check.vocab_filling_tokenizer(22_000)  # all 2-char and lowercase 3-char pieces
    assert len(tokenizer) == 22_000
    assert tokenizer.convert_ids_to_tokens(tokenizer("abc def")["input_ids"]) == ["abc", "Ġ", "def"]
    # Ids past the byte tokenizer's decode to distinct, non-empty text (sampled replies are text).
    pieces = [tokenizer.decode([i]) for i in range(len(base), 22_000, 97)]
    assert all(pieces) and len(set(pieces)) == len(pieces)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert tokenizer.apply_chat_template(chat, tokenize=False) == base.apply_chat_template(
        chat, tokenize=False
    )
    assert (
        tokenizer.eos_token_id == base.eos_token_id and tokenizer.pad_token_id == base.pad_token_id
    )


def _meta(tiny: bool = True) -> dict:
    return {
        "date": "2026-12-02 22:00",
        "command": "python bench/gpu_check.py --tiny",
        "tiny": tiny,
        "device": None,
        "peak_flops": None,
        "machine": {
            "cpu": "x",
            "cores": 2,
            "torch_threads": 1,
            "torch": "2",
            "cuda": None,
            "loadavg_1m_before": 1.0,
        },
        "shape": gpu_check.asdict(TINY),
        "model_params": 1,
        "plan": {},
    }


def test_a_timed_out_stage_still_leaves_a_report(tmp_path) -> None:
    done = Row("sft", "none", status="ok", trained_tokens=100.0, train_s=2.0, tokens_per_s=50.0)
    late = Row("rm", "none", status="timeout (180 s)", log_tail="step 3/20")
    rows = [done, late, Row("ppo", "none", status="skipped (a parent stage did not finish)")]
    gpu_check.write_report(tmp_path, _meta(), rows)
    text = (tmp_path / "gpu.md").read_text()
    assert "| sft | none | ok |" in text and "| rm | none | timeout (180 s) |" in text
    assert "### rm / none: timeout (180 s)" in text and "step 3/20" in text
    assert "Summary: 1/3 stage runs ok; rm/none: timeout (180 s); ppo/none: skipped" in text
    assert "A `--tiny` CPU run, not a GPU measurement" in text
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"][1]["status"].startswith(
        "timeout"
    )


def _table(md: str) -> list[dict[str, str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]
    ]


@pytest.mark.slow
def test_tiny_mode_runs_every_stage_and_peft_mode_on_cpu(tmp_path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--tiny", "--out-dir", str(out),
         "--work-dir", str(tmp_path / "work")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12/12 stage runs ok" in proc.stdout
    report = json.loads((out / "gpu.json").read_text())
    table = _table((out / "gpu.md").read_text())
    assert [(r["stage"], r["peft"]) for r in table] == [
        (s, p) for p in gpu_check.PEFT_MODES for s in gpu_check.STAGES
    ]
    assert report["device"] is None and report["peak_flops"] is None
    for row, cells in zip(report["rows"], table):
        assert row["status"] == "ok" == cells["status"]
        assert row["trained_tokens"] > 0 and row["train_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["trained_tokens"] / row["train_s"])
        assert float(cells["tokens/s"]) == pytest.approx(row["tokens_per_s"], abs=0.05)
        assert float(cells["trained tokens"]) == pytest.approx(row["trained_tokens"], abs=0.5)
        assert cells["MFU"] == "n/a" and row["mfu"] is None  # CPU: no peak to divide by
        assert cells["peak GPU MiB"] == "n/a" and float(cells["peak RSS MiB"]) > 0
        assert "train" in row["phases"] and re.search(r"train \d", cells["phases (s)"])
        head = "score" if row["stage"] == "rm" else "lm"
        r = 16 if row["peft"] != "none" else 0
        expected = forward_params(TINY, head=head, lora_r=r)
        if row["stage"] == "ppo":  # policy + value
            expected += forward_params(TINY, head="score", lora_r=r)
        assert row["flop_params"] == expected
        if row["stage"] in ("ppo", "dpo"):  # rollouts / pair sampling
            assert float(cells["generation tokens/s"]) > 0
        else:
            assert cells["generation tokens/s"] == "n/a"
    assert "A `--tiny` CPU run, not a GPU measurement" in (out / "gpu.md").read_text()
