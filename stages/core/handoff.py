"""Stage handoff: run directories, manifests, the DONE marker and the parent resolver.

Contract (docs/contracts.md)::

    runs/<experiment>/<stage>/
      final/          save_pretrained output (model or adapter + tokenizer)
      manifest.json   provenance: parent + its manifest hash, base model, kind, config, data,
                      seed, metrics, package versions, git SHA, timings
      metrics.json    final metrics
      DONE            written last, only when everything above is complete; it records the
                      manifest's sha256, so an edited manifest is noticed
      checkpoint-N/   trainer checkpoints, used to resume; complete only with their
                      checkpoint_complete.json (file sizes, written and fsynced last)
      final.json      final/'s completeness marker: its file hashes and the training metrics,
                      so a failure after training reruns only the evaluation
      run_config.json the defining config (and parents) recorded at start; a resume compares
      run.lock        PID, host and start time of the run using this dir

A stage finds its parent only through the parent's manifest, resolved from the experiment
name, never from a typed path; the parent's manifest and final/ files are checked against
their recorded hashes before any weights load.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from stages.config_files import CONF_DIR
from stages.core.stage_spec import REPLAY_STAGES

log = logging.getLogger(__name__)

DONE = "DONE"
MANIFEST = "manifest.json"
METRICS = "metrics.json"
FINAL = "final"
EVAL_SAMPLES = "eval_samples.jsonl"
CHECKPOINT_COMPLETE = "checkpoint_complete.json"  # in checkpoint-N/, written last
FINAL_RECORD = "final.json"  # next to final/, written after it (final/ stays plain HF)
RUN_CONFIG = "run_config.json"  # the defining config at start, for resume to compare
LOCK = "run.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Keys of the resolved config that only say where or how a run is tracked, logged or
# checkpointed, not what it computes: left out of the config fingerprint, so changing them
# neither makes a finished stage stale nor blocks a resume. Everything else defines the result.
NON_DEFINING_KEYS = (
    "tracking",
    "paths.runs_root",
    "paths.builtin_models",
    "paths.variant",
    "force",
    "dry_run",
    "rerun_stale",
    "objective",
    "stage.logging_steps",
    "stage.save_steps",
    "stage.save_total_limit",
    "stage.num_eval_samples_logged",
)
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


class ParentIntegrityError(HandoffError):
    """A finished stage's manifest or final/ files differ from the hashes recorded with them."""


class StaleStageError(HandoffError):
    """A DONE stage whose defining config or parent changed since it was trained."""


class ResumeMismatchError(HandoffError):
    """Checkpoints (or final/) in the run dir were made with another defining config/parent."""


class RunLockedError(HandoffError):
    """Another live process holds the run dir's lock."""


def stage_dir(runs_root: str | os.PathLike, experiment: str, stage: str, variant: str = "") -> Path:
    from stages.core.run_paths import ensure_inside  # never a run dir outside runs_root

    path = Path(runs_root) / experiment / stage
    return ensure_inside(runs_root, path / variant if variant else path)


def pairs_cache_root(runs_root: str | os.PathLike, experiment: str) -> Path:
    """Where generated preference pairs are cached, shared by every stage and sweep job of an
    experiment (each set keyed by its inputs, the sampled checkpoint's manifest sha among them,
    so DPO, the RM and every beta of a sweep reuse one sampling of the same SFT policy)."""
    return Path(runs_root) / experiment / PAIRS_CACHE_DIR


def is_done(run_dir: Path) -> bool:
    return (run_dir / DONE).is_file()


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temp file + fsync + rename: readers never see half a file, and
    a crash (or a full disk) leaves the old file or the new one, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True, default=str)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_jsonl_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- checkpoints


def _files_under(directory: Path, *, skip: str | None = None) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != skip)


def mark_checkpoint_complete(checkpoint: Path) -> None:
    """Fsync every file of ``checkpoint``, then write its completeness marker (the size of
    each file), fsynced. Call once the checkpoint is fully written; only then does resume
    use it."""
    sizes = fsync_tree(checkpoint, skip=CHECKPOINT_COMPLETE)
    write_json_atomic(checkpoint / CHECKPOINT_COMPLETE, {"files": sizes, "written": time.time()})


def fsync_tree(directory: Path, *, skip: str | None = None) -> dict[str, int]:
    """Flush every file under ``directory`` to disk; returns their sizes (relative path)."""
    sizes = {}
    for path in _files_under(directory, skip=skip):
        with path.open("rb") as handle:
            os.fsync(handle.fileno())
        sizes[str(path.relative_to(directory))] = path.stat().st_size
    fsync_dir(directory)
    return sizes


def is_complete_checkpoint(checkpoint: Path) -> bool:
    """The marker is there, readable, and every file it lists has its recorded size (a file
    truncated later, e.g. by a full disk, makes the checkpoint incomplete again)."""
    try:
        files = json.loads((checkpoint / CHECKPOINT_COMPLETE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for name, size in files.items():
        path = checkpoint / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return bool(files)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoint-N directory of ``run_dir``, oldest step first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), child)
        for child in run_dir.iterdir()
        if (m := _CHECKPOINT.match(child.name)) and child.is_dir()
    ]
    return [path for _, path in sorted(found)]


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint-N with a valid completeness marker (see ``mark_checkpoint_complete``)."""
    complete = [c for c in checkpoint_dirs(run_dir) if is_complete_checkpoint(c)]
    return complete[-1] if complete else None


def incomplete_checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N directories a crash or a full disk left half-written."""
    return [c for c in checkpoint_dirs(run_dir) if not is_complete_checkpoint(c)]


def reset_run_dir(run_dir: Path) -> None:
    """force=true: drop a previous result so nothing stale is mistaken for the new one."""
    for name in (DONE, MANIFEST, METRICS, EVAL_SAMPLES, FINAL_RECORD, RUN_CONFIG):
        (run_dir / name).unlink(missing_ok=True)
    for child in run_dir.glob("*") if run_dir.is_dir() else ():
        if child.is_dir() and (child.name == FINAL or _CHECKPOINT.match(child.name)):
            shutil.rmtree(child)


# ----------------------------------------------------------------------------- fingerprints


def defining_config(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without ``NON_DEFINING_KEYS``, JSON-normalised (as manifests store
    it), so a config and its manifest copy compare equal."""
    out: dict[str, Any] = json.loads(json.dumps(copy.deepcopy(dict(resolved)), default=str))
    for dotted in NON_DEFINING_KEYS:
        *parents, leaf = dotted.split(".")
        node: Any = out
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    # data.mix changes only the stages that replay it: a chain's shared ARGS
    # (`make sft dpo ARGS="data.mix.source=sft"`) must not make a finished SFT stale.
    stage = out.get("stage")
    if isinstance(stage, dict) and stage.get("name") not in REPLAY_STAGES:
        data = out.get("data")
        if isinstance(data, dict):
            data.pop("mix", None)
    return out


def config_sha256(defining: Mapping[str, Any]) -> str:
    canonical = json.dumps(defining, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


_ABSENT = "<absent>"


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["stage.beta: 0.1 -> 0.5", ...]``: the defining keys whose values differ."""
    before, after = _flatten(dict(old)), _flatten(dict(new))
    return [
        f"{key}: {before.get(key, _ABSENT)!r} -> {after.get(key, _ABSENT)!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key, _ABSENT) != after.get(key, _ABSENT)
    ]


def final_file_hashes(final_dir: Path) -> dict[str, str]:
    """sha256 of every file under final/ (relative path -> hex digest)."""
    return {str(p.relative_to(final_dir)): file_sha256(p) for p in _files_under(final_dir)}


def changed_files(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """Files added, removed or modified since ``recorded`` was taken."""
    return sorted(k for k in set(recorded) | set(actual) if recorded.get(k) != actual.get(k))


def read_done(run_dir: Path) -> dict[str, Any]:
    """What DONE records (the manifest's sha256); {} for a DONE from before fingerprints."""
    try:
        payload = json.loads((run_dir / DONE).read_text())
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


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


EXPERIMENT_BUNDLES = CONF_DIR / "experiment"
# Overrides that say how *this* stage runs, not how its parent was built: a hint for the
# parent drops them (a stage.* knob of DPO does not even exist for SFT).
_HOW_TO_RUN = ("force", "rerun_stale", "dry_run", "objective", "hydra", "sweep")
_NOT_FOR_PARENT = ("stage", *_HOW_TO_RUN)
# Data keys of each kind of data a stage reads (StageSpec.reads): a parent's hint keeps only
# its own (a stage that reads prompts, PPO, may need any data key).
_DATA_KEYS_OF = {
    "sft": ("data.sft.",),
    "pairs": ("data.pairs.",),
    "labelled": ("data.pairs.",),
    "prompts": ("data.",),
}


def _data_keys_of(stage: str) -> tuple[str, ...]:
    from stages.core.stage_spec import stage_spec

    spec = stage_spec(stage)
    if spec is None or not spec.reads or "prompts" in spec.reads:
        return ("data.",)
    return tuple(dict.fromkeys(p for kind in spec.reads for p in _DATA_KEYS_OF[kind]))


def make_target(
    stage: str, experiment: str, *extra_args: str, overrides: list[str] | None = None
) -> str:
    """A `make` command that runs ``stage`` for this experiment, as the user invoked it.

    ``EXP`` picks a bundle from conf/experiment/; an experiment named on the command line
    (``experiment_name=``) that is not a bundle goes into ``ARGS``, with the user's other
    group and data choices (``overrides``: their command line; by default Hydra's task
    overrides when running under Hydra), so the printed command runs the stage this one needs.
    ``extra_args`` are appended to ``ARGS`` (e.g. ``force=true``).
    """
    if overrides is None:
        overrides = _invocation.get()
    if overrides is None:
        overrides = _hydra_task_overrides()
    bundle = "toy"  # the Makefile's default EXP (and conf/config.yaml's default bundle)
    invoked = "sft"  # conf/config.yaml's default stage
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        bundle = value if key == "experiment" else bundle
        invoked = value if key == "stage" else invoked
    args: list[str] = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("experiment", "stage"):
            continue
        if stage == invoked:  # the same stage again: all but how-to-run switches
            if key.split(".")[0].split("/")[0] not in _HOW_TO_RUN:
                args.append(override)
        elif _carried_to(stage, key, value, overrides):
            args.append(override)
    if bundle not in _bundles() and not any(a.startswith("experiment_name=") for a in args):
        bundle = "toy"
    if experiment != _bundle_experiment_name(bundle) and not any(
        a.startswith("experiment_name=") for a in args
    ):
        args.insert(0, f"experiment_name={experiment}")
    args += extra_args
    command = f"make {stage} EXP={bundle}"
    return f'{command} ARGS="{" ".join(args)}"' if args else command


# The command line of this process when known outside a Hydra run (the entry point's dry run).
_invocation: ContextVar[list[str] | None] = ContextVar("alignpipe_invocation", default=None)


@contextlib.contextmanager
def invoked_with(overrides: list[str]) -> Iterator[None]:
    """Hints (make_target) printed inside this block keep these command-line overrides."""
    token = _invocation.set(list(overrides))
    try:
        yield
    finally:
        _invocation.reset(token)


def _carried_to(stage: str, key: str, value: str, overrides: list[str]) -> bool:
    if key.split(".")[0].split("/")[0] in _NOT_FOR_PARENT:
        return False
    own = _data_keys_of(stage)
    if key.startswith("data.") and not key.startswith(("data.toy.", *own)):
        return False
    if key == "data" and value == "file":  # data=file: keep it only with this stage's file
        return any(o.lstrip("+").startswith(tuple(f"{p}path=" for p in own)) for o in overrides)
    return not (stage == "rm" and key == "data.pairs.judge")  # the RM is judged by the rule


def _bundles() -> set[str]:
    return {p.stem for p in EXPERIMENT_BUNDLES.glob("*.yaml")}


def _bundle_experiment_name(bundle: str) -> str | None:
    path = EXPERIMENT_BUNDLES / f"{bundle}.yaml"
    if not path.is_file():
        return None
    match = re.search(r"^experiment_name:\s*(\S+)", path.read_text(), re.MULTILINE)
    return match.group(1) if match else bundle


def _hydra_task_overrides() -> list[str]:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    except Exception:  # no Hydra run (tests, the library used directly): no overrides
        return []


def resolve_parent(
    runs_root: str | os.PathLike, experiment: str, parent: str, *, child: str
) -> ParentStage:
    """Find the finished ``parent`` stage of ``experiment`` or fail with the make target."""
    run_dir = stage_dir(runs_root, experiment, parent)
    target = make_target(parent, experiment)
    rerun = make_target(parent, experiment, "force=true")
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
        raise HandoffError(f"{manifest_path} is unreadable ({err}); re-run `{rerun}`.") from err
    if not (run_dir / FINAL).is_dir():
        raise HandoffError(f"{run_dir / FINAL} is missing; re-run `{rerun}`.")
    manifest_sha = file_sha256(manifest_path)
    verify_stage_integrity(run_dir, manifest, manifest_sha, fix=rerun)
    return ParentStage(parent, run_dir, manifest, manifest_sha)


def verify_stage_integrity(
    run_dir: Path, manifest: dict[str, Any], manifest_sha: str, *, fix: str
) -> None:
    """The manifest is the one DONE recorded, and final/ holds the files the manifest hashed
    (not edited, not swapped for another run's). Raises ParentIntegrityError naming the file."""
    recorded_sha = read_done(run_dir).get("manifest_sha256")
    if recorded_sha is None or "final_sha256" not in manifest:
        raise ParentIntegrityError(
            f"{run_dir} has no fingerprints (DONE records no manifest sha256, or the manifest "
            f"no final/ hashes): it was written by an older alignpipe or by hand, so its "
            f"weights cannot be checked. Re-run it: `{fix}`."
        )
    if recorded_sha != manifest_sha:
        raise ParentIntegrityError(
            f"{run_dir / MANIFEST} was modified after the stage finished: its sha256 "
            f"{manifest_sha[:12]}... is not the {recorded_sha[:12]}... recorded in "
            f"{run_dir / DONE}. Restore it, or re-run the stage: `{fix}`."
        )
    changed = changed_files(manifest["final_sha256"], final_file_hashes(run_dir / FINAL))
    if changed:
        shown = ", ".join(str(run_dir / FINAL / name) for name in changed[:3])
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        raise ParentIntegrityError(
            f"{shown}{more}: not the file(s) this stage saved (sha256 differs from "
            f"{run_dir / MANIFEST}, or added/removed): final/ was edited or swapped for another "
            f"run's. Restore it, or re-run the stage: `{fix}`."
        )


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
    it leaves a resumable, never a 'finished', stage. DONE records the manifest's sha256 so
    a child notices an edited manifest.
    """
    if not (run_dir / FINAL).is_dir():
        raise HandoffError(f"refusing to mark {run_dir} DONE: {FINAL}/ was not saved")
    write_json_atomic(run_dir / METRICS, metrics)
    write_json_atomic(run_dir / MANIFEST, {**manifest, "metrics": metrics})
    write_json_atomic(run_dir / DONE, {"manifest_sha256": file_sha256(run_dir / MANIFEST)})


def read_metrics(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / METRICS).read_text())


# ----------------------------------------------------------------------------- staleness


def stale_reasons(
    run_dir: Path,
    manifest: dict[str, Any],
    defining: Mapping[str, Any],
    upstream_now: Mapping[str, ParentStage],
) -> list[str]:
    """Why a DONE stage no longer matches what this run would compute: its defining config
    changed (the keys, old -> new) or a stage it was trained from was re-run. [] = current."""
    reasons = []
    recorded = manifest.get("fingerprint", {}).get("config_sha256")
    if recorded != config_sha256(defining):
        changes = config_changes(defining_config(manifest.get("config") or {}), defining)
        reasons.append(
            "its config changed: " + "; ".join(changes)
            if changes
            else "its config fingerprint differs (recorded by another alignpipe version)"
        )
    for name, ref in recorded_upstream(manifest).items():
        now = upstream_now.get(name)
        if now is not None and now.manifest_sha256 != ref.get("manifest_sha256"):
            reasons.append(
                f"its parent '{name}' ({now.run_dir}) was re-run after it was trained from it "
                f"(parent manifest sha256 {now.manifest_sha256[:12]}... vs recorded "
                f"{str(ref.get('manifest_sha256'))[:12]}...)"
            )
    return reasons


def recorded_upstream(manifest: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The stages a manifest says its run was trained from (name -> manifest ref)."""
    upstream = dict(manifest.get("upstream") or {})
    parent = manifest.get("parent")
    if parent and parent.get("stage") not in upstream:
        upstream[parent["stage"]] = parent
    return upstream


# ----------------------------------------------------------------------------- run lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _lock_payload() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
    }


def acquire_run_lock(run_dir: Path) -> None:
    """Take ``run_dir/run.lock`` (PID, host, start time) or refuse, naming its holder.

    A lock whose PID is dead on this host is stale (a killed run) and taken over, with a log
    line; one held by this very process (a second stage of a multirun, a test) is ours.
    Call on the main process only.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    payload = _lock_payload()
    fd, tmp = tempfile.mkstemp(prefix=f".{LOCK}.", dir=run_dir)
    with os.fdopen(fd, "w") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
    try:
        for _ in range(3):
            try:
                os.link(tmp, path)  # atomic create-if-absent, with the content already in
                return
            except FileExistsError:
                pass
            try:
                holder = json.loads(path.read_text())
            except FileNotFoundError:
                continue  # released meanwhile: try again
            except ValueError:
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if host == payload["host"] and pid == payload["pid"]:
                os.replace(tmp, path)
                return
            if host == payload["host"] and isinstance(pid, int) and not _pid_alive(pid):
                log.warning(
                    "%s: taking over a stale lock of process %s (started %s), which is no "
                    "longer running",
                    path, pid, holder.get("started"),
                )  # fmt: skip
                path.unlink(missing_ok=True)
                continue
            if not holder:
                raise RunLockedError(
                    f"{path} is unreadable: another run may be starting in {run_dir}. If none "
                    f"is, delete it: `rm {path}`"
                )
            raise RunLockedError(
                f"{run_dir} is in use by another run: process {pid} on {host}, started "
                f"{holder.get('started')} ({holder.get('command')}). Wait for it to finish, "
                f"or stop it; if that process is gone (another host), `rm {path}`."
            )
        raise RunLockedError(f"could not take {path}: it keeps changing; retry")
    finally:
        Path(tmp).unlink(missing_ok=True)


def release_run_lock(run_dir: Path) -> None:
    """Remove the lock if this process holds it."""
    path = run_dir / LOCK
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: keep it
            run_dir.rmdir()  # a run that stopped before writing anything leaves no empty dir
