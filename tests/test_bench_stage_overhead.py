"""bench/stage_overhead.py: the report's arithmetic (fast), and a real --quick run of both sides
(slow: four interpreters with torch/transformers/trl imports) whose report is checked."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "stage_overhead", REPO / "bench/stage_overhead.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_manifest_phases_split_startup_and_other() -> None:
    bench = _bench()
    manifest = {"timings": {"seconds": 10.0, "phases": {"load": 1.0, "train": 6.0, "save": 0.5}}}
    phases = bench.manifest_phases(manifest, wall=13.0)
    assert phases == pytest.approx(
        {"startup": 3.0, "load": 1.0, "train": 6.0, "save": 0.5, "other": 2.5}
    )
    # A manifest without phases (older alignpipe): all its seconds are "other".
    assert bench.manifest_phases({"timings": {"seconds": 4.0}}, wall=5.0) == pytest.approx(
        {"startup": 1.0, "other": 4.0}
    )


def test_summary_ratios_are_the_raw_sums_divided() -> None:
    bench = _bench()
    rounds = [
        {
            "pipeline": {"wall": 20.0, "phases": {"startup": 4.0, "train": 10.0, "eval": 6.0}},
            "plain": {"wall": 12.0, "phases": {"startup": 2.0, "train": 9.0, "eval": 1.0}},
        },
        {
            "pipeline": {"wall": 22.0, "phases": {"startup": 5.0, "train": 11.0, "eval": 6.0}},
            "plain": {"wall": 13.0, "phases": {"startup": 2.0, "train": 10.0, "eval": 1.0}},
        },
    ]
    summary = bench.summarize(rounds)
    assert summary["phases"]["train"] == {
        "pipeline": 21.0,
        "plain": 19.0,
        "ratio": round(21 / 19, 4),
    }
    assert summary["phases"]["eval"]["ratio"] == 6.0
    assert summary["train_ratio"] == round(21 / 19, 4)
    assert summary["end_to_end_ratio"] == round(42 / 25, 4)
    assert "load" not in summary["phases"]  # a phase neither side had is left out


@pytest.mark.slow
def test_quick_run_writes_a_consistent_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    subprocess.run(
        [sys.executable, str(REPO / "bench/stage_overhead.py"), "--quick", "--out", str(out),
         "--work", str(tmp_path / "work")],
        cwd=REPO, check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    report = json.loads((out / "stage_overhead.json").read_text())
    md = (out / "stage_overhead.md").read_text()
    assert "| train |" in md and "end to end" in md and report["command"] in md

    (raw,) = report["raw"]
    for side in ("pipeline", "plain"):
        phases = raw[side]["phases"]
        for name in ("startup", "load", "data", "train", "eval", "save"):
            assert phases.get(name, 0) > 0, (side, name, phases)
        # Phases + startup + other account for the side's whole wall time.
        assert sum(phases.values()) == pytest.approx(raw[side]["wall"], rel=1e-6)
    for stage in ("sft", "dpo"):
        assert set(raw["pipeline"]["stages"][stage]["phases"]) >= {"startup", "load", "train"}

    summary = report["summary"]
    for name, row in summary["phases"].items():
        assert math.isclose(row["ratio"], row["pipeline"] / row["plain"], rel_tol=1e-3), name
    assert math.isclose(
        summary["end_to_end_ratio"], raw["pipeline"]["wall"] / raw["plain"]["wall"], rel_tol=1e-3
    )
    assert summary["train_ratio"] == summary["phases"]["train"]["ratio"]

    # The plain side's models are plain save_pretrained directories that load and generate.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for stage in ("sft", "dpo"):
        path = raw["plain"]["models"][stage]
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
            return_tensors="pt", return_dict=True,
        )  # fmt: skip
        out_ids = model.generate(**ids, max_new_tokens=4, do_sample=False)
        assert out_ids.shape[1] > ids["input_ids"].shape[1]
    # Same knobs on both sides: the plain DPO trained on pairs from the same recipe.
    assert raw["plain"]["metrics"]["train_pairs"] > 0
