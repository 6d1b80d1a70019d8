"""bench/ppo_vs_trl.py --scale in its tiny mode: every point reported, numbers consistent.

Runs the real script (tiny shapes, 1 warm-up + 1 timed update per point). The trl 1.12.0 side
runs when its side venv is already there; otherwise ``--skip-trl`` and our side alone is
checked (creating the venv is minutes of pip, not a test's job).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "ppo_vs_trl.py"
TRL_PYTHON = Path("/tmp/alignpipe-trl112-venv/bin/python")

sys.path.insert(0, str(REPO / "bench"))
import ppo_vs_trl  # noqa: E402


def _trl_venv_ready() -> bool:
    if not TRL_PYTHON.exists():
        return False
    probe = "import trl; assert trl.__version__ == '1.12.0'"
    return subprocess.run([TRL_PYTHON, "-c", probe], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path, bool]:
    out = tmp_path_factory.mktemp("scale") / "ppo_scaling"
    with_trl = _trl_venv_ready()
    cmd = [sys.executable, str(SCRIPT), "--scale", "--tiny", "--rounds", "1", "--threads", "1",
           "--output", str(out)]  # fmt: skip
    if not with_trl:
        cmd.append("--skip-trl")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    data = json.loads(out.with_suffix(".json").read_text())
    return data, out.with_suffix(".md").read_text(), out.with_suffix(".png"), with_trl


def test_every_shape_and_length_is_a_point(report) -> None:
    data, _, _, with_trl = report
    expected = {(name, n) for name, *_ in ppo_vs_trl.TINY_SHAPES for n in ppo_vs_trl.TINY_LENGTHS}
    assert {(p["shape"], p["response_length"]) for p in data["points"]} == expected
    kinds = {"ours", "trl"} if with_trl else {"ours"}
    assert set(data["settings"]["implementations"]) == kinds
    for point in data["points"]:
        assert set(point["median_s_per_update"]) == kinds
        for kind in kinds:
            raw = point["raw_times_s"][kind]
            assert len(raw) == point["timed_updates"] * data["settings"]["rounds"]
            assert all(t > 0 for t in raw)
            assert point["median_s_per_update"][kind] == pytest.approx(statistics.median(raw))
            shares = point["phase_shares"][kind]
            assert set(shares) == {"generation", "scoring", "training"}
            assert sum(shares.values()) == pytest.approx(1.0)
            # Every update sampled and scored: both wrapped phases were actually timed.
            assert shares["generation"] > 0 and shares["scoring"] > 0
        assert point["parameters"] == ppo_vs_trl.count_parameters(point["model"])


def test_parameter_count_matches_transformers() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    shape = {**ppo_vs_trl.MODEL, **ppo_vs_trl.TINY_SHAPES[2][1]}
    counted = ppo_vs_trl.count_parameters(shape)
    policy = LlamaForCausalLM(LlamaConfig(**shape))
    value = LlamaForSequenceClassification(LlamaConfig(**shape, num_labels=1))
    assert counted["policy"] == sum(p.numel() for p in policy.parameters())
    assert counted["value"] == sum(p.numel() for p in value.parameters())


def test_ratio_is_ours_over_trl_from_the_raw_times(report) -> None:
    data, md, _, with_trl = report
    for point in data["points"]:
        ratio = point["ratio_ours_over_trl"]
        if not with_trl:
            assert ratio is None
            continue
        ours = statistics.median(point["raw_times_s"]["ours"])
        trl = statistics.median(point["raw_times_s"]["trl"])
        assert ratio == pytest.approx(ours / trl)
        row = re.search(
            rf"^\| {point['shape']} \| [\d,]+ \| {point['response_length']} \| ([\d.]+) \| "
            rf"([\d.]+) \| \*\*([\d.]+)\*\* \|",
            md,
            re.MULTILINE,
        )
        assert row, f"no row for {point['shape']} x {point['response_length']}"
        assert float(row.group(1)) == pytest.approx(ours, abs=1e-3)
        assert float(row.group(2)) == pytest.approx(trl, abs=1e-3)
        assert float(row.group(3)) == pytest.approx(ratio, abs=1e-3)


def test_generation_rows_and_ratio(report) -> None:
    data, md, _, _ = report
    expected = {(name, n) for name, *_ in ppo_vs_trl.TINY_SHAPES for n in ppo_vs_trl.TINY_LENGTHS}
    assert {(g["shape"], g["response_length"]) for g in data["generation"]} == expected
    for g in data["generation"]:
        rates = {k: g[k]["tokens_per_s"] for k in
                 ("ours_sample_completions", "ours_generate_ids", "plain_generate")}  # fmt: skip
        assert all(r > 0 for r in rates.values())
        assert g["ratio_ours_over_plain"] == pytest.approx(
            rates["ours_sample_completions"] / rates["plain_generate"]
        )
        assert re.search(
            rf"^\| {g['shape']} \| [\d,]+ \| {g['response_length']} \| \d+ \| \d+ \| \d+ \| "
            rf"\*\*{g['ratio_ours_over_plain']:.3f}\*\* \|",
            md,
            re.MULTILINE,
        )


def test_report_states_machine_command_and_plot(report) -> None:
    data, md, png, _ = report
    assert data["machine"]["cpu"] and data["machine"]["logical_cores"] >= 1
    assert len(data["machine"]["loadavg_1m_before_after"]) == 2
    assert data["command"].startswith("python bench/ppo_vs_trl.py --scale --tiny")
    assert data["command"] in md and "load average" in md
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
