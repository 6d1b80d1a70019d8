"""bench/ppo_memory.py in its tiny mode: the real stages sft -> rm -> ppo for each of the three
role layouts, then the report it writes (slow: nine stage subprocesses, a few minutes on 2
cores).

Checks the report, not the machine: three layouts with the role layout PPO really built,
every number parsed, peak - floor and the ratios equal to the raw numbers divided, and the
weight bytes ordered as the layouts imply (one 4-bit base < four fp32 models < four fp32
models with adapters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_frozen_lm_head_gets_a_contiguous_input(compose_cfg) -> None:
    """load_pretrained's hook: a frozen model's head never sees the strided slice that makes
    torch's matmul copy its weight once per row (what the tiny run's report exposed)."""
    import torch

    from stages.core.models import load_pretrained, resolve_base_model
    from stages.core.runtime import resolve_precision
    from stages.core.schema import validate_config

    c = validate_config(compose_cfg())
    base = resolve_base_model(c.model, c.paths)
    model = load_pretrained(
        base.path, task="causal_lm", model_cfg=c.model, peft_cfg=c.peft,
        precision=resolve_precision(c.precision), revision=None, pad_token_id=None,
    ).requires_grad_(False)  # fmt: skip
    seen: list[bool] = []
    model.get_output_embeddings().register_forward_hook(
        lambda module, args, out: seen.append(args[0].is_contiguous())
    )
    ids = torch.randint(10, 200, (4, 12))
    with torch.no_grad():
        kept = model(input_ids=ids, logits_to_keep=3).logits
        full = model(input_ids=ids).logits
    assert seen == [True, True]
    torch.testing.assert_close(kept, full[:, -3:], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tiny_run_writes_a_consistent_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "bench/ppo_memory.py", "--tiny", "--threads", "1",
         "--work", str(tmp_path / "work"), "--output", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    report = json.loads(out.with_suffix(".json").read_text())
    rows = {row["layout"]: row for row in report["layouts"]}
    assert list(rows) == ["separate-fp32", "lora", "shared-4bit"]
    assert {name: row["roles_layout"] for name, row in rows.items()} == {
        "separate-fp32": "separate",
        "lora": "separate",
        "shared-4bit": "shared_4bit_base",
    }
    for row in rows.values():
        for key in ("role_weights_mb", "floor_rss_mb", "peak_rss_mb", "process_peak_rss_mb"):
            assert isinstance(row[key], float) and row[key] > 0, (row["layout"], key)
        assert row["floor_rss_mb"] < row["peak_rss_mb"] <= row["process_peak_rss_mb"] + 1
        assert row["peak_minus_floor_mb"] == pytest.approx(row["peak_rss_mb"] - row["floor_rss_mb"])

    base = rows["separate-fp32"]
    assert set(report["ratios"]) == {"lora", "shared-4bit"}
    for name, ratio in report["ratios"].items():
        for key, value in ratio.items():
            assert value == pytest.approx(rows[name][key] / base[key]), (name, key)

    # Four fp32 models; the same plus adapters; one base whose linears are 4-bit.
    assert rows["shared-4bit"]["role_weights_mb"] < base["role_weights_mb"]
    assert rows["lora"]["role_weights_mb"] > base["role_weights_mb"]
    parameters = report["settings"]["parameters"]
    assert base["role_weights_mb"] >= 4 * parameters * 4 / 2**20  # four fp32 copies at least

    text = out.with_suffix(".md").read_text()
    shared = report["ratios"]["shared-4bit"]
    assert f"| shared-4bit / separate-fp32 | {shared['role_weights_mb']:.3f} |" in text
    assert f"{shared['peak_rss_mb']:.3f}" in text
    assert f"{parameters:,} parameters" in text
    for heading in ("## Machine", "## Settings", "load average", "bench/ppo_memory.py --tiny"):
        assert heading in text
