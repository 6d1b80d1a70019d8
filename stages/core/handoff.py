"""Stage handoff: run directories, manifests, the DONE marker and the parent resolver.

Contract (shared/DESIGN.md)::

    runs/<experiment>/<stage>/
      final/          save_pretrained output (model or adapter + tokenizer)
      manifest.json   provenance: parent + its manifest hash, base model, kind, config, data,
                      seed, metrics, package versions, git SHA, timings
      metrics.json    final metrics
      DONE            written last, only when everything above is complete
      checkpoint-N/   trainer checkpoints, used to resume

A stage finds its parent only through the parent's manifest, resolved from the experiment
name, never from a typed path.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

DONE = "DONE"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
FINAL = "final"
EVAL_SAMPLES = "eval_samples.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "datasets",
    "accelerate",
    "bitsandbytes",
    "wandb",
    "hydra-core",
    "alignpipe",
)


PAIRS_CACHE_DIR = "_pairs"


class HandoffError(RuntimeError):
    """A parent stage is missing, incomplete or incompatible; the message says what to run."""


def stage_dir(runs_root: str | os.PathLike, experiment: str, stage: str, variant: str = "") -> Path:
    path = Path(runs_root) / experiment / stage
    return path / variant if variant else path


def pairs_cache_root(runs_root: str | os.PathLike, experiment: str) -> Path:
    """Where generated preference pairs are cached, shared by every stage and sweep job of an
    experiment (each set keyed by its inputs, the sampled checkpoint's manifest sha among them,
    so DPO, the RM and every beta of a sweep reuse one sampling of the same SFT policy)."""
    return Path(runs_root) / experiment / PAIRS_CACHE_DIR


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temp file + rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True, default=str)
        handle.write("\n")
    os.replace(tmp, path)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint-N whose trainer state was written (transformers writes it last)."""
    if not run_dir.is_dir():
        return None
    complete = []
    for child in run_dir.iterdir():
        match = _CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            complete.append((int(match.group(1)), child))
    return max(complete)[1] if complete else None


def reset_run_dir(run_dir: Path) -> None:
    """force=true: drop a previous result so nothing stale is mistaken for the new one."""
    for name in (DONE, MANIFEST, METRICS, EVAL_SAMPLES):
        (run_dir / name).unlink(missing_ok=True)
    for child in run_dir.glob("*") if run_dir.is_dir() else ():
        if child.is_dir() and (child.name == FINAL or _CHECKPOINT.match(child.name)):
            shutil.rmtree(child)


@dataclass(frozen=True)
class ParentStage:
    """A finished upstream stage, read through its manifest."""

    stage: str
    run_dir: Path
    manifest: dict[str, Any]
    manifest_sha256: str

    @property
    def final_dir(self) -> Path:
        return self.run_dir / FINAL

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def base_model(self) -> dict[str, Any]:
        return self.manifest["base_model"]

    def as_manifest_ref(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "run_dir": str(self.run_dir),
            "manifest_sha256": self.manifest_sha256,
            "kind": self.kind,
        }


def make_target(stage: str, experiment: str) -> str:
    return f"make {stage} EXP={experiment}"


def resolve_parent(
    runs_root: str | os.PathLike, experiment: str, parent: str, *, child: str
) -> ParentStage:
    """Find the finished ``parent`` stage of ``experiment`` or fail with the make target."""
    run_dir = stage_dir(runs_root, experiment, parent)
    target = make_target(parent, experiment)
    if not run_dir.exists():
        raise HandoffError(
            f"stage '{child}' needs the '{parent}' stage of experiment '{experiment}', "
            f"but {run_dir} does not exist. Run `{target}` first."
        )
    if not is_done(run_dir):
        raise HandoffError(
            f"stage '{child}' needs the '{parent}' stage of experiment '{experiment}', but "
            f"{run_dir} is incomplete (no {DONE} marker: interrupted or failed). "
            f"Run `{target}` again to resume it."
        )
    manifest_path = run_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise HandoffError(
            f"{manifest_path} is unreadable ({err}); re-run `{target} ARGS=force=true`."
        ) from err
    if not (run_dir / FINAL).is_dir():
        raise HandoffError(f"{run_dir / FINAL} is missing; re-run `{target} ARGS=force=true`.")
    return ParentStage(parent, run_dir, manifest, file_sha256(manifest_path))


def check_same_base(parent: ParentStage, base_model_id: str, *, child: str) -> None:
    """A stage must start from the base its parent was trained from."""
    if parent.base_model["id"] != base_model_id:
        raise HandoffError(
            f"base-model mismatch: stage '{child}' is configured with base "
            f"'{base_model_id}', but its parent '{parent.stage}' ({parent.run_dir}) was "
            f"trained from '{parent.base_model['id']}'. Use the parent's model=... option, "
            f"or re-run the parent with this model (force=true)."
        )


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(repo: Path | None = None) -> dict[str, Any]:
    cwd = str(repo or Path(__file__).resolve().parents[2])
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha, "dirty": bool(status.strip())}


def finalize_stage(run_dir: Path, manifest: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Write metrics.json, manifest.json and then DONE — in that order, each atomically.

    Call only after ``final/`` is fully saved. DONE is the single commit point: a crash before
    it leaves a resumable, never a 'finished', stage.
    """
    if not (run_dir / FINAL).is_dir():
        raise HandoffError(f"refusing to mark {run_dir} DONE: {FINAL}/ was not saved")
    write_json_atomic(run_dir / METRICS, metrics)
    write_json_atomic(run_dir / MANIFEST, {**manifest, "metrics": metrics})
    (run_dir / DONE).write_text("ok\n")


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / METRICS).read_text())
