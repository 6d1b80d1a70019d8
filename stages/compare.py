"""`make compare`: one table and PNG plots across finished runs, read from their manifests.

    python -m stages.compare --runs runs/toy                # every stage and sweep job of toy
    python -m stages.compare --runs runs/toy --runs runs/toy_lora --out docs/compare

Owns reading run dirs back (recursively: ``runs/<exp>/<stage>/`` and sweep jobs'
``runs/<exp>/<stage>/<variant>/``), the comparison table (terminal + Markdown), and the
plots: held-out accuracy per run, training-loss curves (from the last checkpoint's
``trainer_state.json``) and the **reward-KL frontier**: true reward of the toy task (the rule
judge's held-out accuracy) against KL to the SFT reference, one point per policy run (DPO,
PPO, KTO, GRPO, RLOO; one per round of an iterative DPO run), in the style of Fig. 2 of the
DPO paper, or with a proxy reward per run (`stages.proxy_reward`) on the y axis instead.
Nothing here needs W&B, a network or a GPU.

The metric keys are defined once, below: stages write them into their manifests (every
policy stage through ``stages.core.comparison.compare_with_parent``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stages.core import handoff
from stages.registry import STAGES

# The frontier's axes. REWARD_KEY: greedy held-out accuracy by the toy task's rule judge (the
# "true reward" the preference stages are trying to raise). KL_KEY: Monte-Carlo
# KL(policy || SFT parent) summed over response tokens, on the policy's own samples at T=1:
# the sequence-level KL that the RLHF objective (PPO's penalty, DPO's implicit constraint)
# trades reward against. Both come from compare_with_parent with prefix "compare".
REWARD_KEY = "eval/accuracy"
KL_KEY = "compare/kl_per_sequence"
KL_PER_TOKEN_KEY = "compare/kl_per_token"
# Stages plotted on the frontier: (legend name, marker, colour) from each stage's registry
# entry (StageSpec.frontier), so the methods read apart and a new stage needs no edit here.
FRONTIER_STAGES = {spec.name: spec.frontier for spec in STAGES if spec.frontier is not None}
REFERENCE_STAGE = "sft"
# The eval stage's runs compare a target with its parent or the base (stage.against): their
# row says so ("dpo vs base"), their accuracy is the target's, and they are never a policy on
# the frontier (FRONTIER_STAGES has no eval). PARENT_ACCURACY_KEY: what a run was compared
# with (a policy stage's parent; an eval's parent, base or few-shot base).
EVAL_STAGE = "eval"
PARENT_ACCURACY_KEY = "compare/parent_accuracy"
FORGETTING_KEY = "forgetting/sft_replies"
TARGET_ACCURACY_KEY = "compare/policy_accuracy"

# Table columns after run/stage/kind/settings: (header, metric key in the manifest).
METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("accuracy", REWARD_KEY),
    ("vs acc", PARENT_ACCURACY_KEY),
    ("KL/seq", KL_KEY),
    ("KL/tok", KL_PER_TOKEN_KEY),
    ("win rate", "compare/win_rate"),
    # Forgetting (stages.core.forgetting): log-likelihood per token the run lost, against its
    # parent, on the SFT's held-out replies (> 0 = forgotten); works on any data.
    ("forgot/tok", FORGETTING_KEY),
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
    "_frontier",
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
        return _metric(self.metrics, key)

    @property
    def stage_label(self) -> str:
        """The table's stage cell: an eval run names what it compared, e.g. "dpo vs base"."""
        if self.stage != EVAL_STAGE:
            return self.stage
        target = (self.manifest.get("target") or {}).get("stage") or "?"
        compared = self.manifest.get("compared_with") or {}
        against = compared.get("against", "parent")
        if against == "parent":
            other = compared.get("stage") or "parent"
        elif against == "base_fewshot":
            other = f"base {compared.get('num_shots', '?')}-shot"
        else:
            other = "base"
        return f"{target} vs {other}"

    def table_metric(self, key: str) -> float | None:
        """``metric(key)``; an eval run's accuracy is its target's, measured by that eval."""
        if key == REWARD_KEY and self.stage == EVAL_STAGE:
            return self.metric(TARGET_ACCURACY_KEY)
        return self.metric(key)

    @property
    def seconds(self) -> float | None:
        return (self.manifest.get("timings") or {}).get("seconds")

    @property
    def setting_items(self) -> list[str]:
        """``key=value`` per varying setting, whole: never cut, only wrapped between items."""
        return [f"{_short(k)}={_fmt(v)}" for k, v in self.settings.items()]

    @property
    def settings_label(self) -> str:
        return ", ".join(self.setting_items) or "-"


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


def fill_settings(runs: Sequence[Run], group_by: Callable[[Run], Any] | None = None) -> None:
    """Per stage (or per ``group_by(run)``), the config keys whose values differ between its
    runs (what a sweep swept, or what differs between the experiments compared). Call again on
    a subset to label the runs by what differs within that subset only."""
    by_stage: dict[Any, list[Run]] = {}
    for run in runs:
        by_stage.setdefault(group_by(run) if group_by else run.stage, []).append(run)
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


def wrap_items(items: Sequence[str], width: int) -> list[str]:
    """``items`` joined by ", " into lines of at most ``width`` characters, breaking only
    between items (an item longer than ``width`` gets a line of its own, whole)."""
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= width:
            lines[-1] += f", {item}"
        else:
            if lines:
                lines[-1] += ","
            lines.append(item)
    return lines or ["-"]


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


# Terminal table: the run path is cut in the middle past this width (the settings column
# says what differs); the settings wrap between items past theirs, but are never cut.
TERMINAL_RUN_WIDTH = 40
TERMINAL_SETTINGS_WIDTH = 48


def table_rows(
    runs: Sequence[Run], *, full_labels: bool = False
) -> tuple[list[str], list[list[str]]]:
    """One row per run. ``full_labels`` (Markdown): whole run paths and settings on one line.
    Else (terminal): run paths cut to TERMINAL_RUN_WIDTH, and the settings, whole, wrapped
    onto several lines of the cell (``\n``) past TERMINAL_SETTINGS_WIDTH."""
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
                run.label if full_labels else _middle_cut(run.label, TERMINAL_RUN_WIDTH),
                run.stage_label,
                str(run.manifest.get("kind", "-")),
                run.settings_label
                if full_labels
                else "\n".join(wrap_items(run.setting_items, TERMINAL_SETTINGS_WIDTH)),
                *(_fmt(run.table_metric(key)) for _, key in METRIC_COLUMNS),
                _fmt(run.manifest.get("world_size", 1)),
                _fmt(run.seconds),
            ]
        )
    return header, rows


def render_terminal(header: list[str], rows: list[list[str]]) -> str:
    """Aligned columns; a cell with line breaks continues on the following lines."""
    split = [[cell.split("\n") for cell in row] for row in [header, *rows]]
    widths = [max(len(line) for row in split for line in row[i]) for i in range(len(header))]
    numeric = [i >= 4 for i in range(len(header))]

    def lines(cells: list[list[str]]) -> list[str]:
        height = max(map(len, cells))
        return [
            "  ".join(
                (c[k] if k < len(c) else "").rjust(w)
                if num
                else (c[k] if k < len(c) else "").ljust(w)
                for c, w, num in zip(cells, widths, numeric)
            ).rstrip()
            for k in range(height)
        ]

    body = [line for row in split[1:] for line in lines(row)]
    return "\n".join([*lines(split[0]), "  ".join("-" * w for w in widths), *body])


def render_markdown(header: list[str], rows: list[list[str]], *, text_columns: int = 4) -> str:
    """A GitHub Markdown table; the first ``text_columns`` are left-aligned, the rest right."""

    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    align = ["---" if i < text_columns else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(map(esc, header)) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- plots


# Variants of a stage on the frontier, read apart from its plain runs by a hollow marker of
# the stage's colour: a policy trained on this experiment's reward model instead of the task's
# rule judge (GRPO/RLOO `stage.reward=rm`), and iterative DPO, whose rounds are joined by a line.
RM_REWARD_SUFFIX = " (RM reward)"
ITERATIVE_PREFIX = "iterative "
# Iterative DPO's per-round metrics: a list of {"round", REWARD_KEY, KL_KEY, ...}. The stage
# records it as a manifest extra, which StageRun.finish writes at the top of the manifest.
ROUNDS_KEY = "rounds"


@dataclass(frozen=True)
class FrontierPoint:
    method: str  # legend name: DPO | PPO | KTO | GRPO | GRPO (RM reward) | iterative DPO ...
    label: str  # the run's varying settings, e.g. "beta=0.1", or "round 2"
    kl: float
    reward: float
    run: str
    setting_items: tuple[str, ...] = ()  # the label's parts, to wrap it between settings
    marker: str = "o"
    colour: str = "tab:gray"
    filled: bool = True  # False: a variant of the stage (hollow marker of its colour)
    series: str | None = None  # points of one run joined by a line (iterative DPO's rounds)
    proxy: float | None = None  # mean RM score of the run's greedy held-out replies


def run_rounds(run: Run) -> list[dict[str, Any]]:
    """Iterative DPO's per-round metrics from the manifest ([] for a one-round run)."""
    rounds = run.manifest.get(ROUNDS_KEY)
    if not isinstance(rounds, list) or len(rounds) < 2:
        return []
    return [r for r in rounds if isinstance(r, dict)]


def frontier_style(run: Run) -> tuple[str, str, str, bool] | None:
    """(legend name, marker, colour, filled) of a run on the frontier; None for a stage that
    is not plotted there (SFT, RM, eval)."""
    style = FRONTIER_STAGES.get(run.stage)
    if style is None:
        return None
    name, marker, colour = style
    if run_rounds(run):
        return f"{ITERATIVE_PREFIX}{name}", marker, colour, False
    stage_cfg = (run.manifest.get("config") or {}).get("stage") or {}
    if stage_cfg.get("reward") == "rm":
        return f"{name}{RM_REWARD_SUFFIX}", marker, colour, False
    return name, marker, colour, True


def frontier_method(run: Run) -> str | None:
    """The run's legend name on the frontier (None when not plotted there)."""
    style = frontier_style(run)
    return style[0] if style else None


def method_order() -> list[str]:
    """Legend order: stages as the registry lists them, each followed by its variants."""
    return [
        name + suffix
        for name, _, _ in FRONTIER_STAGES.values()
        for name, suffix in ((name, ""), (name, RM_REWARD_SUFFIX), (ITERATIVE_PREFIX + name, ""))
    ]


def _metric(values: Mapping[str, Any], key: str) -> float | None:
    """A finite number under ``key`` (a manifest's metrics, or one round's record), else None."""
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if math.isnan(float(value)) else float(value)


def frontier_points(
    runs: Sequence[Run], proxy: Mapping[Path, float] | None = None
) -> tuple[list[FrontierPoint], list[Run]]:
    """(points, runs of a frontier stage that lack REWARD_KEY or KL_KEY).

    One point per run; an iterative DPO run gives one per round (``label`` "round k",
    ``series`` = the run), the last round carrying the run's proxy reward (its
    eval_samples.jsonl are the last round's replies). ``proxy``: run dir -> proxy reward."""
    proxy = proxy or {}
    points, missing = [], []
    for run in runs:
        style = frontier_style(run)
        if style is None:
            continue
        method, marker, colour, filled = style
        look = {"marker": marker, "colour": colour, "filled": filled}
        rounds = run_rounds(run)
        if rounds:
            measured = [
                (r.get("round", i), _metric(r, KL_KEY), _metric(r, REWARD_KEY))
                for i, r in enumerate(rounds, 1)
            ]
            measured = [(n, kl, reward) for n, kl, reward in measured if None not in (kl, reward)]
            if not measured:
                missing.append(run)
            for i, (n, kl, reward) in enumerate(measured):
                last = i == len(measured) - 1
                points.append(
                    FrontierPoint(
                        method, f"round {n}", kl, reward, run.label, (f"round {n}",),
                        series=run.label, proxy=proxy.get(run.path) if last else None, **look,
                    )
                )  # fmt: skip
            continue
        kl, reward = run.metric(KL_KEY), run.metric(REWARD_KEY)
        if kl is None or reward is None:
            missing.append(run)
            continue
        points.append(
            FrontierPoint(
                method, run.settings_label, kl, reward, run.label, tuple(run.setting_items),
                proxy=proxy.get(run.path), **look,
            )
        )  # fmt: skip
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


def reference_runs(runs: Sequence[Run]) -> list[Run]:
    """The SFT runs that plotted runs descend from: KL 0 by definition."""
    plotted = [run for run in runs if run.stage in FRONTIER_STAGES]
    return [r for r in runs if r.stage == REFERENCE_STAGE and is_parent_of_any(r, plotted)]


def reference_points(runs: Sequence[Run]) -> list[tuple[str, float]]:
    """(label, accuracy) of the SFT runs that plotted runs descend from."""
    return [
        (run.label, accuracy)
        for run in reference_runs(runs)
        if (accuracy := run.metric(REWARD_KEY)) is not None
    ]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


# Plot text sizes and the room they take, in inches, to size figures for any number of runs:
# constrained layout then fits every label inside the figure.
LABEL_FONTSIZE = 7
_CHAR_WIDTH_IN = 0.062  # a generous average glyph width at LABEL_FONTSIZE
_LINE_HEIGHT_IN = 0.14  # one line of text at LABEL_FONTSIZE, with spacing
PLOT_LABEL_WIDTH = 40  # characters per line of a run's plot label before it wraps


def plot_labels(runs: Sequence[Run]) -> list[str]:
    """A short, unique label per run for plots: its stage and the settings that vary (wrapped
    between settings), or its run path when it has none or they do not tell runs apart."""
    labels = [
        f"{run.stage}: " + "\n".join(wrap_items(run.setting_items, PLOT_LABEL_WIDTH))
        if run.settings
        else run.label
        for run in runs
    ]
    return [
        "\n".join(wrap_items(run.label.split(","), PLOT_LABEL_WIDTH))
        if labels.count(label) > 1
        else label
        for run, label in zip(runs, labels)
    ]


def _text_size(labels: Sequence[str]) -> tuple[float, int]:
    """(width in inches of the widest line, most lines) of ``labels`` at LABEL_FONTSIZE."""
    lines = [line for label in labels for line in label.split("\n")] or [""]
    return (
        max(map(len, lines)) * _CHAR_WIDTH_IN,
        max((label.count("\n") + 1 for label in labels), default=1),
    )


def _outside_legend(ax: Any, **kwargs: Any) -> Any:
    # Right of the axes, where it hides no data; constrained layout makes room for it.
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0,
                     fontsize=LABEL_FONTSIZE, **kwargs)  # fmt: skip


# Where a point's label may go, in points from the point (nearest first): beside it, then
# in columns to its right and left, so coinciding points get stacked labels.
_LABEL_OFFSETS = sorted(
    ((dx, dy) for dx in (8, -8, 24, -24, 48, -48, 80, -80, 120, -120)
     for dy in range(-150, 151, 10)),
    key=lambda d: (abs(d[0]) + 2 * abs(d[1]), d[0] < 0, d[1] < 0),
)  # fmt: skip


def _place_point_labels(fig: Any, ax: Any, items: Sequence[tuple[float, float, str, str]]) -> bool:
    """Annotate each (x, y, text, colour) point so that no two labels overlap each other or a
    marker, and every label stays inside the axes: the first free position of
    _LABEL_OFFSETS (with a leader line when away from the point), measured with the
    renderer. The layout is frozen first, so the positions measured are the ones saved.
    Returns whether every label found such a place (else some sit where they overlap least).
    """
    import numpy as np

    fig.canvas.draw()
    fig.set_layout_engine("none")
    renderer = fig.canvas.get_renderer()
    inside = np.array(ax.get_window_extent(renderer).padded(-2).extents)
    pixels_per_point = fig.dpi / 72
    marker = 5 * pixels_per_point  # half a marker
    pixels = ax.transData.transform([(x, y) for x, y, _, _ in items])
    # Boxes as rows of (x0, y0, x1, y1) pixels: the markers, then each label placed.
    taken = np.concatenate([pixels - marker, pixels + marker], axis=1)
    offsets = np.array(_LABEL_OFFSETS, dtype=float)
    all_free = True
    for (x, y, text, color), (px, py) in zip(items, pixels):
        probe = ax.text(0, 0, text, fontsize=LABEL_FONTSIZE)
        extent = probe.get_window_extent(renderer)
        width, height = extent.width + 2, extent.height + 2
        probe.remove()
        anchor_x = px + offsets[:, 0] * pixels_per_point
        anchor_y = py + offsets[:, 1] * pixels_per_point
        x0 = np.where(offsets[:, 0] > 0, anchor_x, anchor_x - width)
        y0 = anchor_y - height / 2
        boxes = np.stack([x0, y0, x0 + width, y0 + height], axis=1)
        outside = width * height - _overlap_areas(boxes, inside[None, :])[:, 0]
        overlap = _overlap_areas(boxes, taken).sum(axis=1)
        # Inside the axes first, then no overlap, then nearest (offsets are nearest first).
        best = int(np.lexsort((np.arange(len(boxes)), overlap.round(3), outside.round(3)))[0])
        all_free = all_free and outside[best] <= 1e-3 and overlap[best] <= 1e-3
        dx, dy = _LABEL_OFFSETS[best]
        far = abs(dx) > 10 or abs(dy) > 10
        ax.annotate(
            text, (x, y), xytext=(dx, dy), textcoords="offset points",
            fontsize=LABEL_FONTSIZE, color=color, va="center", ha="left" if dx > 0 else "right",
            arrowprops={"arrowstyle": "-", "color": color, "lw": 0.5, "alpha": 0.6,
                        "shrinkA": 0, "shrinkB": 4} if far else None,
        )  # fmt: skip
        taken = np.concatenate([taken, boxes[best : best + 1]])
    return all_free


def _overlap_areas(a: Any, b: Any) -> Any:
    """Pairwise overlap areas of boxes ``a`` [n, 4] and ``b`` [m, 4] (x0, y0, x1, y1): [n, m]."""
    import numpy as np

    width = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    height = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    return np.clip(width, 0, None) * np.clip(height, 0, None)


TRUE_REWARD_AXIS = "true reward: held-out accuracy\n(rule judge, greedy)"
PROXY_REWARD_AXIS = "proxy reward: mean RM score of the greedy\nheld-out replies (arbitrary scale)"


def frontier_figure(
    runs: Sequence[Run], title: str, *, proxy: Mapping[Path, float] | None = None
) -> Any | None:
    """The frontier as a matplotlib Figure (one scatter per method); None without points.

    y is the true reward (the judge's held-out accuracy), or with ``proxy`` (run dir -> mean
    RM score of its held-out replies) the proxy reward, for the runs that have one.
    Each point is labelled by what varies between runs, placed so that no two labels
    overlap and all stay inside the axes; when the labels do not fit (many runs, long
    settings), the points carry numbers instead and the legend outside the axes says which
    run each number is. The rounds of an iterative run are joined by a line."""
    points, _ = frontier_points(runs, proxy)
    if proxy is None:
        references = reference_points(runs)
        y_axis = TRUE_REWARD_AXIS
    else:
        points = [replace(p, reward=p.proxy) for p in points if p.proxy is not None]
        references = [(r.label, proxy[r.path]) for r in reference_runs(runs) if r.path in proxy]
        y_axis = PROXY_REWARD_AXIS
    if not points:
        return None
    fig = _frontier_figure(points, references, title, y_axis, numbered=False)
    if fig is None:
        fig = _frontier_figure(points, references, title, y_axis, numbered=True)
    return fig


def _frontier_figure(
    points: Sequence[FrontierPoint],
    references: Sequence[tuple[str, float]],
    title: str,
    y_axis: str,
    *,
    numbered: bool,
) -> Any | None:
    """The frontier figure with each point's label beside it, or (``numbered``) a number
    beside it and the label in the legend. None when the labels beside the points do not fit
    without overlapping."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    order = method_order()
    rank = {method: i for i, method in enumerate(order)}
    ordered = sorted(points, key=lambda p: (rank.get(p.method, len(order)), p.method, p.kl))
    labels = [
        "\n".join(wrap_items(p.setting_items, PLOT_LABEL_WIDTH)) if p.setting_items else p.run
        for p in ordered
    ]
    # legend name -> (marker, colour, filled), in legend order
    style = {p.method: (p.marker, p.colour, p.filled) for p in ordered}
    keys = [f"{n}  {p.method}: {label}" for n, (p, label) in enumerate(zip(ordered, labels), 1)]
    legend_labels = [f"SFT reference ({label})" for label, _ in references]
    legend_labels += keys if numbered else [f"{method} runs" for method in style]
    legend_width, _ = _text_size(legend_labels)
    label_width, _ = _text_size([] if numbered else labels)
    legend_lines = sum(label.count("\n") + 1.3 for label in legend_labels)
    fig, ax = plt.subplots(
        figsize=(6.0 + legend_width + 1.5 * label_width,
                 max(5.0, 1.2 + legend_lines * _LINE_HEIGHT_IN)),
        layout="constrained",
    )  # fmt: skip

    def look(marker: str, colour: str, filled: bool) -> dict[str, Any]:
        # A variant of a stage (RM reward, iterative): hollow, edged in the stage's colour.
        if filled:
            return {"marker": marker, "color": colour, "edgecolor": "black", "linewidth": 0.6}
        return {"marker": marker, "facecolor": "white", "edgecolor": colour, "linewidth": 1.6}

    for series in dict.fromkeys(p.series for p in points if p.series):
        mine = [p for p in points if p.series == series]  # in round order
        ax.plot([p.kl for p in mine], [p.reward for p in mine], color=mine[0].colour,
                linewidth=1.0, alpha=0.7, zorder=2)  # fmt: skip
    for method, (marker, colour, filled) in style.items():
        mine = [p for p in ordered if p.method == method]
        ax.scatter([p.kl for p in mine], [p.reward for p in mine], s=70,
                   label=f"{method} runs", zorder=3, **look(marker, colour, filled))  # fmt: skip
    for label, value in references:
        ax.scatter([0.0], [value], marker="*", s=180, color="black", zorder=4,
                   label=f"SFT reference ({label})")  # fmt: skip
    # Room around the points for their labels, and a readable span when all are (nearly) equal.
    xs = [p.kl for p in points] + [0.0] * len(references)
    ys = [p.reward for p in points] + [value for _, value in references]
    x_span = max(max(xs) - min(xs), 1e-3)
    y_span = max(max(ys) - min(ys), 0.1)
    ax.set_xlim(min(xs) - 0.08 * x_span, max(xs) + 0.3 * x_span)
    middle = (max(ys) + min(ys)) / 2
    ax.set_ylim(middle - 0.7 * y_span, middle + 0.7 * y_span)
    ax.set_xlabel("KL(policy ‖ SFT reference) per response, nats  (sampled at T=1)")
    ax.set_ylabel(y_axis)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if numbered:
        handles = [
            Line2D([], [], linestyle="none", marker="*", markersize=11, color="black")
            for _ in references
        ] + [
            Line2D([], [], linestyle="none", marker=p.marker, markersize=7,
                   color=p.colour if p.filled else "white",
                   markeredgecolor="black" if p.filled else p.colour,
                   markeredgewidth=0.6 if p.filled else 1.6)
            for p in ordered
        ]  # fmt: skip
        _outside_legend(ax, handles=handles, labels=legend_labels)
    else:
        _outside_legend(ax)
    tags = [str(n) for n in range(1, len(ordered) + 1)] if numbered else labels
    placed = _place_point_labels(
        fig, ax, [(p.kl, p.reward, tag, p.colour) for p, tag in zip(ordered, tags)]
    )
    if not placed and not numbered:
        plt.close(fig)
        return None
    return fig


def plot_frontier(
    runs: Sequence[Run], out: Path, title: str, *, proxy: Mapping[Path, float] | None = None
) -> Path | None:
    """Reward (judge accuracy, or with ``proxy`` the RM's mean score) vs KL to the SFT
    reference as a PNG; None when no run has both."""
    return _save(frontier_figure(runs, title, proxy=proxy), out)


def _save(fig: Any | None, out: Path) -> Path | None:
    if fig is None:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def accuracy_figure(runs: Sequence[Run], title: str) -> Any | None:
    """Held-out accuracy per run as horizontal bars labelled by `plot_labels`; the figure
    grows with the number of runs and the length of their labels. None without scores."""
    scored = [
        (label, run.metric(REWARD_KEY), run.stage)
        for label, run in zip(plot_labels(runs), runs)
        if run.metric(REWARD_KEY) is not None
    ]
    if not scored:
        return None
    plt = _pyplot()
    label_width, lines = _text_size([label for label, _, _ in scored])
    slot = _LINE_HEIGHT_IN * lines + 0.08  # one bar per label, with a gap
    fig, ax = plt.subplots(
        figsize=(4.5 + label_width, 1.3 + slot * len(scored)), layout="constrained"
    )
    colors = [FRONTIER_STAGES.get(stage, ("", "", "tab:gray"))[2] for _, _, stage in scored]
    positions = list(range(len(scored)))
    bars = ax.barh(positions, [acc for _, acc, _ in scored], color=colors)
    ax.set_yticks(positions, [label for label, _, _ in scored], fontsize=LABEL_FONTSIZE)
    ax.bar_label(bars, fmt="%.3f", fontsize=LABEL_FONTSIZE, padding=2)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)  # room for the value printed after a full bar
    ax.set_xticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_xlabel("held-out accuracy (rule judge, greedy)")
    ax.set_title(title)
    return fig


def plot_accuracy(runs: Sequence[Run], out: Path, title: str) -> Path | None:
    return _save(accuracy_figure(runs, title), out)


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


def loss_figure(runs: Sequence[Run], title: str) -> Any | None:
    """Training-loss curves, one panel per stage (stacked), each with its legend outside the
    axes; 20 colours before line styles repeat. None when no run has a curve."""
    curves = [(run, label, loss_history(run)) for run, label in zip(runs, plot_labels(runs))]
    curves = [(run, label, c) for run, label, c in curves if len(c) >= 2]
    if not curves:
        return None
    plt = _pyplot()
    stages = sorted({run.stage for run, _, _ in curves})
    label_width, _ = _text_size([label for _, label, _ in curves])
    heights = [
        max(2.8, 0.8 + sum(label.count("\n") + 1.4 for run, label, _ in curves
                           if run.stage == stage) * _LINE_HEIGHT_IN)
        for stage in stages
    ]  # fmt: skip
    fig, axes = plt.subplots(
        len(stages), 1, figsize=(6.0 + label_width, 0.6 + sum(heights)), squeeze=False,
        layout="constrained", gridspec_kw={"height_ratios": heights},
    )  # fmt: skip
    palette = plt.get_cmap("tab20").colors
    styles = ("-", "--", ":", "-.")
    for ax, stage in zip(axes[:, 0], stages):
        mine = [(label, curve) for run, label, curve in curves if run.stage == stage]
        for i, (label, curve) in enumerate(mine):
            ax.plot(*zip(*curve), label=label, color=palette[i % len(palette)],
                    linestyle=styles[(i // len(palette)) % len(styles)], linewidth=1.2)  # fmt: skip
        ax.set_title(f"{stage}: training loss", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        _outside_legend(ax)
    fig.suptitle(title)
    return fig


def plot_losses(runs: Sequence[Run], out: Path, title: str) -> Path | None:
    return _save(loss_figure(runs, title), out)


# ----------------------------------------------------------------------------------- CLI


@dataclass
class Report:
    table: str  # terminal rendering
    markdown: str
    files: list[Path]
    missing_frontier: list[str]  # policy runs without the frontier metrics


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
            f"`{REWARD_KEY}`, `vs acc` = `{PARENT_ACCURACY_KEY}` (the accuracy of what the run "
            f"was compared with: its parent, or for an eval row `<target> vs base` the base "
            f"model), `KL/seq` = `{KL_KEY}` (KL to the parent, or to that base, per response), "
            f"`forgot/tok` = `{FORGETTING_KEY}` (log-likelihood per token lost on the SFT's "
            "held-out replies, against the parent).",
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
