"""Read W&B offline runs back with `wandb leet inspect --json` (what tests assert on)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class OfflineRun:
    path: Path
    group: str | None
    job_type: str | None
    name: str | None
    tags: list[str]
    config: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    state: str | None = None

    def series(self, key: str) -> list[float]:
        return [row[key] for row in self.history if key in row]


def _wandb_cli() -> str:
    beside_python = Path(sys.executable).with_name("wandb")
    return str(beside_python) if beside_python.exists() else (shutil.which("wandb") or "wandb")


def offline_runs(root: Path) -> list[Path]:
    return sorted(root.rglob("offline-run-*"))


def read_offline_run(run_dir: Path) -> OfflineRun:
    cli = _wandb_cli()

    def inspect(*flags: str) -> str:
        return subprocess.run(
            [cli, "leet", "inspect", *flags, "--json", str(run_dir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout

    records = inspect()
    summary = json.loads(inspect("--summary"))
    run_record: dict[str, Any] = {}
    history = []
    for line in records.splitlines():
        record = json.loads(line)
        if record["type"] == "run":
            run_record = record["run"]
        elif record["type"] == "history":
            history.append(record["history"]["item"])
    return OfflineRun(
        path=run_dir,
        group=run_record.get("run_group"),
        job_type=run_record.get("job_type"),
        name=run_record.get("display_name"),
        tags=list(summary.get("tags") or []),
        config=summary.get("config", {}),
        history=history,
        summary=summary.get("summary", {}),
        state=summary.get("state"),
    )
