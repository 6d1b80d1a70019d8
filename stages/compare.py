"""`make compare`: one table and PNG plots across finished runs, read from their manifests.

    python -m stages.compare --runs runs/toy                # every stage and sweep job of toy
    python -m stages.compare --runs runs/toy --runs runs/toy_lora --out docs/compare

Owns reading run dirs back (recursively: ``runs/<exp>/<stage>/`` and sweep jobs'
``runs/<exp>/<stage>/<variant>/``), the comparison table (terminal + Markdown), and the
plots: held-out accuracy per run, training-loss curves (from the last checkpoint's
``trainer_state.json``) and the **reward-KL frontier**: true reward of the toy task (the rule
judge's held-out accuracy) against KL to the SFT reference, one point per DPO or PPO run,
in the style of Fig. 2 of the DPO paper. Nothing here needs W&B, a network or a GPU.

The metric keys are defined once, below: stages write them into their manifests (DPO and
PPO through ``stages.core.comparison.compare_with_parent``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core import handoff

# The frontier's axes. REWARD_KEY: greedy held-out accuracy by the toy task's rule judge (the
# "true reward" the preference stages are trying to raise). KL_KEY: Monte-Carlo
# KL(policy || SFT parent) summed over response tokens, on the policy's own samples at T=1:
# the sequence-level KL that the RLHF objective (PPO's penalty, DPO's implicit constraint)
# trades reward against. Both come from compare_with_parent with prefix "compare".
REWARD_KEY = "eval/accuracy"
KL_KEY = "compare/kl_per_sequence"
KL_PER_TOKEN_KEY = "compare/kl_per_token"
# Stages plotted on the frontier: (legend name, marker, colour), so DPO and PPO read apart.
FRONTIER_STAGES = {
    "dpo": ("DPO", "o", "tab:blue"),
    "ppo": ("PPO", "^", "tab:orange"),
}
REFERENCE_STAGE = "sft"

# Table columns after run/stage/kind/settings: (header, metric key in the manifest).
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", REWARD_KEY),
    ("KL/seq", KL_KEY),
    ("KL/tok", KL_PER_TOKEN_KEY),
    ("win rate", "compare/win_rate"),
    ("loss first", "train/loss_first"),
    ("loss last", "train/loss_last"),
    ("steps", "train/steps"),
)
# Config keys that never distinguish *what* was trained (paths, tracking, bookkeeping).
_IGNORED_PREFIXES = (
    "paths.",
    "tracking.",
    "experiment.",
    "experiment_name",  # already in the run's label
    "force",
    "objective",
    "stage.name",
)
_SKIP_DIRS = {
    "final",
    "wandb",
    "merged_parent",
    "_compare",
    "_sweeps",
    "_pairs",
    "_quantized_bases",
}


class CompareError(ValueError):
    """Bad input to compare: a missing runs dir, no finished runs, an unreadable manifest."""


@dataclass
class Run:
    """One finished run dir, as its manifest describes it."""

    path: Path
    label: str  # path relative to the compared root(s), e.g. "dpo/stage.beta=0.1"
    manifest: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)  # config keys that vary in its stage

    @property
    def stage(self) -> str:
        return str(self.manifest.get("stage"))

    @property
    def experiment(self) -> str:
        return str(self.manifest.get("experiment"))

    @property
    def metrics(self) -> dict[str, Any]:
        return self.manifest.get("metrics") or {}

    def metric(self, key: str) -> float | None:
        value = self.metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        return None if math.isnan(float(value)) else float(value)

    @property
    def seconds(self) -> float | None:
        return (self.manifest.get("timings") or {}).get("seconds")

    @property
    def short_label(self) -> str:
        """The label cut in the middle to fit a table column or a plot axis."""
        return _middle_cut(self.label, 48)

    @property
    def settings_label(self) -> str:
        return ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in self.settings.items()) or "-"


# ------------------------------------------------------------------------------- reading


def find_runs(roots: Sequence[str | Path]) -> list[Run]:
    """Every finished run (``DONE`` + ``manifest.json``) under ``roots``, recursively.

    Dirs without DONE (a crashed or still running stage) are skipped. Raises CompareError
    when a root is missing or holds no finished run.
    """
    paths = [Path(r) for r in roots]
    for root in paths:
        if not root.is_dir():
            raise CompareError(
                f"--runs {root}: no such directory (run a stage first, e.g. `make sft`)"
            )
    found = {manifest.parent.resolve() for root in paths for manifest in _manifests(root)}
    if not found:
        raise CompareError(
            f"no finished runs (a dir with {handoff.MANIFEST} and {handoff.DONE}) under "
            f"{', '.join(map(str, paths))}"
        )
    base = _common_base([root.resolve() for root in paths])
    runs = []
    for run_dir in sorted(found):
        try:
            manifest = json.loads((run_dir / handoff.MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise CompareError(f"{run_dir / handoff.MANIFEST} is unreadable: {err}") from err
        label = str(run_dir.relative_to(base)) if run_dir != base else run_dir.name
        runs.append(Run(path=run_dir, label=label, manifest=manifest))
    fill_settings(runs)
    return runs


def _manifests(root: Path) -> Iterable[Path]:
    stack = [root]
    while stack:
        directory = stack.pop()
        if (directory / handoff.MANIFEST).is_file() and handoff.is_done(directory):
            yield directory / handoff.MANIFEST
        for child in sorted(directory.iterdir(), reverse=True):
            if child.is_dir() and not _skipped(child.name):
                stack.append(child)


def _skipped(name: str) -> bool:
    return name in _SKIP_DIRS or name.startswith((".", "checkpoint-"))


def _common_base(paths: list[Path]) -> Path:
    if len(paths) == 1:
        return paths[0]
    parts = [p.parts for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return Path(*common) if common else Path("/")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> {"a.b.c": leaf}; lists stay leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def fill_settings(runs: Sequence[Run]) -> None:
    """Per stage, the config keys whose values differ between its runs (what a sweep swept,
    or what differs between the experiments compared). Call again on a subset to label the
    runs by what differs within that subset only."""
    by_stage: dict[str, list[Run]] = {}
    for run in runs:
        by_stage.setdefault(run.stage, []).append(run)
    for group in by_stage.values():
        flats = [flatten(run.manifest.get("config") or {}) for run in group]
        keys = sorted(set().union(*flats)) if flats else []
        varying = [
            k
            for k in keys
            if not k.startswith(_IGNORED_PREFIXES)
            and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flats}) > 1
        ]
        for run, flat in zip(group, flats):
            run.settings = {k: flat.get(k) for k in varying}


def _middle_cut(text: str, width: int) -> str:
    if len(text) <= width:
        return text
    keep = width - 1
    return f"{text[: keep // 2]}…{text[len(text) - (keep - keep // 2) :]}"


def _short(key: str) -> str:
    return key.removeprefix("stage.")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.4g}"
    return str(value)


# -------------------------------------------------------------------------------- tables


def table_rows(
    runs: Sequence[Run], *, full_labels: bool = False
) -> tuple[list[str], list[list[str]]]:
    """One row per run; ``full_labels`` keeps whole run paths (Markdown), else cut them."""
    header = [
        "run",
        "stage",
        "kind",
        "settings",
        *(h for h, _ in METRIC_COLUMNS),
        "procs",
        "time s",
    ]
    rows = []
    for run in runs:
        rows.append(
            [
                run.label if full_labels else run.short_label,
                run.stage,
                str(run.manifest.get("kind", "-")),
                run.settings_label if full_labels else _middle_cut(run.settings_label, 60),
                *(_fmt(run.metric(key)) for _, key in METRIC_COLUMNS),
                _fmt(run.manifest.get("world_size", 1)),
                _fmt(run.seconds),
            ]
        )
    return header, rows


def render_terminal(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = [i >= 4 for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown(header: list[str], rows: list[list[str]], *, text_columns: int = 4) -> str:
    """A GitHub Markdown table; the first ``text_columns`` are left-aligned, the rest right."""

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- plots


@dataclass(frozen=True)
class FrontierPoint:
    method: str  # DPO | PPO
    label: str  # the run's varying settings, e.g. "beta=0.1"
    kl: float
    reward: float
    run: str


def frontier_points(runs: Sequence[Run]) -> tuple[list[FrontierPoint], list[Run]]:
    """(points, runs of a frontier stage that lack REWARD_KEY or KL_KEY)."""
    points, missing = [], []
    for run in runs:
        if run.stage not in FRONTIER_STAGES:
            continue
        kl, reward = run.metric(KL_KEY), run.metric(REWARD_KEY)
        if kl is None or reward is None:
            missing.append(run)
            continue
        method = FRONTIER_STAGES[run.stage][0]
        points.append(FrontierPoint(method, run.settings_label, kl, reward, run.label))
    return points, missing


def is_parent_of_any(candidate: Run, runs: Sequence[Run]) -> bool:
    """``candidate`` is the parent stage of one of ``runs`` (by the parent's manifest ref).

    Parents live at ``<runs_root>/<exp>/<stage>`` (never in a sweep variant), and manifests
    may record that path relative to the cwd of the run: compare its last two parts.
    """
    for run in runs:
        parent = run.manifest.get("parent") or {}
        if parent.get("stage") != candidate.stage or "run_dir" not in parent:
            continue
        if Path(parent["run_dir"]).parts[-2:] == candidate.path.parts[-2:] and (
            candidate.experiment == run.experiment
        ):
            return True
    return False


def reference_points(runs: Sequence[Run]) -> list[tuple[str, float]]:
    """(label, accuracy) of the SFT runs that plotted runs descend from: KL 0 by definition."""
    plotted = [run for run in runs if run.stage in FRONTIER_STAGES]
    refs = []
    for run in runs:
        if run.stage == REFERENCE_STAGE and is_parent_of_any(run, plotted):
            accuracy = run.metric(REWARD_KEY)
            if accuracy is not None:
                refs.append((run.label, accuracy))
    return refs


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def frontier_figure(runs: Sequence[Run], title: str) -> Any | None:
    """The frontier as a matplotlib Figure (one scatter per method); None without points."""
    points, _ = frontier_points(runs)
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for method, marker, color in FRONTIER_STAGES.values():
        mine = sorted((p for p in points if p.method == method), key=lambda p: p.kl)
        if not mine:
            continue
        ax.scatter(
            [p.kl for p in mine],
            [p.reward for p in mine],
            marker=marker,
            s=70,
            color=color,
            edgecolor="black",
            linewidth=0.6,
            label=f"{method} runs",
            zorder=3,
        )
        placed: list[tuple[float, float]] = []
        x_span = max(max(q.kl for q in points), 1e-9)
        for p in mine:
            # Points that (nearly) coincide get their labels stacked instead of overprinted.
            near = sum(
                abs(p.kl - x) < 0.05 * x_span and abs(p.reward - y) < 0.03 for x, y in placed
            )
            placed.append((p.kl, p.reward))
            ax.annotate(
                p.label if p.label != "-" else p.run,
                (p.kl, p.reward),
                textcoords="offset points",
                xytext=(6, 4 - 9 * near),
                fontsize=7,
                color=color,
            )
    for label, accuracy in reference_points(runs):
        ax.scatter([0.0], [accuracy], marker="*", s=180, color="black", zorder=4,
                   label=f"SFT reference ({label})")  # fmt: skip
    low, high = ax.get_ylim()
    if high - low < 0.1:  # all points (nearly) equal: keep the axis readable
        middle = (high + low) / 2
        ax.set_ylim(middle - 0.05, middle + 0.05)
    ax.set_xlabel("KL(policy ‖ SFT reference) per response, nats  (sampled at T=1)")
    ax.set_ylabel("true reward: held-out accuracy (rule judge, greedy)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_frontier(runs: Sequence[Run], out: Path, title: str) -> Path | None:
    """Reward (judge accuracy) vs KL to the SFT reference as a PNG; None when no run has both."""
    fig = frontier_figure(runs, title)
    if fig is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def plot_accuracy(runs: Sequence[Run], out: Path, title: str) -> Path | None:
    scored = [(r.short_label, r.metric(REWARD_KEY), r.stage) for r in runs]
    scored = [(label, acc, stage) for label, acc, stage in scored if acc is not None]
    if not scored:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.35 * len(scored)))
    colors = [FRONTIER_STAGES.get(stage, ("", "", "tab:gray"))[2] for _, _, stage in scored]
    ax.barh([s[0] for s in scored], [s[1] for s in scored], color=colors)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("held-out accuracy (rule judge, greedy)")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def loss_history(run: Run) -> list[tuple[int, float]]:
    """(step, training loss) from the newest complete checkpoint's trainer_state.json."""
    checkpoint = handoff.last_complete_checkpoint(run.path)
    if checkpoint is None:
        return []
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [
        (int(e["step"]), float(e["loss"]))
        for e in state.get("log_history", [])
        if "loss" in e and "step" in e
    ]


def plot_losses(runs: Sequence[Run], out: Path, title: str) -> Path | None:
    curves = [(run, loss_history(run)) for run in runs]
    curves = [(run, c) for run, c in curves if len(c) >= 2]
    if not curves:
        return None
    plt = _pyplot()
    stages = sorted({run.stage for run, _ in curves})
    fig, axes = plt.subplots(1, len(stages), figsize=(5 * len(stages), 3.8), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        for run, curve in curves:
            if run.stage == stage:
                # The varying settings name a sweep's curves; past a few keys, the run path.
                short = run.settings and len(run.settings_label) <= 40
                ax.plot(*zip(*curve), label=run.settings_label if short else run.short_label)
        ax.set_title(f"{stage}: training loss")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------------- CLI


@dataclass
class Report:
    table: str  # terminal rendering
    markdown: str
    files: list[Path]
    missing_frontier: list[str]  # DPO/PPO runs without the frontier metrics


def compare(
    roots: Sequence[str | Path],
    out: str | Path,
    *,
    stages: Sequence[str] = (),
    title: str | None = None,
    prefix: str = "",
) -> Report:
    """Read runs under ``roots`` and write ``<prefix>compare.md`` + PNGs into ``out``."""
    runs = find_runs(roots)
    if stages:
        runs = [r for r in runs if r.stage in stages]
        if not runs:
            raise CompareError(f"no finished runs of stage(s) {list(stages)} under {list(roots)}")
    out = Path(out)
    title = title or ", ".join(sorted({r.experiment for r in runs}))
    header, rows = table_rows(runs)
    _, md_rows = table_rows(runs, full_labels=True)
    files = [
        f
        for f in (
            plot_frontier(runs, out / f"{prefix}frontier.png", f"Reward-KL frontier: {title}"),
            plot_accuracy(runs, out / f"{prefix}accuracy.png", f"Held-out accuracy: {title}"),
            plot_losses(runs, out / f"{prefix}loss.png", title),
        )
        if f is not None
    ]
    _, missing = frontier_points(runs)
    markdown = "\n".join(
        [
            f"# Run comparison: {title}",
            "",
            f"{len(runs)} finished runs under {', '.join(map(str, roots))}. `settings` = the config "
            "keys that differ between runs of the same stage; `accuracy` = "
            f"`{REWARD_KEY}`, `KL/seq` = `{KL_KEY}` (KL to the parent per response).",
            "",
            render_markdown(header, md_rows),
            "",
            *(f"![{f.stem}]({f.name})" for f in files),
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{prefix}compare.md").write_text(markdown)
    return Report(render_terminal(header, rows), markdown, [out / f"{prefix}compare.md", *files],
                  [r.label for r in missing])  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--runs", action="append", required=True,
                        help="runs dir to read recursively (repeatable), e.g. runs/toy")  # fmt: skip
    parser.add_argument("--out", help="where compare.md and the PNGs go (default: <runs>/_compare)")
    parser.add_argument("--stage", action="append", default=[],
                        help="only these stages (repeatable), e.g. --stage dpo --stage ppo")  # fmt: skip
    parser.add_argument("--title", help="plot/table title (default: the experiment names)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else Path(args.runs[0]) / "_compare"
    try:
        report = compare(args.runs, out, stages=args.stage, title=args.title)
    except CompareError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(report.table)
    if report.missing_frontier:
        print(
            f"\nnot on the frontier (no {REWARD_KEY} / {KL_KEY} in their manifests): "
            + ", ".join(report.missing_frontier)
        )
    print("\nwrote " + ", ".join(map(str, report.files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
