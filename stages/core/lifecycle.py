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

Stages that evaluate after training save ``final/`` first (``save_final``, with its
``final.json`` marker), then evaluate, then ``finish``: a failure in the evaluation leaves a
usable ``final/``, and the rerun (``final_record`` set by ``begin``) loads it and redoes only
the evaluation.

``begin`` also guards the run dir: a lock (a second run of the same dir refuses), a DONE stage
whose defining config or parent changed is reported stale (``rerun_stale=true`` reruns it),
and checkpoints made with another defining config refuse to resume, naming the keys.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from stages.core import handoff
from stages.core.handoff import ParentStage, ResumeMismatchError, StaleStageError
from stages.core.phase_timing import PhaseClock
from stages.core.runtime import (
    Precision,
    is_main_process,
    main_process_first,
    resolve_precision,
    seed_everything,
    sharded_parameters,
    sharding_refusal,
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
        # What defines the result (NON_DEFINING_KEYS left out) and the stages it starts from.
        self.defining_config = handoff.defining_config(self.resolved_config)
        self.config_sha256 = handoff.config_sha256(self.defining_config)
        self.upstream: dict[str, ParentStage] = {}
        # final.json of this run: set by save_final, or by begin when an earlier attempt
        # saved final/ and then failed (the recipe then skips training).
        self.final_record: dict[str, Any] | None = None
        self.reusing_final = False
        self._holds_lock = False
        self._started = 0.0
        # Exclusive seconds per phase (load, data, train, eval, save) into the manifest.
        self.clock = PhaseClock()
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
        # Weights sharded over processes (FSDP / ZeRO-3) where that is not supported or not
        # verified: refuse now rather than hang or write a partial model after the whole run.
        refusal = sharding_refusal(cfg.stage.name)
        if refusal:
            raise ConfigError(refusal)
        if cfg.stage.name != expected_stage:
            raise ConfigError(
                f"stage.name={cfg.stage.name!r} but this is the {expected_stage} stage"
            )
        run = cls(cfg, raw)
        created = [p for p in (run.run_dir, *run.run_dir.parents) if not p.exists()]
        if is_main_process():  # under accelerate launch only rank 0 takes the lock
            handoff.acquire_run_lock(run.run_dir)
            run._holds_lock = True
        try:
            run._prepare()
        except BaseException:
            run.release()
            # A failed start leaves no run dir behind: remove what the lock created, if empty.
            for path in created:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        if run.finished:
            run.release()
        return run

    @property
    def rerun_stale(self) -> bool:
        return bool(getattr(self.cfg, "rerun_stale", False))

    def _fix_command(self, args: str) -> str:
        return handoff.make_target(self.name, self.cfg.experiment_name, args)

    def _prepare(self) -> None:
        """No-op (DONE and current), stale (refuse or rerun), fresh start, resume, or reuse
        of a final/ that an earlier attempt saved before failing."""
        cfg = self.cfg
        if cfg.stage.parent is not None:
            # Checked against its recorded hashes here, before anything else reads it.
            self.parent = handoff.resolve_parent(
                cfg.paths.runs_root, cfg.experiment_name, cfg.stage.parent, child=self.name
            )
            self.upstream[self.parent.stage] = self.parent
        reset = bool(cfg.force)
        if handoff.is_done(self.run_dir) and not cfg.force:
            reasons = self._done_stale_reasons()
            if not reasons:
                self.finished = True
                self.metrics = handoff.read_metrics(self.run_dir)
                log.info("%s is already DONE: nothing to do (force=true re-runs it)", self.run_dir)
                return
            if not self.rerun_stale:
                raise StaleStageError(
                    f"{self.run_dir} is STALE, not reused: {'; '.join(reasons)}. Re-run it: "
                    f"`{self._fix_command('force=true')}` (or `{self._fix_command('rerun_stale=true')}`"
                    " to re-run whatever is stale)."
                )
            log.warning("%s is STALE (%s): re-running it (rerun_stale=true)", self.run_dir, reasons)
            reset = True
        # Under `accelerate launch` every rank computes the same run dir from the config; only
        # rank 0 resets or cleans it, and the others look at it only after that, so all ranks
        # agree on fresh / resume / reuse.
        with main_process_first():
            if reset and is_main_process():
                handoff.reset_run_dir(self.run_dir)
            self._check_resume_config()
            self._pick_resume_checkpoint()
            self._pick_reusable_final()
        # Seed before any model is built: with this, CPU runs are bit-reproducible.
        seed_everything(cfg.seed)

    def _done_stale_reasons(self) -> list[str]:
        manifest_path = self.run_dir / handoff.MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as err:
            return [f"{manifest_path} is unreadable ({err})"]
        recorded = handoff.read_done(self.run_dir).get("manifest_sha256")
        if recorded != handoff.file_sha256(manifest_path):
            return [f"{manifest_path} does not match the sha256 recorded in its DONE"]
        upstream_now = dict(self.upstream)
        for name in handoff.recorded_upstream(manifest):
            if name not in upstream_now:
                upstream_now[name] = handoff.resolve_parent(
                    self.cfg.paths.runs_root, self.cfg.experiment_name, name, child=self.name
                )
        return handoff.stale_reasons(self.run_dir, manifest, self.defining_config, upstream_now)

    def _recorded_run_config(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir / handoff.RUN_CONFIG).read_text())
        except (OSError, ValueError):
            return None

    def _has_progress(self) -> bool:
        """Checkpoints or a saved final/ that a rerun would build on."""
        return (
            bool(handoff.checkpoint_dirs(self.run_dir))
            or (self.run_dir / handoff.FINAL_RECORD).is_file()
        )

    def _resume_mismatch(self, recorded: dict[str, Any]) -> list[str]:
        reasons = []
        if recorded.get("config_sha256") != self.config_sha256:
            changes = handoff.config_changes(
                recorded.get("defining_config") or {}, self.defining_config
            )
            reasons.append("; ".join(changes) or "the config fingerprint differs")
        for name, stage in self.upstream.items():
            sha = (recorded.get("upstream") or {}).get(name)
            if sha is not None and sha != stage.manifest_sha256:
                reasons.append(f"parent '{name}' ({stage.run_dir}) was re-run since")
        return reasons

    def _check_resume_config(self) -> None:
        """Checkpoints / final/ of an interrupted run may only be continued with the same
        defining config and parents; else refuse (or, with rerun_stale, start over)."""
        if not self._has_progress():
            return
        recorded = self._recorded_run_config()
        if recorded is None:
            log.warning(
                "%s has checkpoints but no %s (written by an older alignpipe): cannot check "
                "that they were made with this config",
                self.run_dir, handoff.RUN_CONFIG,
            )  # fmt: skip
            return
        reasons = self._resume_mismatch(recorded)
        if not reasons:
            return
        if self.rerun_stale:
            log.warning(
                "%s: discarding checkpoints of another config (%s): starting over "
                "(rerun_stale=true)",
                self.run_dir, "; ".join(reasons),
            )  # fmt: skip
            if is_main_process():
                handoff.reset_run_dir(self.run_dir)
            return
        raise ResumeMismatchError(
            f"{self.run_dir} holds checkpoints of an interrupted run with another config, "
            f"refusing to resume it with this one: {'; '.join(reasons)}. Rerun with the "
            f"original values to resume, or start over: `{self._fix_command('force=true')}`."
        )

    def _pick_resume_checkpoint(self) -> None:
        incomplete = handoff.incomplete_checkpoints(self.run_dir)
        self.resume_checkpoint = handoff.last_complete_checkpoint(self.run_dir)
        for checkpoint in incomplete:
            log.warning(
                "%s is incomplete (interrupted while saving, or a full disk): skipping it%s",
                checkpoint,
                f"; resuming from {self.resume_checkpoint}" if self.resume_checkpoint else "",
            )
            if is_main_process():  # frees the space and keeps the trainer's rotation sane
                shutil.rmtree(checkpoint, ignore_errors=True)
        if self.resume_checkpoint is not None:
            log.info("resuming %s from %s", self.name, self.resume_checkpoint)

    def _pick_reusable_final(self) -> None:
        record_path = self.run_dir / handoff.FINAL_RECORD
        if not record_path.is_file():
            if self.final_dir.exists() and is_main_process():
                shutil.rmtree(self.final_dir)  # half-saved by a crash: save it again
            return
        try:
            record = json.loads(record_path.read_text())
            changed = handoff.changed_files(
                record["files"], handoff.final_file_hashes(self.final_dir)
            )
        except (OSError, ValueError, KeyError) as err:
            changed = [f"{record_path} unreadable ({err})"]
        if changed or record.get("config_sha256") != self.config_sha256:
            log.warning("%s: final/ changed since it was saved (%s): training again",
                        self.run_dir, changed[:3])  # fmt: skip
            if is_main_process():
                record_path.unlink(missing_ok=True)
                shutil.rmtree(self.final_dir, ignore_errors=True)
            return
        self.final_record = record
        self.reusing_final = True
        self.manifest_extra.update(record.get("manifest_extra") or {})
        log.info(
            "%s: final/ was saved by an earlier attempt that failed after training: loading it "
            "and redoing only what failed (no training)",
            self.run_dir,
        )

    def _record_run_config(self) -> None:
        upstream: dict[str, str] = {}
        recorded = self._recorded_run_config()
        if recorded and recorded.get("config_sha256") == self.config_sha256:
            # Keep what the interrupted attempt recorded for upstream stages this run has not
            # resolved yet (PPO's reward model): add_upstream compares them on resume.
            upstream.update(recorded.get("upstream") or {})
        upstream.update({name: p.manifest_sha256 for name, p in self.upstream.items()})
        handoff.write_json_atomic(
            self.run_dir / handoff.RUN_CONFIG,
            {
                "config_sha256": self.config_sha256,
                "defining_config": self.defining_config,
                "upstream": upstream,
            },
        )

    def add_upstream(self, stage: ParentStage) -> None:
        """Another stage this one is trained from besides its parent (PPO's reward model, a
        reward-model judge): recorded in the manifest, and checked like the parent on resume
        and for staleness."""
        self.upstream[stage.stage] = stage
        if self.resume_checkpoint is None and self.final_record is None:
            return
        recorded = self._recorded_run_config() or {}
        sha = (recorded.get("upstream") or {}).get(stage.stage)
        if sha is not None and sha != stage.manifest_sha256 and self.rerun_stale:
            log.warning(
                "%s: checkpoints were trained with another '%s': starting over (rerun_stale=true)",
                self.run_dir, stage.stage,
            )  # fmt: skip
            with main_process_first():
                if is_main_process():
                    handoff.reset_run_dir(self.run_dir)
            self.resume_checkpoint, self.final_record, self.reusing_final = None, None, False
        elif sha is not None and sha != stage.manifest_sha256:
            raise ResumeMismatchError(
                f"{self.run_dir} holds checkpoints trained with another '{stage.stage}' "
                f"({stage.run_dir} was re-run since): refusing to resume. Start over: "
                f"`{self._fix_command('force=true')}`."
            )

    @contextmanager
    def guard(self) -> Iterator[None]:
        """For checks a recipe runs between ``begin`` and ``with stage``: releases the lock
        if they fail."""
        try:
            yield
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._holds_lock:
            handoff.release_run_lock(self.run_dir)
            self._holds_lock = False

    def final_stage(self) -> ParentStage:
        """This run's own final/ as a stage reference (to load it like a parent)."""
        assert self.final_record is not None, "save_final first"
        manifest = {
            "kind": self.final_record["kind"],
            "base_model": self.final_record["base_model"],
            "config": self.resolved_config,
        }
        return ParentStage(self.name, self.run_dir, manifest, "")

    @property
    def final_dir(self) -> Path:
        return self.run_dir / handoff.FINAL

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        """``with stage.phase("train"):`` charges the block's wall time to that phase
        (``stages.core.phase_timing.PHASES``); the innermost of nested phases gets it."""
        return self.clock.phase(name)

    def __enter__(self) -> StageRun:
        self._started = time.time()
        self.clock.start()
        if is_main_process():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            # Before the first checkpoint: what a resume of this run must match.
            self._record_run_config()
        self.tracker.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.tracker.__exit__(exc_type, exc, tb)
        finally:
            self.release()

    def save_final(
        self,
        *,
        kind: str,
        base_model: dict[str, Any],
        train_metrics: dict[str, Any],
        save: Callable[[Path], None],
    ) -> None:
        """Save ``final/`` via ``save(final_dir)`` right after training, then ``final.json``
        (its file hashes, the training metrics and manifest extras), fsynced, last. Call it
        before any evaluation: if that fails, the rerun loads final/ instead of training."""
        record: dict[str, Any] = {
            "config_sha256": self.config_sha256,
            "kind": kind,
            "base_model": base_model,
            "train_metrics": train_metrics,
            "manifest_extra": dict(self.manifest_extra),
            "resumed_from": str(self.resume_checkpoint) if self.resume_checkpoint else None,
        }
        with self.phase("save"):
            self._write_final(record, save)
        self.final_record = record

    def _write_final(self, record: dict[str, Any], save: Callable[[Path], None]) -> None:
        main = is_main_process()
        record_path = self.run_dir / handoff.FINAL_RECORD
        if main:
            record_path.unlink(missing_ok=True)
            shutil.rmtree(self.final_dir, ignore_errors=True)
        # Sharded weights (FSDP): every rank runs `save`, whose gather is a collective;
        # models.save_final writes on the main process only. Otherwise rank 0 alone saves.
        if main or sharded_parameters():
            save(self.final_dir)
        if main:
            handoff.fsync_tree(self.final_dir)
            record["files"] = handoff.final_file_hashes(self.final_dir)
            handoff.write_json_atomic(record_path, record)

    def finish(
        self,
        *,
        metrics: dict[str, Any],
        data: dict[str, Any],
        eval_samples: list[dict[str, Any]] | None = None,
        kind: str | None = None,
        base_model: dict[str, Any] | None = None,
        save: Callable[[Path], None] | None = None,
    ) -> None:
        """Metrics, manifest and DONE (main process). If ``save_final`` was not called yet,
        ``save(final_dir)`` saves final/ now (with ``kind`` and ``base_model``).

        ``eval_samples`` (held-out prompts with the replies the metrics were computed from)
        go to ``eval_samples.jsonl`` so anyone can re-score them with their own judge.
        """
        if self.final_record is None:
            if save is None or kind is None or base_model is None:
                raise ValueError("finish() needs save, kind and base_model before save_final()")
            self.save_final(kind=kind, base_model=base_model, train_metrics={}, save=save)
        record = self.final_record
        assert record is not None
        self.metrics = metrics
        self.tracker.summarize(metrics)
        if not is_main_process():
            return
        if eval_samples:
            with self.phase("save"):
                handoff.write_jsonl_atomic(self.run_dir / handoff.EVAL_SAMPLES, eval_samples)
        timings = self.clock.report()
        self.tracker.summarize(timings.tracker_summary())
        finished = time.time()
        manifest = {
            "stage": self.name,
            "experiment": self.cfg.experiment_name,
            "variant": self.cfg.paths.variant or None,
            "parent": self.parent.as_manifest_ref() if self.parent else None,
            "upstream": {name: p.as_manifest_ref() for name, p in self.upstream.items()},
            "base_model": record["base_model"],
            "kind": record["kind"],
            "config": self.resolved_config,
            "fingerprint": {
                "config_sha256": self.config_sha256,
                "non_defining_keys": list(handoff.NON_DEFINING_KEYS),
            },
            "final_sha256": record["files"],
            "data": data,
            "seed": self.cfg.seed,
            "precision": self.precision.name,
            "world_size": world_size(),  # processes that trained it (accelerate launch)
            "resumed_from": record.get("resumed_from"),
            # true: an earlier attempt saved final/ and failed after; this one only evaluated
            "final_reused": self.reusing_final,
            "versions": handoff.package_versions(),
            "git": handoff.git_state(),
            # seconds = wall from `with stage:` on; phases = exclusive seconds of load, data,
            # train, eval, save; other = the rest (checks, hashing, tracking set-up).
            "timings": {"started": self._started, "finished": finished, **timings.as_manifest()},
            **self.manifest_extra,
        }
        handoff.finalize_stage(self.run_dir, manifest, metrics)
        log.info("%s DONE -> %s", self.name, self.run_dir)
        log.info("%s", timings.summary(self.name))


def finished_for_target(cfg: DictConfig, stage: str) -> dict[str, Any] | None:
    """The manifest of ``stage``'s finished run when it describes exactly the current
    ``stage.target`` checkpoint with the current config (a non-training stage that reads a
    target, eval or export, is a no-op only then); None otherwise."""
    typed = validate_config(cfg)
    run_dir = handoff.stage_dir(
        typed.paths.runs_root, typed.experiment_name, stage, typed.paths.variant
    )
    if not handoff.is_done(run_dir):
        return None
    try:
        recorded = json.loads((run_dir / handoff.MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    previous = recorded.get("target") or {}
    target_dir = handoff.stage_dir(typed.paths.runs_root, typed.experiment_name, typed.stage.target)
    manifest = target_dir / handoff.MANIFEST
    resolved = OmegaConf.to_container(cfg, resolve=True)
    same_config = recorded.get("fingerprint", {}).get("config_sha256") == handoff.config_sha256(
        handoff.defining_config(resolved)  # type: ignore[arg-type]
    )
    current = (
        same_config
        and previous.get("stage") == typed.stage.target
        and manifest.is_file()
        and previous.get("manifest_sha256") == handoff.file_sha256(manifest)
    )
    return recorded if current else None
