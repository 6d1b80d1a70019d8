"""SFT stage on the tiny model: full / LoRA / QLoRA learn, handoff, resume, determinism."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.core.handoff import DONE, MANIFEST, METRICS
from stages.sft import recipe as sft


def _run_dir(tmp_path: Path, experiment: str = "toy") -> Path:
    return tmp_path / "runs" / experiment / "sft"


def _weights(final: Path) -> dict[str, torch.Tensor]:
    files = sorted(final.glob("*.safetensors"))
    assert files, f"no safetensors in {final}"
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("peft", ["none", "lora", "qlora"])
def test_sft_learns_and_hands_off(compose_cfg, tmp_path, builtin_models_dir, peft) -> None:
    metrics = sft.run(compose_cfg(f"peft={peft}"))
    run_dir = _run_dir(tmp_path)

    # The loss fell.
    assert metrics["train/loss_last"] < metrics["train/loss_first"]
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0

    # The handoff contract: final/, metrics.json, manifest.json, then DONE.
    for name in ("final", METRICS, MANIFEST, DONE):
        assert (run_dir / name).exists(), name
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["stage"] == "sft" and manifest["parent"] is None
    assert manifest["kind"] == {"none": "full", "lora": "lora", "qlora": "qlora"}[peft]
    assert manifest["base_model"]["id"].startswith("builtin:tiny-llama-")
    assert manifest["data"]["content_hash"] and manifest["seed"] == 42
    peft_cfg = manifest["config"]["peft"]
    assert (peft_cfg["method"], peft_cfg["quantize"]) == {
        "none": ("none", "none"),
        "lora": ("lora", "none"),
        "qlora": ("lora", "4bit"),
    }[peft]
    assert manifest["metrics"] == json.loads((run_dir / METRICS).read_text())
    assert {"torch", "transformers", "trl", "peft"} <= set(manifest["versions"])

    # Parameters changed.
    trained = _weights(run_dir / "final")
    if peft == "none":
        base = _weights(next(builtin_models_dir.glob("tiny-llama-*")))
        changed = [k for k in base if not torch.equal(base[k], trained[k])]
        assert len(changed) == len(base), "every full-weight tensor should move"
    else:
        lora_b = [v for k, v in trained.items() if "lora_B" in k]
        assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B starts at 0"
        config = json.loads((run_dir / "final" / "adapter_config.json").read_text())
        assert Path(config["base_model_name_or_path"]).is_dir()


def test_finished_stage_is_a_noop_unless_forced(compose_cfg, tmp_path) -> None:
    first = sft.run(compose_cfg())
    weights = _run_dir(tmp_path) / "final" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert sft.run(compose_cfg()) == first
    assert weights.stat().st_mtime_ns == stamp, "a DONE stage must not retrain"
    sft.run(compose_cfg("force=true"))
    assert weights.stat().st_mtime_ns != stamp


def test_same_command_twice_gives_identical_weights(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg("experiment_name=a"))
    sft.run(compose_cfg("experiment_name=b"))
    a = _weights(_run_dir(tmp_path, "a") / "final")
    b = _weights(_run_dir(tmp_path, "b") / "final")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interrupted_stage_resumes_from_last_complete_checkpoint(compose_cfg, tmp_path) -> None:
    sft.run(compose_cfg("experiment_name=whole"))
    uninterrupted = _weights(_run_dir(tmp_path, "whole") / "final")

    sft.run(compose_cfg("experiment_name=crash"))
    run_dir = _run_dir(tmp_path, "crash")
    # Simulate a crash after checkpoint-6 while checkpoint-12 was being written.
    for name in (DONE, MANIFEST, METRICS):
        (run_dir / name).unlink()
    shutil.rmtree(run_dir / "final")
    (run_dir / "checkpoint-12" / "trainer_state.json").unlink()

    sft.run(compose_cfg("experiment_name=crash"))
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["resumed_from"].endswith("checkpoint-6")
    resumed = _weights(run_dir / "final")
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)
