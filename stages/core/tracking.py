"""Experiment tracking: one W&B run per stage run, opened and finished by us.

group = experiment (or the sweep), job_type = stage, and our resolved config nested under
``alignpipe`` (HF's WandbCallback writes TrainingArguments at the top level of the same run
config, so nesting keeps the two apart). The run is opened *before* the trainer starts so
HF's callback reuses it, and finished at stage end, also on failure. Only the main process
opens a run. ``WANDB_MODE`` is honoured unless tracking.mode is set.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

from stages.core.runtime import is_main_process
from stages.core.schema import TrackingConfig

log = logging.getLogger(__name__)


class StageTracker:
    """Context manager around a W&B run (a no-op for tracking=none or non-main ranks)."""

    def __init__(
        self,
        tracking: TrackingConfig,
        *,
        experiment: str,
        stage: str,
        run_dir: Path,
        config: dict[str, Any],
        name: str | None = None,
    ) -> None:
        self.tracking = tracking
        self.experiment = experiment
        self.stage = stage
        self.run_dir = run_dir
        self.config = config
        self.name = name or f"{experiment}/{stage}"
        self.run: Any = None

    @property
    def enabled(self) -> bool:
        return self.tracking.backend == "wandb" and is_main_process()

    @property
    def report_to(self) -> list[str]:
        """Value for TrainingArguments.report_to."""
        return ["wandb"] if self.enabled else []

    def __enter__(self) -> StageTracker:
        if not self.enabled:
            return self
        import wandb

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.tracking.project,
            entity=self.tracking.entity,
            mode=self.tracking.mode,  # None -> WANDB_MODE or online
            group=self.tracking.group or self.experiment,
            job_type=self.stage,
            name=self.name,
            tags=list(self.tracking.tags),
            config={"alignpipe": self.config},
            dir=str(self.run_dir),
            # Several stages (or sweep jobs) in one process must each get a fresh run.
            reinit="finish_previous",
        )
        log.info("W&B run %s (%s) in %s", self.run.id, self.run.settings.mode, self.run_dir)
        return self

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summarize(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in metrics.items():
                self.run.summary[key] = value

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if exc is None else 1)
            self.run = None
