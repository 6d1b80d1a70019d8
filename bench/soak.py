"""Kill -9 soak and disk-full recovery for `make sft dpo` (issue 11, "What it must show").

Soak (default): one uninterrupted `make sft dpo` as the reference, then rounds of the same
pipeline in a fresh runs root, each attempt killed with SIGKILL (the whole process group:
make and the stage) at a random point of a randomly chosen phase, and rerun, until the
pipeline finishes by itself; each finished round's final/ weights (tensor by tensor),
metrics.json (timing fields aside) and eval_samples.jsonl are compared with the reference.
Repeats until ``--cycles`` kills have been made. Phases, seen on disk in the running stage's
dir (stages/core/handoff.py names):

- ``training``: a random moment after the stage dir appears (up to the time the reference
  took to reach final/);
- ``saving``:   a ``checkpoint-N`` dir without its completeness marker (being written);
- ``evaluation``: ``final.json`` written (final/ saved) but no ``DONE`` (post-training eval).

Disk full (``--disk-full``, needs root for `mount`): `make sft` with runs/ on a tmpfs smaller
than the run needs, which must fail; the tmpfs is then remounted bigger (space freed) and the
same command rerun, which must recover by itself to the reference result.

    python bench/soak.py                              # 20 kills, the embedded default
    python bench/soak.py --cycles 3 -- stage.max_steps=24 stage.logging_steps=4 stage.save_steps=8
    python bench/soak.py --disk-full -- stage.max_steps=24 stage.logging_steps=4 stage.save_steps=8
    make soak SOAK_CYCLES=3 ARGS="stage.max_steps=24"   # the same through make

Prints a table and exits 0 only when every finished round equals the reference and no rerun
failed by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stages.core.handoff import (  # noqa: E402  (after sys.path: runs from a checkout)
    CHECKPOINT_COMPLETE,
    DONE,
    EVAL_SAMPLES,
    FINAL,
    FINAL_RECORD,
    METRICS,
)

STAGES = ("sft", "dpo")
PHASES = ("training", "saving", "evaluation")
# Metrics that measure time, not the result: they differ between any two runs.
TIMING = re.compile(r"(runtime|_per_second|per_s$|seconds|_s$|time|^perf/)")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
POLL_S = 0.005


@dataclass
class Attempt:
    """One `make` invocation of a round: killed (where, when) or finished (exit status)."""

    round: int
    target: str  # phase aimed at, "" for a plain rerun
    stage: str = ""
    killed_at: str = ""  # what was on disk at the kill
    seconds: float = 0.0
    returncode: int | None = None
    log_tail: str = ""


@dataclass
class RoundResult:
    round: int
    kills: list[Attempt] = field(default_factory=list)
    finished: bool = False
    failure: str = ""  # an attempt that failed by itself (not killed), with its log tail
    weights_equal: dict[str, str] = field(default_factory=dict)
    metrics_equal: dict[str, str] = field(default_factory=dict)
    samples_equal: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------- running


def make_command(targets: list[str], runs_root: Path, builtin: Path, extra: list[str], exp: str):
    args = [f"paths.runs_root={runs_root}", f"paths.builtin_models={builtin}", *extra]
    if not any(a.startswith("tracking") for a in extra):
        args.insert(0, "tracking=none")
    return [
        "make",
        "--no-print-directory",
        "-C",
        str(REPO),
        *targets,
        f"EXP={exp}",
        f"ARGS={shlex.join(args)}",
    ]


def start(command: list[str], log_path: Path) -> subprocess.Popen:
    # Not the variables of an outer `make soak` (MAKEFLAGS would pass its ARGS down).
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL") and not k.startswith("ALIGNPIPE_")
    }
    env.setdefault("WANDB_MODE", "offline")
    with log_path.open("ab") as log:
        log.write(f"\n$ {shlex.join(command)}\n".encode())
        # Own session: SIGKILL to the group reaches make and the stage below it.
        return subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def tail(path: Path, lines: int = 12) -> str:
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join(text[-lines:])


def running_stage(exp_dir: Path) -> str | None:
    """The first stage of the pipeline that is not DONE."""
    return next((s for s in STAGES if not (exp_dir / s / DONE).is_file()), None)


def partial_checkpoint(stage_dir: Path) -> Path | None:
    if not stage_dir.is_dir():
        return None
    for child in stage_dir.iterdir():
        if _CHECKPOINT.match(child.name) and not (child / CHECKPOINT_COMPLETE).exists():
            return child
    return None


def in_evaluation(stage_dir: Path) -> bool:
    return (stage_dir / FINAL_RECORD).is_file() and not (stage_dir / DONE).is_file()


@dataclass
class Timing:
    """When the reference's stages started (dir appeared) and saved final/, from its start."""

    started: dict[str, float] = field(default_factory=dict)
    final_saved: dict[str, float] = field(default_factory=dict)

    def training_window(self, stage: str) -> float:
        return max(0.5, self.final_saved.get(stage, 10.0) - self.started.get(stage, 0.0))


def run_reference(work: Path, builtin: Path, extra: list[str], exp: str, log: Path) -> Timing:
    """The uninterrupted pipeline, watched to learn how long each stage trains."""
    root = work / "reference"
    proc = start(make_command(list(STAGES), root, builtin, extra, exp), log)
    timing, began = Timing(), time.monotonic()
    while proc.poll() is None:
        for stage in STAGES:
            stage_dir = root / exp_name(exp) / stage
            now = time.monotonic() - began
            if stage not in timing.started and stage_dir.is_dir():
                timing.started[stage] = now
            if stage not in timing.final_saved and (stage_dir / FINAL_RECORD).is_file():
                timing.final_saved[stage] = now
        time.sleep(0.05)
    if proc.returncode != 0:
        raise SystemExit(f"the reference run failed (exit {proc.returncode}):\n{tail(log)}")
    return timing


def exp_name(exp: str) -> str:
    """experiment_name of a bundle (conf/experiment/<exp>.yaml), which names runs/<...>/."""
    text = (REPO / "conf" / "experiment" / f"{exp}.yaml").read_text()
    match = re.search(r"^experiment_name:\s*(\S+)", text, re.M)
    return match.group(1) if match else exp


def attempt_with_kill(
    rnd: int, target: str, stage_aim: str, rng: random.Random, command: list[str],
    exp_dir: Path, timing: Timing, log: Path, timeout: float,
) -> Attempt:  # fmt: skip
    """Start the pipeline; SIGKILL it once ``target`` is seen in ``stage_aim`` (or finish)."""
    attempt = Attempt(rnd, target)
    # Partial checkpoints an earlier kill left behind are not "being written" now.
    stale = {partial_checkpoint(exp_dir / s) for s in STAGES} - {None}
    # final/ saved by an earlier attempt: this one loads it and evaluates after its imports,
    # so aim a few seconds in rather than at the start.
    evaluating_again = {s for s in STAGES if in_evaluation(exp_dir / s)}
    eval_again_after = rng.uniform(8.0, 20.0)
    proc = start(command, log)
    began = time.monotonic()
    seen_dir: dict[str, float] = {}
    delay = {s: rng.uniform(0.2, 0.95) * timing.training_window(s) for s in STAGES}
    while proc.poll() is None:
        now = time.monotonic()
        if now - began > timeout:
            kill_group(proc)
            attempt.returncode, attempt.log_tail = -1, f"timeout after {timeout:.0f}s\n{tail(log)}"
            return attempt
        stage = running_stage(exp_dir)
        if stage is None or (stage_aim == "dpo" and stage == "sft"):
            time.sleep(POLL_S)
            continue
        stage_dir = exp_dir / stage
        if stage_dir.is_dir():
            seen_dir.setdefault(stage, now)
        hit = ""
        partial = partial_checkpoint(stage_dir)
        if target == "saving" and partial is not None and partial not in stale:
            hit = f"{partial.name} being written"
        elif target == "evaluation" and stage in evaluating_again:
            if now - began > eval_again_after:
                hit = f"rerun evaluating ({FINAL_RECORD} from an earlier attempt)"
        elif target == "evaluation" and in_evaluation(stage_dir):
            time.sleep(rng.uniform(0.0, 1.0))  # somewhere inside the evaluation
            hit = f"{FINAL_RECORD} saved, evaluating"
        elif target == "training" and stage in seen_dir and now - seen_dir[stage] > delay[stage]:
            if in_evaluation(stage_dir):  # the window was too long: this is evaluation
                hit = "training over (evaluating)"
            else:
                newest = max(
                    (int(m.group(1)) for c in stage_dir.iterdir()
                     if (m := _CHECKPOINT.match(c.name))),
                    default=0,
                )  # fmt: skip
                hit = f"training (newest checkpoint-{newest})" if newest else "training"
        if hit:
            if proc.poll() is not None:
                break
            kill_group(proc)
            attempt.stage, attempt.killed_at = stage, hit
            attempt.seconds = time.monotonic() - began
            return attempt
        time.sleep(POLL_S)
    attempt.returncode = proc.returncode
    attempt.seconds = time.monotonic() - began
    attempt.log_tail = tail(log)
    return attempt


# ------------------------------------------------------------------------- comparison


def compare_weights(a: Path, b: Path) -> str:
    """ "equal" when every tensor of every *.safetensors in final/ is bit-identical."""
    import torch
    from safetensors.torch import load_file

    files_a = sorted(p.name for p in a.glob("*.safetensors"))
    files_b = sorted(p.name for p in b.glob("*.safetensors"))
    if not files_a or files_a != files_b:
        return f"DIFFERENT files {files_a} vs {files_b}"
    for name in files_a:
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        if ta.keys() != tb.keys():
            return f"DIFFERENT keys in {name}"
        diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
        if diff:
            return f"DIFFERENT {len(diff)}/{len(ta)} tensors, e.g. {diff[0]}"
    return "equal"


def comparable_metrics(path: Path) -> dict:
    return {k: v for k, v in json.loads(path.read_text()).items() if not TIMING.search(k)}


def compare_metrics(a: Path, b: Path) -> str:
    ma, mb = comparable_metrics(a), comparable_metrics(b)
    diff = sorted(k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k))
    return "equal" if not diff else f"DIFFERENT {diff[0]}: {ma.get(diff[0])} vs {mb.get(diff[0])}"


def compare_stage(ref: Path, got: Path) -> tuple[str, str, str]:
    if not (got / DONE).is_file():
        return "no DONE", "no DONE", "no DONE"
    samples = (
        "equal"
        if (ref / EVAL_SAMPLES).read_bytes() == (got / EVAL_SAMPLES).read_bytes()
        else "DIFFERENT"
    )
    return (
        compare_weights(ref / FINAL, got / FINAL),
        compare_metrics(ref / METRICS, got / METRICS),
        samples,
    )


# ------------------------------------------------------------------------------ soak


def soak(args: argparse.Namespace, work: Path, builtin: Path, log: Path) -> bool:
    rng = random.Random(args.seed)
    exp = exp_name(args.exp)
    saved = work / "reference" / "timing.json"
    if saved.is_file() and all((work / "reference" / exp / s / DONE).is_file() for s in STAGES):
        # The same --workdir again (same ARGS assumed): reuse the uninterrupted run.
        timing = Timing(**json.loads(saved.read_text()))
        print(f"soak: reusing the reference run under {work / 'reference'}", flush=True)
    else:
        print(f"soak: reference run (uninterrupted) under {work / 'reference'} ...", flush=True)
        timing = run_reference(work, builtin, args.extra, args.exp, log)
        saved.write_text(json.dumps({"started": timing.started, "final_saved": timing.final_saved}))
    print(
        "soak: reference took "
        + ", ".join(f"{s} {timing.training_window(s):.0f}s to final/" for s in STAGES),
        flush=True,
    )
    timeout = args.attempt_timeout
    results: list[RoundResult] = []
    kills, rnd = 0, 0
    while kills < args.cycles:
        rnd += 1
        root = work / f"round-{rnd}"
        shutil.rmtree(root, ignore_errors=True)
        command = make_command(list(STAGES), root, builtin, args.extra, args.exp)
        result = RoundResult(rnd)
        results.append(result)
        while True:
            target = rng.choice(args.phases) if kills < args.cycles else ""
            stage_aim = rng.choice(STAGES)
            attempt = attempt_with_kill(
                rnd, target, stage_aim, rng, command, root / exp, timing, log, timeout
            )
            if attempt.killed_at:
                kills += 1
                result.kills.append(attempt)
                print(
                    f"  round {rnd} kill {kills}/{args.cycles}: {attempt.stage} "
                    f"{attempt.target} -> {attempt.killed_at} at {attempt.seconds:.1f}s",
                    flush=True,
                )
                continue
            if attempt.returncode != 0:
                result.failure = f"exit {attempt.returncode}:\n{attempt.log_tail}"
                print(f"  round {rnd}: rerun FAILED by itself ({result.failure})", flush=True)
            else:
                result.finished = True
            break
        for stage in STAGES:
            w, m, s = compare_stage(work / "reference" / exp / stage, root / exp / stage)
            result.weights_equal[stage] = w
            result.metrics_equal[stage] = m
            result.samples_equal[stage] = s
        if (
            not args.keep
            and result.finished
            and all(v == "equal" for v in result.weights_equal.values())
        ):
            shutil.rmtree(root, ignore_errors=True)
    print_soak_table(results)
    return all(
        r.finished and not r.failure
        and all(v == "equal" for d in (r.weights_equal, r.metrics_equal) for v in d.values())
        for r in results
    )  # fmt: skip


def print_soak_table(results: list[RoundResult]) -> None:
    print("\n| round | kills (stage phase -> on disk) | rerun | " + " | ".join(
        f"{s} weights | {s} metrics | {s} samples" for s in STAGES) + " |")  # fmt: skip
    print("|---" * (3 + 3 * len(STAGES)) + "|")
    for r in results:
        kills = "; ".join(f"{k.stage} {k.target} -> {k.killed_at}" for k in r.kills) or "-"
        outcome = "finished" if r.finished else ("FAILED" if r.failure else "?")
        cells = [
            c for s in STAGES
            for c in (r.weights_equal.get(s, ""), r.metrics_equal.get(s, ""),
                      r.samples_equal.get(s, ""))
        ]  # fmt: skip
        print(f"| {r.round} | {kills} | {outcome} | " + " | ".join(cells) + " |")
    for r in results:
        if r.failure:
            print(f"\nround {r.round} failed by itself, {r.failure}")


# -------------------------------------------------------------------------- disk full


def disk_full(args: argparse.Namespace, work: Path, builtin: Path, log: Path) -> bool:
    """`make sft` on a too-small tmpfs must fail; after freeing space it must recover."""
    exp = exp_name(args.exp)
    reference = work / "reference"  # the soak's reference, when it ran with these ARGS
    if not (reference / exp / "sft" / DONE).is_file():
        reference = work / "reference-sft"
        print(f"disk-full: reference `make sft` under {reference} ...", flush=True)
        proc = start(make_command(["sft"], reference, builtin, args.extra, args.exp), log)
        if proc.wait() != 0:
            raise SystemExit(f"the reference run failed:\n{tail(log)}")
    needed = sum(p.stat().st_size for p in (reference / exp / "sft").rglob("*") if p.is_file())
    small = max(1 << 20, int(needed * args.disk_fraction))
    mount = work / "small"
    mount.mkdir(exist_ok=True)
    rows: list[tuple[str, str]] = []
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={small}", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            text=True,
        )
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        print(f"disk-full: cannot mount a small tmpfs here ({detail.strip()}); skipped")
        return False
    try:
        runs = mount / "runs"
        command = make_command(["sft"], runs, builtin, args.extra, args.exp)
        first = start(command, log).wait()
        said = tail(log, 8)
        lines = [line.strip() for line in said.splitlines() if line.strip()]
        clean = next((line for line in lines if line.startswith("alignpipe: ")), None)
        error = next(
            (line for line in reversed(lines) if "Error" in line), lines[-1] if lines else ""
        )
        rows.append(
            (
                f"1. `make sft` on a {small / 2**20:.1f} MiB tmpfs (the run needs "
                f"{needed / 2**20:.1f} MiB)",
                f"make exit {first}; "
                + (f"clean message: {clean}" if clean else f"TRACEBACK, last error: {error}"),
            )
        )
        print(f"disk-full: first attempt exit {first}; its last lines:\n{said}", flush=True)
        subprocess.run(
            ["mount", "-o", f"remount,size={needed * 4}", str(mount)],
            check=True,
            capture_output=True,
        )
        rows.append(("2. free space (remount the tmpfs 4x the need)", "done, nothing else touched"))
        second = start(command, log).wait()
        rows.append(
            ("3. the same `make sft` again", f"exit {second}\n{tail(log, 4) if second else ''}")
        )
        w, m, s = compare_stage(reference / exp / "sft", runs / exp / "sft")
        rows.append(("4. final/ weights vs reference", w))
        rows.append(("5. metrics.json vs reference", m))
        rows.append(("6. eval_samples.jsonl vs reference", s))
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
    print("\n| step | outcome |\n|---|---|")
    for step, outcome in rows:
        print(f"| {step} | {outcome.strip()} |")
    return first != 0 and second == 0 and (w, m) == ("equal", "equal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=20, help="kill -9 / rerun cycles")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill schedule")
    parser.add_argument(
        "--phases", nargs="+", choices=PHASES, default=list(PHASES), help="phases to kill in"
    )
    parser.add_argument("--exp", default="toy", help="experiment bundle (make EXP=...)")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp dir")
    parser.add_argument("--keep", action="store_true", help="keep every round's runs")
    parser.add_argument(
        "--attempt-timeout", type=float, default=3600.0, help="seconds per make attempt"
    )
    parser.add_argument("--disk-full", action="store_true", help="the disk-full case instead")
    parser.add_argument(
        "--disk-fraction", type=float, default=0.5, help="tmpfs size / space the run needs"
    )
    parser.add_argument("extra", nargs="*", help="extra Hydra overrides, after --")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="alignpipe-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    builtin = work / "builtin"
    log = work / "soak.log"
    print(f"soak: work dir {work}, log {log}", flush=True)
    ok = disk_full(args, work, builtin, log) if args.disk_full else soak(args, work, builtin, log)
    print(f"\nsoak: {'PASS' if ok else 'FAIL'} (log: {log})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
