"""Experiment tracking: one W&B run per stage run, opened and finished by us.

group = experiment (or the sweep), job_type = stage, and our resolved config nested under
``alignpipe`` (HF's WandbCallback writes TrainingArguments at the top level of the same run
config, so nesting keeps the two apart). The run is opened *before* the trainer starts so
HF's callback reuses it, and finished at stage end, also on failure. Only the main process
opens a run. ``WANDB_MODE`` is honoured unless tracking.mode is set.

First run anywhere: with neither (and no ``wandb offline`` in W&B's settings) and no W&B
credentials (WANDB_API_KEY, an identity token file, ~/.netrc or W&B's settings file, found
exactly as wandb.init finds them, without network), the run goes offline instead of
prompting or failing, and one log line says where it is and how to sync it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any

from stages.core.runtime import is_main_process
from stages.core.schema import TrackingConfig

log = logging.getLogger(__name__)


def wandb_mode(configured: str | None) -> tuple[str | None, str | None]:
    """The mode to pass to wandb.init, and why it is offline when we chose that.

    tracking.mode, then WANDB_MODE, then W&B's own settings (``wandb offline``) decide when
    set; otherwise offline unless W&B finds credentials. The credential lookup is wandb's
    own (env, identity token file, .netrc, settings file), with no prompt and no network.
    """
    if configured is not None:
        return configured, None
    if os.environ.get("WANDB_MODE"):
        return None, None
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    if settings._offline or settings._noop:
        return None, None
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    found = wbauth.authenticate_session(
        host=host, source="alignpipe", prompt=False, update_session=False
    )
    if found is not None:
        return None, None
    return "offline", f"no W&B credentials found for {host.url}"


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
        self._restore_term: Any = None  # W&B's console settings to restore after an offline run

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
        from wandb.sdk import wandb_setup

        self.run_dir.mkdir(parents=True, exist_ok=True)
        mode, reason = wandb_mode(self.tracking.mode)
        global_settings = wandb_setup.singleton().settings
        offline = mode == "offline" or (mode is None and global_settings._offline)
        if offline:
            # W&B's offline banner ("Run `wandb online`...") and its warnings about what an
            # offline run lacks (TRL asks every checkpoint for the run URL) say less than the
            # one line below; they are off while this run is open and restored in __exit__.
            wandb.termsetup(global_settings.model_copy(update={"show_warnings": False}), None)
            self._restore_term = global_settings
        self.run = wandb.init(
            project=self.tracking.project,
            entity=self.tracking.entity,
            mode=mode,  # None -> WANDB_MODE, W&B's settings, or online
            group=self.tracking.group or self.experiment,
            job_type=self.stage,
            name=self.name,
            tags=list(self.tracking.tags),
            config={"alignpipe": self.config},
            dir=str(self.run_dir),
            # Several stages (or sweep jobs) in one process must each get a fresh run.
            reinit="finish_previous",
            # No history/summary panels at the end: metrics.json and the manifest hold them.
            settings=wandb.Settings(silent=True) if offline else wandb.Settings(quiet=True),
        )
        settings = self.run.settings
        if settings._offline and reason:
            log.info(
                "W&B run %s is offline (%s): %s. Upload it later with `wandb sync %s`; to "
                "track online from the start, run `wandb login` (or set WANDB_API_KEY) first.",
                self.run.id, reason, settings.sync_dir, settings.sync_dir,
            )  # fmt: skip
        elif settings._offline:
            log.info(
                "W&B run %s is offline (WANDB_MODE or tracking.mode): %s. Upload it with "
                "`wandb sync %s`.",
                self.run.id, settings.sync_dir, settings.sync_dir,
            )  # fmt: skip
        else:
            log.info("W&B run %s (%s) in %s", self.run.id, settings.mode, self.run_dir)
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
        if self._restore_term is not None:
            import wandb

            wandb.termsetup(self._restore_term, None)
            self._restore_term = None
