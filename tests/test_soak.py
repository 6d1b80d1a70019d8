"""bench/soak.py's verdicts: weights compared tensor by tensor, metrics without timings."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("bench_soak", REPO / "bench" / "soak.py")
soak = importlib.util.module_from_spec(spec)
sys.modules["bench_soak"] = soak  # dataclasses look their module up there
spec.loader.exec_module(soak)


def _final(path: Path, **tensors: torch.Tensor) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def test_weights_equal_only_when_every_tensor_is_bit_identical(tmp_path: Path) -> None:
    a = _final(tmp_path / "a", w=torch.ones(3), b=torch.zeros(2))
    same = _final(tmp_path / "same", w=torch.ones(3), b=torch.zeros(2))
    nudged = _final(tmp_path / "nudged", w=torch.ones(3), b=torch.tensor([0.0, 1e-7]))
    assert soak.compare_weights(a, same) == "equal"
    assert soak.compare_weights(a, nudged).startswith("DIFFERENT 1/2 tensors, e.g. b")
    assert soak.compare_weights(a, tmp_path / "missing").startswith("DIFFERENT files")


def test_metrics_compare_without_timing_fields(tmp_path: Path) -> None:
    base = {"eval/accuracy": 0.5, "train/loss": 1.25, "train/runtime_s": 3.0}
    (tmp_path / "a.json").write_text(json.dumps(base))
    (tmp_path / "b.json").write_text(json.dumps({**base, "train/runtime_s": 9.0}))
    (tmp_path / "c.json").write_text(json.dumps({**base, "train/loss": 1.5}))
    assert soak.compare_metrics(tmp_path / "a.json", tmp_path / "b.json") == "equal"
    assert soak.compare_metrics(tmp_path / "a.json", tmp_path / "c.json") == (
        "DIFFERENT train/loss: 1.25 vs 1.5"
    )
    for key in ("train/runtime_s", "perf/tokens_per_s", "train_samples_per_second", "seconds"):
        assert soak.TIMING.search(key), key
    for key in ("eval/accuracy", "train/loss", "eval/kl_per_token", "train/steps"):
        assert not soak.TIMING.search(key), key
