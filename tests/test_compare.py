"""`make compare` / `make frontier`: tables and plots from run dirs' manifests (no W&B).

Synthetic run dirs (manifest.json + DONE, as the stages write them) stand in for trained runs
here; tests/test_sweep.py runs compare on real ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from stages import compare as cmp
from stages import frontier
from stages.compare import KL_KEY, REWARD_KEY, CompareError, compare, find_runs, frontier_points
from stages.core.handoff import DONE, MANIFEST

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(
    root: Path,
    rel: str,
    *,
    stage: str,
    stage_cfg: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    group: str | None = None,
    done: bool = True,
    extra_cfg: dict[str, Any] | None = None,
) -> Path:
    run_dir = root / rel
    run_dir.mkdir(parents=True, exist_ok=True)
    experiment = rel.split("/")[0]
    manifest = {
        "stage": stage,
        "experiment": experiment,
        "variant": "/".join(rel.split("/")[2:]) or None,
        "parent": None
        if stage == "sft"
        else {"stage": "sft", "run_dir": f"runs/{experiment}/sft", "manifest_sha256": "x"},
        "kind": "full",
        "config": {
            "stage": {"name": stage, "learning_rate": 1e-4, **(stage_cfg or {})},
            "tracking": {"group": group, "tags": []},
            "paths": {"variant": "/".join(rel.split("/")[2:])},
            "seed": 42,
            **(extra_cfg or {}),
        },
        "metrics": metrics or {},
        "timings": {"seconds": 12.5},
        "world_size": 1,
    }
    (run_dir / MANIFEST).write_text(json.dumps(manifest))
    if done:
        (run_dir / DONE).write_text("ok\n")
    return run_dir


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """An experiment with an SFT parent, a DPO beta sweep, a PPO kl sweep and some noise."""
    root = tmp_path / "runs"
    _write_run(root, "toy/sft", stage="sft", metrics={REWARD_KEY: 0.40, "train/loss_first": 3.0})
    for beta, kl, acc in [(0.03, 9.0, 0.80), (0.1, 4.0, 0.74), (1.0, 0.5, 0.50)]:
        _write_run(
            root, f"toy/dpo/stage.beta={beta}", stage="dpo", stage_cfg={"beta": beta},
            metrics={REWARD_KEY: acc, KL_KEY: kl}, group="toy-frontier",
        )  # fmt: skip
    for coef, kl, acc in [(0.05, 6.0, 0.70), (0.3, 1.0, 0.55)]:
        _write_run(
            root, f"toy/ppo/stage.kl_coef={coef}", stage="ppo", stage_cfg={"kl_coef": coef},
            metrics={REWARD_KEY: acc, KL_KEY: kl}, group="toy-frontier",
        )  # fmt: skip
    # A plain `make dpo` run (another group), a PPO run without the KL metric, and a crashed
    # run without DONE (never shown).
    _write_run(root, "toy/dpo", stage="dpo", stage_cfg={"beta": 0.1},
               metrics={REWARD_KEY: 0.7, KL_KEY: 3.0}, group=None)  # fmt: skip
    _write_run(root, "toy/ppo/old", stage="ppo", stage_cfg={"kl_coef": 0.2},
               metrics={REWARD_KEY: 0.6}, group="toy-frontier")  # fmt: skip
    _write_run(root, "toy/dpo/crashed", stage="dpo", metrics={REWARD_KEY: 0.99}, done=False)
    return root


def test_find_runs_reads_stage_dirs_and_sweep_variants(runs: Path) -> None:
    found = find_runs([runs / "toy"])
    labels = {r.label for r in found}
    assert labels == {
        "sft", "dpo", "dpo/stage.beta=0.03", "dpo/stage.beta=0.1", "dpo/stage.beta=1.0",
        "ppo/stage.kl_coef=0.05", "ppo/stage.kl_coef=0.3", "ppo/old",
    }  # fmt: skip
    settings = {r.label: r.settings_label for r in found}
    assert settings["dpo/stage.beta=0.03"] == "beta=0.03"  # what varies within the stage
    assert settings["ppo/stage.kl_coef=0.3"] == "kl_coef=0.3"
    assert settings["sft"] == "-"


def test_plot_labels_name_the_varying_settings_and_stay_unique(runs: Path) -> None:
    found = find_runs([runs / "toy"])
    labels = dict(zip((r.label for r in found), cmp.plot_labels(found)))
    assert labels["dpo/stage.beta=0.03"] == "dpo: beta=0.03"
    assert labels["sft"] == "sft"  # nothing varies: its path
    # `make dpo` and the sweep job with the same beta: the settings do not tell them apart.
    assert labels["dpo"] == "dpo" and labels["dpo/stage.beta=0.1"] == "dpo/stage.beta=0.1"


def test_frontier_points_split_by_method_and_report_missing_metrics(runs: Path) -> None:
    points, missing = frontier_points(find_runs([runs / "toy"]))
    assert sorted((p.method, p.kl, p.reward) for p in points) == [
        ("DPO", 0.5, 0.5), ("DPO", 3.0, 0.7), ("DPO", 4.0, 0.74), ("DPO", 9.0, 0.8),
        ("PPO", 1.0, 0.55), ("PPO", 6.0, 0.7),
    ]  # fmt: skip
    assert [r.label for r in missing] == ["ppo/old"]


def test_frontier_plot_marks_dpo_and_ppo_apart(runs: Path) -> None:
    fig = cmp.frontier_figure(find_runs([runs / "toy"]), "t")
    assert fig is not None
    ax = fig.axes[0]
    series = {c.get_label(): c for c in ax.collections}
    dpo, ppo = series["DPO runs"], series["PPO runs"]
    assert sorted(map(tuple, dpo.get_offsets().tolist())) == [
        (0.5, 0.5),
        (3.0, 0.7),
        (4.0, 0.74),
        (9.0, 0.8),
    ]
    assert sorted(map(tuple, ppo.get_offsets().tolist())) == [(1.0, 0.55), (6.0, 0.7)]
    # Different marker shapes and colours.
    assert dpo.get_paths()[0].vertices.tolist() != ppo.get_paths()[0].vertices.tolist()
    assert dpo.get_facecolor().tolist() != ppo.get_facecolor().tolist()
    # The SFT parent sits at KL 0 as the reference.
    ref = next(c for label, c in series.items() if label.startswith("SFT reference"))
    assert ref.get_offsets().tolist() == [[0.0, 0.4]]
    assert "KL" in ax.get_xlabel() and "accuracy" in ax.get_ylabel()


def test_compare_writes_a_markdown_table_and_pngs(runs: Path, tmp_path: Path) -> None:
    report = compare([runs / "toy"], tmp_path / "out")
    assert {p.name for p in report.files} == {"compare.md", "frontier.png", "accuracy.png"}
    for path in report.files:
        assert path.is_file()
        if path.suffix == ".png":
            assert path.read_bytes()[:8] == PNG_MAGIC
    md = (tmp_path / "out" / "compare.md").read_text()
    assert md.count("\n| ") == 2 + 8  # header + alignment + one row per finished run
    assert "| dpo/stage.beta=0.03 | dpo | full | beta=0.03 | 0.8 | - | 9 |" in md  # no vs acc
    assert "crashed" not in md and "crashed" not in report.table
    assert report.missing_frontier == ["ppo/old"]


def test_compare_stage_filter(runs: Path, tmp_path: Path) -> None:
    report = compare([runs / "toy"], tmp_path / "out", stages=["ppo"])
    assert "beta" not in report.table and "kl_coef=0.05" in report.table
    with pytest.raises(CompareError, match="no finished runs of stage"):
        compare([runs / "toy"], tmp_path / "out", stages=["rm"])


def test_compare_cli_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert cmp.main(["--runs", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cmp.main(["--runs", str(tmp_path / "empty")]) == 2
    assert "no finished runs" in capsys.readouterr().err


def test_compare_cli_prints_the_table_and_writes_next_to_the_runs(runs: Path, capsys) -> None:
    assert cmp.main(["--runs", str(runs / "toy")]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "stage.beta=0.03" in out and "not on the frontier" in out
    assert (runs / "toy" / "_compare" / "frontier.png").is_file()
    # Its own output dir is never read back as a run.
    assert len(find_runs([runs / "toy"])) == 8


# ------------------------------------------------------------------------------ frontier


def test_frontier_uses_only_its_own_group_and_the_sft_parent(runs: Path, tmp_path: Path) -> None:
    chosen = frontier.select(find_runs([runs / "toy"]), "toy")
    # Not the plain `make dpo` run: it belongs to another W&B group.
    assert sorted(r.label for r in chosen) == [
        "dpo/stage.beta=0.03", "dpo/stage.beta=0.1", "dpo/stage.beta=1.0",
        "ppo/old", "ppo/stage.kl_coef=0.05", "ppo/stage.kl_coef=0.3", "sft",
    ]  # fmt: skip
    png, md, table = frontier.write_frontier(runs, "toy", tmp_path / "docs")
    assert png.read_bytes()[:8] == PNG_MAGIC
    text = md.read_text()
    assert "![reward-KL frontier](frontier.png)" in text
    assert "| SFT (reference) | - | sft | 0 | 0.400 |" in table
    assert "| DPO | beta=0.03 | dpo/stage.beta=0.03 | 9.000 | 0.800 |" in table
    assert "| PPO | kl_coef=0.3 | ppo/stage.kl_coef=0.3 | 1.000 | 0.550 |" in table


def test_frontier_writes_under_runs_unless_told_out_docs(
    runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # a checkout's docs/ would be tmp_path/docs
    assert frontier.main(["--plot-only", "--runs-root", str(runs)]) == 0
    out_dir = runs / "toy" / "_frontier"
    assert (out_dir / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert (out_dir / "frontier.md").is_file()
    assert not (tmp_path / "docs").exists()
    assert f"wrote {out_dir / 'frontier.png'}" in capsys.readouterr().out
    assert len(find_runs([runs / "toy"])) == 8  # its output is never read back as a run
    # Asked for explicitly, it regenerates the committed docs/ copy.
    assert frontier.main(["--plot-only", "--runs-root", str(runs), "--out", "docs"]) == 0
    assert (tmp_path / "docs" / "frontier.png").read_bytes()[:8] == PNG_MAGIC
    assert 'ARGS="--out docs"' in (tmp_path / "docs" / "frontier.md").read_text()


def test_frontier_without_points_says_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    _write_run(root, "toy/sft", stage="sft", metrics={REWARD_KEY: 0.4})
    _write_run(root, "toy/dpo/x", stage="dpo", metrics={REWARD_KEY: 0.5}, group="toy-frontier")
    with pytest.raises(CompareError, match=r"dpo/x lack eval/accuracy / compare/kl_per_sequence"):
        frontier.write_frontier(root, "toy", tmp_path / "docs")


def test_frontier_commands_are_the_documented_cli() -> None:
    cmds = frontier.commands(
        "toy", ["dpo", "ppo"], common=["paths.runs_root=r"], betas="0.1,0.3",
        per_stage={"dpo": ["stage.max_steps=5"]},
    )  # fmt: skip
    tails = [c[1:] for c in cmds]
    assert all(c[0] == sys.executable for c in cmds)
    assert tails == [
        ["-m", "stages", "stage=sft", "experiment=toy", "paths.runs_root=r"],
        ["-m", "stages", "-m", "+sweep=dpo_beta", "experiment=toy", "paths.runs_root=r",
         "tracking.group=toy-frontier", "stage.beta=0.1,0.3", "stage.max_steps=5"],
        ["-m", "stages", "stage=rm", "experiment=toy", "paths.runs_root=r"],
        ["-m", "stages", "-m", "+sweep=ppo_kl", "experiment=toy", "paths.runs_root=r",
         "tracking.group=toy-frontier"],
    ]  # fmt: skip


def test_frontier_dry_run_prints_without_running(capsys, tmp_path: Path) -> None:
    assert frontier.main(["--dry-run", "--methods", "dpo", "--runs-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "+ python -m stages stage=sft experiment=toy" in out
    assert "+sweep=dpo_beta" in out and "+sweep=ppo_kl" not in out
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------- readable with 20 runs

LONG_PATH = "/datasets/preferences/ultrafeedback_binarized_cleaned_{}_prefs.jsonl"


@pytest.fixture
def twenty_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """20 finished runs: a 4 x 3 DPO grid over beta and learning rate and 8 PPO runs over
    kl_coef and a data file with a long path, sweep-style dirs, each with a loss curve."""
    root = tmp_path / "runs"
    _write_run(root, "toy/sft", stage="sft", metrics={REWARD_KEY: 0.40})
    curves: dict[str, list[tuple[int, float]]] = {}
    n = 0
    for beta in (0.01, 0.03, 0.1, 0.3):
        for lr in (1e-5, 3e-5, 1e-4):
            rel = f"toy/dpo/stage.beta={beta},stage.learning_rate={lr}"
            _write_run(root, rel, stage="dpo", stage_cfg={"beta": beta, "learning_rate": lr},
                       metrics={REWARD_KEY: 0.9 + beta / 10, KL_KEY: 0.75},
                       group="toy-frontier")  # fmt: skip
            curves[rel] = [(step, 2.0 - step / 100 - n / 50) for step in range(0, 120, 20)]
            n += 1
    for coef in (0.05, 0.2, 1.0, 3.0):
        for split in ("train", "train_gen"):
            rel = f"toy/ppo/data.pairs.path={split},stage.kl_coef={coef}"
            _write_run(root, rel, stage="ppo", stage_cfg={"kl_coef": coef},
                       extra_cfg={"data": {"pairs": {"path": LONG_PATH.format(split)}}},
                       metrics={REWARD_KEY: 0.6 + coef / 10, KL_KEY: 3.2 / (1 + coef)},
                       group="toy-frontier")  # fmt: skip
            curves[rel] = [(step, 1.0 - step / 200 - n / 80) for step in range(0, 120, 20)]
            n += 1
    assert n == 20
    by_dir = {(root / rel).resolve(): curve for rel, curve in curves.items()}
    # The curves as the last checkpoint's trainer_state.json would give them (read back from
    # real run dirs in tests/test_sweep.py); here only the plot is under test.
    monkeypatch.setattr(cmp, "loss_history", lambda run: by_dir.get(run.path, []))
    return root


def _drawn_texts(fig: Any) -> list[Any]:
    """Every non-empty text the renderer draws: titles, axis and tick labels (ticks inside
    the view only), annotations, legend entries."""
    from matplotlib.text import Text

    texts = []
    for text in fig.findobj(match=Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        texts.append(text)
    drawn_ticks = set()
    for ax in fig.axes:
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = min(low, high), max(low, high)
            for tick in axis.get_major_ticks():
                if low - 1e-9 <= tick.get_loc() <= high + 1e-9:
                    drawn_ticks.add(id(tick.label1))
        tick_texts = {id(t) for t in ax.xaxis.get_ticklabels() + ax.yaxis.get_ticklabels()}
        tick_texts |= {
            id(t.label1) for t in ax.xaxis.get_major_ticks() + ax.yaxis.get_major_ticks()
        }
        texts = [t for t in texts if id(t) not in tick_texts or id(t) in drawn_ticks]
    return texts


def _assert_readable(fig: Any, name: str) -> None:
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox.padded(0.5)
    texts = _drawn_texts(fig)
    assert texts, name
    for text in texts:
        box = Text.get_window_extent(text, renderer)
        assert figure_box.contains(box.x0, box.y0) and figure_box.contains(box.x1, box.y1), (
            f"{name}: {text.get_text()!r} at {box.extents} is outside the figure {fig.bbox.extents}"
        )
    # Whatever the renderer draws (lines, bars, legends too) fits the figure.
    tight = fig.get_tightbbox(renderer)
    width, height = fig.get_size_inches()
    assert tight.x0 >= -0.01 and tight.y0 >= -0.01, (name, tight)
    assert tight.x1 <= width + 0.01 and tight.y1 <= height + 0.01, (name, tight)


def _assert_disjoint(boxes: list[tuple[str, Any]], name: str) -> None:
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            assert not box_a.overlaps(box_b), f"{name}: {a!r} overlaps {b!r}"


def test_twenty_runs_give_readable_plots(twenty_runs: Path, tmp_path: Path) -> None:
    from matplotlib.text import Text

    report = compare([twenty_runs / "toy"], tmp_path / "out")
    assert {p.name for p in report.files} == {
        "compare.md", "frontier.png", "accuracy.png", "loss.png",
    }  # fmt: skip
    for path in report.files[1:]:
        assert path.read_bytes()[:8] == PNG_MAGIC

    runs = find_runs([twenty_runs / "toy"])
    assert len(runs) == 21
    labels = cmp.plot_labels(runs)
    assert len(set(labels)) == 21  # every run told apart
    wanted = "ppo: data.pairs.path=" + LONG_PATH.format("train_gen") + ","
    assert sum(label.startswith(wanted) for label in labels) == 4  # the long value whole

    accuracy = cmp.accuracy_figure(runs, "Held-out accuracy: toy")
    _assert_readable(accuracy, "accuracy")
    renderer = accuracy.canvas.get_renderer()
    ticks = [t for t in accuracy.axes[0].get_yticklabels() if t.get_text()]
    assert len(ticks) == 21
    _assert_disjoint([(t.get_text(), t.get_window_extent(renderer)) for t in ticks], "accuracy")

    frontier_fig = cmp.frontier_figure(runs, "Reward-KL frontier: toy")
    _assert_readable(frontier_fig, "frontier")
    renderer = frontier_fig.canvas.get_renderer()
    ax = frontier_fig.axes[0]
    assert len(ax.texts) == 20  # one label per DPO/PPO point, 12 of them at one spot
    point_labels = [(t.get_text(), Text.get_window_extent(t, renderer)) for t in ax.texts]
    _assert_disjoint(point_labels, "frontier")
    axes_box = ax.get_window_extent(renderer)
    legend_box = ax.get_legend().get_window_extent(renderer)
    assert not legend_box.overlaps(axes_box)  # the legend hides no point
    for text, box in point_labels:
        assert axes_box.contains(box.x0, box.y0) and axes_box.contains(box.x1, box.y1), text

    loss = cmp.loss_figure(runs, "toy")
    _assert_readable(loss, "loss")
    renderer = loss.canvas.get_renderer()
    for ax in loss.axes:
        entries = ax.get_legend().get_texts()
        assert len(entries) in (12, 8)
        assert (
            not ax.get_legend().get_window_extent(renderer).overlaps(ax.get_window_extent(renderer))
        )
        _assert_disjoint(
            [(t.get_text(), t.get_window_extent(renderer)) for t in entries], "loss legend"
        )


def test_the_terminal_table_never_cuts_the_varying_settings(twenty_runs: Path, capsys) -> None:
    assert cmp.main(["--runs", str(twenty_runs / "toy")]) == 0
    table = capsys.readouterr().out.split("\n\nwrote ")[0]
    lines = table.splitlines()
    for split in ("train", "train_gen"):
        item = "data.pairs.path=" + LONG_PATH.format(split)
        assert sum(item in line for line in lines) == 4  # one per kl_coef, whole
    for beta in (0.01, 0.03, 0.1, 0.3):
        for lr in ("1e-05", "3e-05", "0.0001"):
            assert any(f"beta={beta}" in line and f"learning_rate={lr}" in line for line in lines)
    # The settings column (between its header and the next one's) is never cut.
    header = lines[0]
    assert header.split()[:4] == ["run", "stage", "kind", "settings"]
    start, end = header.index("settings"), header.index("accuracy")
    assert not any("…" in line[start:end] for line in lines)
    assert len(lines) > 2 + 21  # the long settings wrapped onto continuation lines
