"""The life of one stage run: validate, skip-or-resume, track, and commit with DONE.

Every stage recipe follows the same shape::

    stage = StageRun.begin(cfg, "sft")
    if stage.finished:            # DONE and not force: a no-op
        return stage.metrics
    with stage:                   # opens W&B, times the run, closes W&B even on failure
        ...                       # the recipe
        stage.finish(loaded, tokenizer, metrics, data=...)
    return stage.metrics

``finish`` saves ``final/``, then metrics.json, manifest.json and DONE, in that order, on the
main process only; so an interrupted stage is never marked done and re-running it resumes
from its last complete checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.core import handoff
from stages.core.handoff import ParentStage
from stages.core.runtime import (
    Precision,
    is_main_process,
    main_process_first,
    resolve_precision,
    seed_everything,
    sharded_parameters,
    world_size,
)
from stages.core.schema import Config, ConfigError, validate_config
from stages.core.tracking import StageTracker

log = logging.getLogger(__name__)


class StageRun:
    """Run directory, config, parent, tracking and manifest of one stage run."""

    def __init__(self, cfg: Config, raw: DictConfig) -> None:
        self.cfg = cfg
        self.resolved_config: dict[str, Any] = OmegaConf.to_container(raw, resolve=True)  # type: ignore[assignment]
        self.name: str = cfg.stage.name
        self.run_dir = handoff.stage_dir(
            cfg.paths.runs_root, cfg.experiment_name, self.name, cfg.paths.variant
        )
        self.precision: Precision = resolve_precision(cfg.precision)
        self.metrics: dict[str, Any] = {}
        self.parent: ParentStage | None = None
        self.resume_checkpoint: Path | None = None
        self.finished = False
        self.manifest_extra: dict[str, Any] = {}
        self._started = 0.0
        self.tracker = StageTracker(
            cfg.tracking,
            experiment=cfg.experiment_name,
            stage=self.name,
            run_dir=self.run_dir,
            config=self.resolved_config,
            name="/".join(p for p in (cfg.experiment_name, self.name, cfg.paths.variant) if p),
        )

    @classmethod
    def begin(cls, raw: DictConfig, expected_stage: str) -> StageRun:
        """Validate the config, then decide: no-op (finished), fresh start, or resume."""
        cfg = validate_config(raw)
        sharded = sharded_parameters()
        if sharded:
            # finish() saves final/ from rank 0's copy of the model, right under DDP and ZeRO-2
            # (every rank holds all weights). Under FSDP / ZeRO-3 rank 0 holds a shard: saving
            # needs a gather on every rank first, not wired yet. Refuse now rather than hang or
            # write a partial model after the whole run.
            raise ConfigError(
                f"{sharded} with {world_size()} processes is not supported yet: saving final/ "
                "needs a collective gather of the sharded weights. Use ACC=ddp or ACC=zero2 "
                "(with peft=lora/qlora the frozen base is small enough to replicate)."
            )
        if cfg.stage.name != expected_stage:
            raise ConfigError(
                f"stage.name={cfg.stage.name!r} but this is the {expected_stage} stage"
            )
        run = cls(cfg, raw)
        if handoff.is_done(run.run_dir) and not cfg.force:
            run.finished = True
            run.metrics = handoff.read_metrics(run.run_dir)
            log.info("%s is already DONE: nothing to do (force=true re-runs it)", run.run_dir)
            return run
        # Under `accelerate launch` every rank computes the same run dir from the config; only
        # rank 0 resets it, and the others look for a checkpoint to resume only after that,
        # so all ranks agree on fresh-vs-resume.
        with main_process_first():
            if cfg.force and is_main_process():
                handoff.reset_run_dir(run.run_dir)
            run.resume_checkpoint = handoff.last_complete_checkpoint(run.run_dir)
        if run.resume_checkpoint is not None:
            log.info("resuming %s from %s", run.name, run.resume_checkpoint)
        if cfg.stage.parent is not None:
            run.parent = handoff.resolve_parent(
                cfg.paths.runs_root, cfg.experiment_name, cfg.stage.parent, child=run.name
            )
        # Seed before any model is built: with this, CPU runs are bit-reproducible.
        seed_everything(cfg.seed)
        return run

    @property
    def final_dir(self) -> Path:
        return self.run_dir / handoff.FINAL

    def __enter__(self) -> StageRun:
        self._started = time.time()
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracker.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.tracker.__exit__(exc_type, exc, tb)

    def finish(
        self,
        *,
        kind: str,
        base_model: dict[str, Any],
        metrics: dict[str, Any],
        data: dict[str, Any],
        save: Any,
        eval_samples: list[dict[str, Any]] | None = None,
    ) -> None:
        """Save ``final/`` via ``save(final_dir)``, then the manifest and DONE (main process).

        ``eval_samples`` (held-out prompts with the replies the metrics were computed from)
        go to ``eval_samples.jsonl`` so anyone can re-score them with their own judge.
        """
        self.metrics = metrics
        self.tracker.summarize(metrics)
        if not is_main_process():
            return
        save(self.final_dir)
        if eval_samples:
            handoff.write_jsonl_atomic(self.run_dir / handoff.EVAL_SAMPLES, eval_samples)
        finished = time.time()
        manifest = {
            "stage": self.name,
            "experiment": self.cfg.experiment_name,
            "variant": self.cfg.paths.variant or None,
            "parent": self.parent.as_manifest_ref() if self.parent else None,
            "base_model": base_model,
            "kind": kind,
            "config": self.resolved_config,
            "data": data,
            "seed": self.cfg.seed,
            "precision": self.precision.name,
            "world_size": world_size(),  # processes that trained it (accelerate launch)
            "resumed_from": str(self.resume_checkpoint) if self.resume_checkpoint else None,
            "versions": handoff.package_versions(),
            "git": handoff.git_state(),
            "timings": {
                "started": self._started,
                "finished": finished,
                "seconds": round(finished - self._started, 2),
            },
            **self.manifest_extra,
        }
        handoff.finalize_stage(self.run_dir, manifest, metrics)
        log.info("%s DONE -> %s", self.name, self.run_dir)
