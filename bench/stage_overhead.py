"""What a stage costs beyond the TRL trainer it wraps: `make sft dpo` against the same work as a
plain TRL script (bench/plain_trl_sft_dpo.py), side by side in one invocation.

    python bench/stage_overhead.py                  # full size: SFT 800 + DPO 300 steps, 1 round
    python bench/stage_overhead.py --rounds 2       # alternate pipeline / plain twice
    python bench/stage_overhead.py --quick --out /tmp/overhead   # a few steps (tests, demos)

Pipeline side: ``python -m stages stage=sft experiment=toy tracking=none
paths.runs_root=<fresh dir>`` then ``stage=dpo`` as subprocesses (what `make sft dpo` runs);
per-phase seconds from each manifest's ``timings.phases`` (load, data, train, eval, save), and
``startup`` = the process wall time minus the manifest's ``timings.seconds`` (interpreter,
imports, config composition, run-dir checks). Plain side: one subprocess timing its own phases
with perf_counter; its ``startup`` = wall minus the seconds its main() ran. Both sides compose
the same config (conf/ + the same overrides), so every knob matches.

Writes ``<out>/stage_overhead.md`` and ``.json`` (default docs/bench/): per-phase seconds of
both sides (summed over rounds), the ratio per phase (pipeline / plain), the training-phase
ratio (target <= 1.05) and the end-to-end ratio (target <= 1.15), machine, command, settings,
load average before / after, date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: bench/ is not a package on the path
    sys.path.insert(0, str(REPO))
from bench.host import cpu_model  # noqa: E402

PHASES = ("startup", "load", "data", "train", "eval", "save", "other")
MANIFEST_PHASES = ("load", "data", "train", "eval", "save")
TARGETS = {"train": 1.05, "end_to_end": 1.15}
# --quick: small but real (the tests' FAST settings): seconds, not minutes.
QUICK = [
    "data.toy.num_train=512",
    "data.toy.num_eval=16",
    "data.toy.num_reversal_train=64",
    "data.toy.num_reversal_eval=8",
    "stage.max_steps=12",
    "stage.per_device_batch_size=8",
    "stage.logging_steps=2",
    "stage.save_steps=6",
    # An untrained SFT's samples all tie: pair each with the toy's correct reply instead.
    "data.pairs.num_prompts=64",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
]


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": os.environ.get("OMP_NUM_THREADS", "torch default (= cores)"),
        "python": platform.python_version(),
    }


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _run(cmd: list[str], log_path: Path) -> float:
    """Run ``cmd`` from the repo root, output to ``log_path``; its wall seconds."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        result = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise SystemExit(f"{shlex.join(cmd)} failed ({result.returncode}); {log_path}:\n{tail}")
    return wall


def manifest_phases(manifest: dict[str, Any], wall: float) -> dict[str, float]:
    """A stage's phases from its manifest's timings, ``startup`` = process wall - the stage's
    own seconds, ``other`` = the stage's seconds not in a phase (read defensively: a manifest
    without ``timings.phases`` puts all its seconds in ``other``)."""
    timings = manifest.get("timings") or {}
    seconds = float(timings.get("seconds") or 0.0)
    phases = {k: float(v) for k, v in (timings.get("phases") or {}).items() if k in MANIFEST_PHASES}
    out = {"startup": wall - seconds, **phases}
    out["other"] = seconds - sum(phases.values())
    return out


def run_pipeline(overrides: list[str], work: Path) -> dict[str, Any]:
    runs = work / "runs"
    stages: dict[str, Any] = {}
    for stage in ("sft", "dpo"):
        cmd = [sys.executable, "-m", "stages", f"stage={stage}", "experiment=toy",
               "tracking=none", f"paths.runs_root={runs}", *overrides]  # fmt: skip
        wall = _run(cmd, work / f"pipeline_{stage}.log")
        manifest = json.loads((runs / "toy" / stage / "manifest.json").read_text())
        stages[stage] = {
            "command": shlex.join(cmd),
            "wall": wall,
            "phases": manifest_phases(manifest, wall),
            "metrics": json.loads((runs / "toy" / stage / "metrics.json").read_text()),
        }
    return {"stages": stages, "wall": sum(s["wall"] for s in stages.values()),
            "phases": _sum(s["phases"] for s in stages.values())}  # fmt: skip


def run_plain(overrides: list[str], work: Path) -> dict[str, Any]:
    report_path = work / "plain.json"
    cmd = [sys.executable, str(REPO / "bench" / "plain_trl_sft_dpo.py"), "--out",
           str(work / "plain"), "--report", str(report_path), "--", "experiment=toy",
           "tracking=none", f"paths.runs_root={work / 'plain_runs'}", *overrides]  # fmt: skip
    wall = _run(cmd, work / "plain.log")
    report = json.loads(report_path.read_text())
    phases = {"startup": wall - report["seconds"], **report["phases"], "other": report["other"]}
    return {"command": shlex.join(cmd), "wall": wall, "phases": phases,
            "metrics": report["metrics"], "models": report["models"]}  # fmt: skip


def _sum(parts: Any) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Phases summed over rounds, ratios = pipeline / plain of those sums."""
    pipeline = _sum(r["pipeline"]["phases"] for r in rounds)
    plain = _sum(r["plain"]["phases"] for r in rounds)
    wall_pipeline = sum(r["pipeline"]["wall"] for r in rounds)
    wall_plain = sum(r["plain"]["wall"] for r in rounds)
    phases = {}
    for name in PHASES:
        a, b = pipeline.get(name), plain.get(name)
        if a is None and b is None:
            continue
        phases[name] = {
            "pipeline": round(a or 0.0, 3),
            "plain": round(b or 0.0, 3),
            "ratio": None if a is None or b is None else _round(ratio(a, b)),
        }
    return {
        "phases": phases,
        "wall": {"pipeline": round(wall_pipeline, 3), "plain": round(wall_plain, 3)},
        "train_ratio": _round(ratio(pipeline.get("train", 0.0), plain.get("train", 0.0))),
        "end_to_end_ratio": _round(ratio(wall_pipeline, wall_plain)),
        "targets": TARGETS,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def markdown(report: dict[str, Any]) -> str:
    s, m = report["summary"], report["machine"]
    lines = [
        "# Stage overhead: `make sft dpo` vs the same work in plain TRL",
        "",
        "Generated by `bench/stage_overhead.py`; do not edit by hand.",
        "",
        f"- date: {report['date']}",
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, "
        f"Python {m['python']}",
        f"- load average (1/5/15 min): before {report['loadavg_before']}, "
        f"after {report['loadavg_after']}",
        f"- rounds: {report['rounds']} (pipeline and plain alternate); quick: {report['quick']}",
        f"- overrides (both sides): `{' '.join(report['overrides']) or '(none)'}`",
        "",
        "Seconds summed over rounds. Pipeline phases come from each stage's manifest "
        "(`timings.phases`, SFT + DPO); `startup` = process wall - the stage's own seconds "
        "(interpreter, imports, config checks; two processes). Plain: one process timing its "
        "phases with perf_counter.",
        "",
        "| phase | pipeline s | plain s | pipeline / plain |",
        "|---|---|---|---|",
    ]
    for name, row in s["phases"].items():
        r = "-" if row["ratio"] is None else f"{row['ratio']:.3f}"
        lines.append(f"| {name} | {row['pipeline']:.2f} | {row['plain']:.2f} | {r} |")
    w = s["wall"]
    e2e = s["end_to_end_ratio"]
    lines.append(
        f"| **end to end (wall)** | {w['pipeline']:.2f} | {w['plain']:.2f} | "
        f"{'-' if e2e is None else f'{e2e:.3f}'} |"
    )
    tr = s["train_ratio"]
    lines += [
        "",
        f"- training phase ratio: {'-' if tr is None else f'{tr:.3f}'} "
        f"(target <= {TARGETS['train']})",
        f"- end-to-end ratio: {'-' if e2e is None else f'{e2e:.3f}'} "
        f"(target <= {TARGETS['end_to_end']})",
        "",
        "## Per round",
        "",
        "| round | pipeline SFT s | pipeline DPO s | plain s |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(report["raw"], 1):
        st = r["pipeline"]["stages"]
        lines.append(
            f"| {i} | {st['sft']['wall']:.2f} | {st['dpo']['wall']:.2f} | {r['plain']['wall']:.2f} |"
        )
    lines += ["", "## Results of the last round (same knobs, own samples)", ""]
    last = report["raw"][-1]
    pm = {
        **last["pipeline"]["stages"]["sft"]["metrics"],
        **last["pipeline"]["stages"]["dpo"]["metrics"],
    }
    lines += [
        f"- pipeline: SFT eval/accuracy {_fmt(last['pipeline']['stages']['sft']['metrics'].get('eval/accuracy'))}, "
        f"DPO eval/accuracy {_fmt(pm.get('eval/accuracy'))}",
        f"- plain: SFT {_fmt(last['plain']['metrics'].get('sft/accuracy'))}, "
        f"DPO {_fmt(last['plain']['metrics'].get('dpo/accuracy'))}",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds (default 1)")
    parser.add_argument("--quick", action="store_true", help="a few steps (tests, demos)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench",
                        help="where stage_overhead.md / .json go (default docs/bench)")  # fmt: skip
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch dir for runs and models (default: a fresh temp dir)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sides")
    a = parser.parse_args(argv)
    overrides = [*(QUICK if a.quick else []), *a.overrides]
    work_root = a.work or Path(tempfile.mkdtemp(prefix="stage_overhead-"))
    load_before = os.getloadavg()
    rounds = []
    for i in range(a.rounds):
        work = work_root / f"round{i + 1}"
        work.mkdir(parents=True, exist_ok=False)
        # Alternate which side goes first, so background load drifts hit both.
        order = ("pipeline", "plain") if i % 2 == 0 else ("plain", "pipeline")
        result: dict[str, Any] = {}
        for side in order:
            print(f"round {i + 1}: {side} ...", flush=True)
            runner = run_pipeline if side == "pipeline" else run_plain
            result[side] = runner(overrides, work)
        rounds.append(result)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/stage_overhead.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "rounds": a.rounds,
        "quick": a.quick,
        "overrides": overrides,
        "work_dir": str(work_root),
        "summary": summarize(rounds),
        "raw": rounds,
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "stage_overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    (a.out / "stage_overhead.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
