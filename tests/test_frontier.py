"""`make frontier` with every method: the commands it runs (GRPO, RLOO, iterative DPO), which
runs it plots, iterative DPO's rounds, and the proxy-reward frontier with its cache.

Run dirs are written the way the stages finish them (`handoff.finalize_stage`: metrics,
manifest, DONE with the manifest's sha256, a final/ whose files the manifest hashes), with
the eval_samples.jsonl rows the stages write; nothing is trained except in the last test,
which scores real replies with a real tiny reward model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from stages import compare as cmp
from stages import frontier, proxy_reward
from stages.compare import KL_KEY, REWARD_KEY, find_runs
from stages.core import handoff
from stages.core.schema import validate_config
from tests.conftest import CONF_DIR

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PROMPTS = ["What is 2 + 3?", "What is 40 + 2?", "What is 123 + 456?"]


def _finish(
    run_dir: Path,
    *,
    stage: str,
    experiment: str = "toy",
    stage_cfg: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    group: str | None = "toy-frontier",
    replies: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A finished run dir as StageRun.finish leaves it; ``replies``: its eval_samples.jsonl."""
    final = run_dir / handoff.FINAL
    final.mkdir(parents=True, exist_ok=True)
    (final / "model.safetensors").write_bytes(f"weights of {run_dir}".encode())
    if replies is not None:
        handoff.write_jsonl_atomic(
            run_dir / handoff.EVAL_SAMPLES,
            [{"prompt": p, "answer": 0, "reply": r, "correct": False} for p, r in zip(PROMPTS, replies)],
        )  # fmt: skip
    manifest = {
        "stage": stage,
        "experiment": experiment,
        "parent": None
        if stage == "sft"
        else {"stage": "sft", "run_dir": f"runs/{experiment}/sft", "manifest_sha256": "x"},
        "kind": "full",
        "config": {
            "stage": {"name": stage, **(stage_cfg or {})},
            "tracking": {"group": group},
            "model": {"name": "tiny", "name_or_path": "builtin:tiny"},
        },
        "final_sha256": handoff.final_file_hashes(final),
        "timings": {"seconds": 3.0},
        **(extra or {}),
    }
    handoff.finalize_stage(run_dir, manifest, metrics or {})
    return run_dir


def _round(n: int, kl: float, accuracy: float) -> dict[str, Any]:
    # A record as stages/dpo/rounds.py writes it into the manifest's "rounds".
    return {"round": n, REWARD_KEY: accuracy, KL_KEY: kl, "train_pairs": 40 + n}


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """Every method of the frontier in group toy-frontier, an RM, and runs it must not plot."""
    root = tmp_path / "runs"
    toy = root / "toy"
    _finish(toy / "sft", stage="sft", metrics={REWARD_KEY: 0.4}, group=None,
            replies=["5.", "i do not know.", "i do not know."])  # fmt: skip
    _finish(toy / "rm", stage="rm", group=None)
    for beta, kl, acc in [(0.0, 2.0, 0.95), (0.2, 0.5, 0.8)]:
        _finish(toy / f"grpo/stage.beta={beta}", stage="grpo",
                stage_cfg={"beta": beta, "reward": "task"}, metrics={REWARD_KEY: acc, KL_KEY: kl},
                replies=["5.", "42.", "579."])  # fmt: skip
    for beta, kl, acc in [(0.0, 4.0, 0.55), (0.2, 0.7, 0.85)]:
        _finish(toy / f"grpo/stage.beta={beta},stage.reward=rm", stage="grpo",
                stage_cfg={"beta": beta, "reward": "rm"}, metrics={REWARD_KEY: acc, KL_KEY: kl},
                replies=["104.", "104.", "579."])  # fmt: skip
    _finish(toy / "rloo/stage.beta=0.04", stage="rloo", stage_cfg={"beta": 0.04, "reward": "task"},
            metrics={REWARD_KEY: 0.9, KL_KEY: 1.0}, replies=["5.", "42.", "9."])  # fmt: skip
    rounds = [_round(1, 0.6, 0.8), _round(2, 1.1, 0.9), _round(3, 1.5, 0.93)]
    _finish(toy / "dpo/stage.rounds=3", stage="dpo", stage_cfg={"beta": 0.1, "rounds": 3},
            metrics={REWARD_KEY: 0.93, KL_KEY: 1.5}, replies=["5.", "42.", "579."],
            extra={"rounds": rounds})  # fmt: skip
    # Not this frontier's: a plain `make grpo` (no group), another experiment's RLOO.
    _finish(toy / "grpo", stage="grpo", stage_cfg={"beta": 0.04, "reward": "task"}, group=None,
            metrics={REWARD_KEY: 0.99, KL_KEY: 0.1}, replies=["5.", "42.", "579."])  # fmt: skip
    _finish(toy / "rloo/other", stage="rloo", experiment="toy_lora", group="toy-frontier",
            metrics={REWARD_KEY: 0.1, KL_KEY: 9.0}, replies=["1.", "1.", "1."])  # fmt: skip
    return root


class FakeRM:
    """Stands in for the RM: scores a reply by its length, counts loads and scored replies."""

    def __init__(self) -> None:
        self.loads: list[str] = []
        self.scored: list[str] = []

    def load(self, rm: handoff.ParentStage) -> proxy_reward.BatchScorer:
        self.loads.append(rm.manifest_sha256)

        def score(prompts: list[list[dict[str, str]]], replies: list[str]) -> list[float]:
            assert all(p[-1]["role"] == "user" and p[-1]["content"] in PROMPTS for p in prompts)
            self.scored += replies
            return [float(len(r)) for r in replies]

        return score


@pytest.fixture
def fake_rm(monkeypatch: pytest.MonkeyPatch) -> FakeRM:
    rm = FakeRM()
    monkeypatch.setattr(proxy_reward, "load_rm_scorer", rm.load)
    return rm


def _mean_len(replies: list[str]) -> float:
    return sum(map(len, replies)) / len(replies)


# ------------------------------------------------------------------------------ commands


def _tails(cmds: list[list[str]]) -> list[list[str]]:
    assert all(c[:3] == [sys.executable, "-m", "stages"] for c in cmds)
    return [c[3:] for c in cmds]


def test_commands_run_every_method_with_the_reward_model_first() -> None:
    tails = _tails(frontier.commands("toy", frontier.METHODS, common=["tracking=none"]))
    group = "tracking.group=toy-frontier"
    assert tails == [
        ["stage=sft", "experiment=toy", "tracking=none"],
        ["-m", "+sweep=dpo_beta", "experiment=toy", "tracking=none", group],
        ["stage=rm", "experiment=toy", "tracking=none"],
        ["-m", "+sweep=ppo_kl", "experiment=toy", "tracking=none", group],
        ["-m", "+sweep=kto_beta", "experiment=toy", "tracking=none", group],
        ["-m", "+sweep=grpo_beta", "experiment=toy", "tracking=none", group],
        ["-m", "+sweep=grpo_rm_beta", "experiment=toy", "tracking=none", group],
        ["-m", "+sweep=rloo_beta", "experiment=toy", "tracking=none", group],
        ["-m", "stage=dpo", "stage.rounds=3", "experiment=toy", "tracking=none", group],
    ]  # fmt: skip


def test_commands_make_the_reward_model_only_for_methods_that_need_it() -> None:
    tails = _tails(
        frontier.commands(
            "toy", ["grpo_rm", "rloo", "dpo_iter"], grpo_rm_betas="0.0,1.0", dpo_rounds=4,
            per_stage={"grpo": ["stage.max_steps=5"], "dpo": ["stage.beta=0.2"],
                       "rm": ["stage.max_steps=7"]},
        )
    )  # fmt: skip
    group = "tracking.group=toy-frontier"
    assert tails == [
        ["stage=sft", "experiment=toy"],
        ["stage=rm", "experiment=toy", "stage.max_steps=7"],  # before GRPO on the RM
        ["-m", "+sweep=grpo_rm_beta", "experiment=toy", group, "stage.beta=0.0,1.0",
         "stage.max_steps=5"],
        ["-m", "+sweep=rloo_beta", "experiment=toy", group],
        ["-m", "stage=dpo", "stage.rounds=4", "experiment=toy", group, "stage.beta=0.2"],
    ]  # fmt: skip
    no_rm = _tails(frontier.commands("toy", ["grpo", "rloo"], grpo_betas="0.1"))
    assert not any("stage=rm" in tail for tail in no_rm)
    assert no_rm[1][-1] == "stage.beta=0.1"
    with pytest.raises(TypeError, match="unknown grid"):
        frontier.commands("toy", ["grpo"], grpo_beta="0.1")


def test_cli_options_reach_the_commands(capsys, tmp_path: Path) -> None:
    argv = [
        "--dry-run", "--runs-root", str(tmp_path), "--methods", "grpo,grpo_rm,rloo,dpo_iter",
        "--grpo-betas", "0.0,0.5", "--grpo-rm-betas", "0.01", "--rloo-betas", "0.3",
        "--dpo-rounds", "2", "--grpo-args", "stage.max_steps=3", "--rloo-args", "seed=1",
    ]  # fmt: skip
    assert frontier.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # "+ python -m stages [-m] <stage or sweep> ...": what each step runs
    steps = [parts[5] if parts[4] == "-m" else parts[4] for parts in map(str.split, lines)]
    assert steps == [
        "stage=sft",
        "+sweep=grpo_beta",
        "stage=rm",
        "+sweep=grpo_rm_beta",
        "+sweep=rloo_beta",
        "stage=dpo",
    ]  # fmt: skip  (the RM right before the first method that needs it)
    assert lines[1].endswith("stage.beta=0.0,0.5 stage.max_steps=3")
    assert lines[3].endswith("stage.beta=0.01 stage.max_steps=3")
    assert lines[4].endswith("stage.beta=0.3 seed=1")
    assert "stage.rounds=2" in lines[5]
    assert not any(tmp_path.iterdir())  # a dry run writes nothing
    with pytest.raises(SystemExit):
        frontier.main(["--dry-run", "--methods", "grpo,sac"])
    assert "--methods must be a comma list of" in capsys.readouterr().err


@pytest.mark.parametrize("sweep", ["grpo_beta", "grpo_rm_beta", "rloo_beta"])
def test_sweep_files_compose_and_every_grid_value_validates(sweep: str, tmp_path: Path) -> None:
    GlobalHydra.instance().clear()
    base = [f"+sweep={sweep}", f"paths.runs_root={tmp_path}", "tracking=none"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=base, return_hydra_config=True)
        params = dict(cfg.hydra.sweeper.params)
        stage = "rloo" if sweep.startswith("rloo") else "grpo"
        assert cfg.stage.name == stage and cfg.tracking.group == f"toy-{sweep}"
        # A curve, from no KL term at all (beta 0) upwards.
        betas = [float(b) for b in params["stage.beta"].split(",")]
        assert len(betas) >= 3 and betas[0] == 0.0 and betas == sorted(betas)
        # GRPO on the RM names its reward in the run dir (a swept key): never grpo_beta's dirs.
        assert (params.get("stage.reward") == "rm") == (sweep == "grpo_rm_beta")
        for beta in params["stage.beta"].split(","):
            job = [*base, f"stage.beta={beta}"]
            if "stage.reward" in params:
                job.append(f"stage.reward={params['stage.reward']}")
            typed = validate_config(compose(config_name="config", overrides=job))
            assert typed.stage.beta == float(beta)
            assert typed.stage.reward == ("rm" if sweep == "grpo_rm_beta" else "task")
    GlobalHydra.instance().clear()


# ----------------------------------------------------------------------------- selection


def test_select_takes_this_frontiers_grpo_rloo_and_iterative_dpo_runs(runs: Path) -> None:
    chosen = frontier.select(find_runs([runs / "toy"]), "toy")
    assert sorted(r.label for r in chosen) == [
        "dpo/stage.rounds=3",
        "grpo/stage.beta=0.0",
        "grpo/stage.beta=0.0,stage.reward=rm",
        "grpo/stage.beta=0.2",
        "grpo/stage.beta=0.2,stage.reward=rm",
        "rloo/stage.beta=0.04",
        "sft",
    ]  # fmt: skip  (not the ungrouped grpo, another experiment's rloo, nor the RM)
    methods = {r.label: cmp.frontier_method(r) for r in chosen}
    assert methods["grpo/stage.beta=0.0"] == "GRPO"
    assert methods["grpo/stage.beta=0.0,stage.reward=rm"] == "GRPO (RM reward)"
    assert methods["rloo/stage.beta=0.04"] == "RLOO"
    assert methods["dpo/stage.rounds=3"] == "iterative DPO"


# ------------------------------------------------------------------- iterative DPO rounds


def test_iterative_dpo_rounds_are_points_joined_by_a_line(runs: Path) -> None:
    chosen = frontier.select(find_runs([runs / "toy"]), "toy")
    points, missing = cmp.frontier_points(chosen)
    assert not missing
    rounds = [p for p in points if p.method == "iterative DPO"]
    assert [(p.label, p.kl, p.reward) for p in rounds] == [
        ("round 1", 0.6, 0.8), ("round 2", 1.1, 0.9), ("round 3", 1.5, 0.93),
    ]  # fmt: skip
    assert {p.series for p in rounds} == {"dpo/stage.rounds=3"}
    fig = cmp.frontier_figure(chosen, "t")
    ax = fig.axes[0]
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
    assert len(lines) == 1  # only the rounds are joined
    assert list(lines[0].get_xdata()) == [0.6, 1.1, 1.5]
    assert list(lines[0].get_ydata()) == [0.8, 0.9, 0.93]
    texts = [t.get_text() for t in ax.texts]
    assert {"round 1", "round 2", "round 3"} <= set(texts)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "iterative DPO runs" in legend and "GRPO (RM reward) runs" in legend
    # Variants are hollow markers of their stage's colour; plain runs are filled.
    faces = {c.get_label(): c.get_facecolor()[0][:3].tolist() for c in ax.collections}
    assert faces["GRPO (RM reward) runs"] == [1.0, 1.0, 1.0]
    assert faces["GRPO runs"] != [1.0, 1.0, 1.0]


def test_a_round_without_metrics_is_left_out_and_a_run_without_any_is_missing(
    tmp_path: Path,
) -> None:
    toy = tmp_path / "runs" / "toy"
    _finish(toy / "sft", stage="sft", metrics={REWARD_KEY: 0.4}, group=None)
    partial = [_round(1, 0.6, 0.8), {"round": 2, REWARD_KEY: 0.9}, _round(3, 1.5, 0.93)]
    _finish(toy / "dpo/stage.rounds=3", stage="dpo", stage_cfg={"rounds": 3},
            extra={"rounds": partial})  # fmt: skip
    _finish(toy / "dpo/stage.rounds=2", stage="dpo", stage_cfg={"rounds": 2},
            extra={"rounds": [{"round": 1}, {"round": 2}]})  # fmt: skip
    points, missing = cmp.frontier_points(find_runs([toy]))
    assert [p.label for p in points] == ["round 1", "round 3"]
    assert [r.label for r in missing] == ["dpo/stage.rounds=2"]


# ------------------------------------------------------------------------- proxy reward


def test_frontier_md_and_pngs_show_true_and_proxy_reward(
    runs: Path, tmp_path: Path, fake_rm: FakeRM, capsys
) -> None:
    out = tmp_path / "out"
    assert frontier.main(["--plot-only", "--runs-root", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'frontier.png'}, {out / 'frontier_proxy.png'}" in printed
    assert (out / "frontier_proxy.png").read_bytes()[:8] == PNG_MAGIC
    md = (out / "frontier.md").read_text()
    assert "![proxy reward-KL frontier](frontier_proxy.png)" in md
    assert "| method | setting | run | KL to SFT | accuracy | proxy (RM score) |" in md
    sft = _mean_len(["5.", "i do not know.", "i do not know."])
    hacked = _mean_len(["104.", "104.", "579."])
    assert f"| SFT (reference) | - | sft | 0 | 0.400 | {sft:.3f} |" in md
    assert (
        f"| GRPO (RM reward) | beta=0 | grpo/stage.beta=0.0,stage.reward=rm | 4.000 | 0.550 | "
        f"{hacked:.3f} |" in md
    )
    # Iterative DPO: its replies are the last round's, so only round 3 has a proxy reward.
    assert "| iterative DPO | round 1 | dpo/stage.rounds=3 | 0.600 | 0.800 | - |" in md
    assert "| iterative DPO | round 3 | dpo/stage.rounds=3 | 1.500 | 0.930 | 3.000 |" in md
    assert f"Proxy reward scored by the reward model in {runs / 'toy' / 'rm'}" in md
    # The generated header explains the picture; the tables carry the numbers.
    for words in ("over-optimisation", "Gao et al. 2022", "arbitrary scale", "stage.rounds"):
        assert words.lower() in md.lower()

    runs_list = frontier.select(find_runs([runs / "toy"]), "toy")
    scores = proxy_reward.proxy_rewards(
        runs_list, runs, "toy", runs / "toy" / "_frontier" / "proxy_rewards.json"
    ).by_run
    proxy_fig = cmp.frontier_figure(runs_list, "p", proxy=scores)
    ax = proxy_fig.axes[0]
    assert "proxy reward" in ax.get_ylabel() and "arbitrary scale" in ax.get_ylabel()
    stars = [c for c in ax.collections if c.get_label().startswith("SFT reference")]
    assert stars[0].get_offsets().tolist() == [[0.0, sft]]
    true_fig = cmp.frontier_figure(runs_list, "t")
    assert "true reward" in true_fig.axes[0].get_ylabel()


def test_proxy_scores_are_cached_per_run_and_reward_model(
    runs: Path, tmp_path: Path, fake_rm: FakeRM
) -> None:
    argv = ["--plot-only", "--runs-root", str(runs), "--out", str(tmp_path / "out")]
    assert frontier.main(argv) == 0
    assert len(fake_rm.loads) == 1  # one RM load for every run
    assert len(fake_rm.scored) == 7 * 3  # SFT + 6 plotted runs, 3 replies each
    cache = runs / "toy" / "_frontier" / "proxy_rewards.json"
    assert json.loads(cache.read_text())["reward_model_sha256"] == fake_rm.loads[0]

    # Unchanged runs: nothing is loaded or scored again, even for --out docs.
    assert frontier.main([*argv[:-1], str(tmp_path / "docs")]) == 0
    assert len(fake_rm.loads) == 1 and len(fake_rm.scored) == 21

    # A re-run run (new replies, new manifest): only it is scored again.
    rloo = runs / "toy" / "rloo" / "stage.beta=0.04"
    _finish(rloo, stage="rloo", stage_cfg={"beta": 0.04, "reward": "task"},
            metrics={REWARD_KEY: 0.9, KL_KEY: 1.0}, replies=["5.", "42.", "9999."])  # fmt: skip
    assert frontier.main(argv) == 0
    assert len(fake_rm.loads) == 2 and fake_rm.scored[21:] == ["5.", "42.", "9999."]
    assert (
        "| RLOO | - | rloo/stage.beta=0.04 | 1.000 | 0.900 | 3.333 |"
        in (tmp_path / "out" / "frontier.md").read_text()
    )

    # Another reward model: its scores are not the old one's, so everything is rescored.
    _finish(runs / "toy" / "rm", stage="rm", group=None, metrics={"eval/accuracy": 0.9})
    assert frontier.main(argv) == 0
    assert len(fake_rm.loads) == 3 and len(fake_rm.scored) == 21 + 3 + 21
    assert fake_rm.loads[2] != fake_rm.loads[0]

    # --no-proxy loads no reward model and draws no proxy picture.
    assert frontier.main([*argv, "--no-proxy"]) == 0
    assert len(fake_rm.loads) == 3
    assert not (tmp_path / "out" / "frontier_proxy.png").exists()
    assert "No proxy reward (--no-proxy)." in (tmp_path / "out" / "frontier.md").read_text()


def test_runs_without_usable_eval_samples_are_left_out_with_a_note(
    runs: Path, tmp_path: Path, fake_rm: FakeRM, capsys
) -> None:
    (runs / "toy" / "grpo" / "stage.beta=0.2" / handoff.EVAL_SAMPLES).unlink()
    broken = runs / "toy" / "rloo" / "stage.beta=0.04" / handoff.EVAL_SAMPLES
    broken.write_text('{"prompt": "What is 2 + 3?", "reply": "5."}\n{"prompt": "What is 1 + 1?"}\n')
    out = tmp_path / "out"
    assert frontier.main(["--plot-only", "--runs-root", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out / "frontier.md").read_text()
    for text in (printed, md):
        assert "grpo/stage.beta=0.2: no eval_samples.jsonl, so no proxy reward" in text
        assert f"rloo/stage.beta=0.04: no proxy reward: {broken}, row 2:" in text
    # Still on the true-reward frontier, without a proxy value.
    assert "| GRPO | beta=0.2 | grpo/stage.beta=0.2 | 0.500 | 0.800 | - |" in md
    assert "| RLOO | - | rloo/stage.beta=0.04 | 1.000 | 0.900 | - |" in md
    assert (out / "frontier_proxy.png").is_file()  # the other runs are plotted


def test_without_a_reward_model_the_frontier_says_how_to_get_the_proxy(
    runs: Path, tmp_path: Path, fake_rm: FakeRM
) -> None:
    import shutil

    shutil.rmtree(runs / "toy" / "rm")
    out = tmp_path / "out"
    (out).mkdir()
    (out / "frontier_proxy.png").write_bytes(PNG_MAGIC)  # from an earlier frontier
    assert frontier.main(["--plot-only", "--runs-root", str(runs), "--out", str(out)]) == 0
    md = (out / "frontier.md").read_text()
    assert "No proxy reward (no finished reward model of this experiment)." in md
    assert "Run `make rm EXP=toy` first." in md
    assert "frontier_proxy.png" not in md and not (out / "frontier_proxy.png").exists()
    assert fake_rm.loads == []


# ---------------------------------------------------------------- a real tiny reward model


def test_proxy_reward_is_the_reward_models_mean_score_of_the_replies(
    compose_cfg, sft_runs, tmp_path: Path
) -> None:
    """A real RM (full weights, a few steps on the fixture pairs) scores the SFT run's own
    eval_samples.jsonl; the proxy reward equals its scores by plain transformers."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.rm import recipe as rm
    from tests.conftest import FIXTURES

    runs_root = tmp_path / "runs"
    shutil.copytree(sft_runs("none"), runs_root / "toy" / "sft")
    rm.run(compose_cfg("stage=rm", "data.pairs.source=file",
                       f"data.pairs.path={FIXTURES / 'pref_hh_rlhf.jsonl'}",
                       "stage.max_steps=4"))  # fmt: skip
    sft = [r for r in find_runs([runs_root / "toy"]) if r.stage == "sft"]
    samples = [json.loads(line) for line in (sft[0].path / handoff.EVAL_SAMPLES).open()]
    assert samples and all({"prompt", "reply"} <= row.keys() for row in samples)

    result = proxy_reward.proxy_rewards(sft, runs_root, "toy", tmp_path / "cache.json")
    assert result.notes == [] and result.scored == 1

    final = runs_root / "toy" / "rm" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tokenizer = AutoTokenizer.from_pretrained(final)
    plain = []
    for row in samples:
        chat = [{"role": "user", "content": row["prompt"]},
                {"role": "assistant", "content": row["reply"]}]  # fmt: skip
        ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            plain.append(float(model(**ids).logits[0, 0]))
    assert result.by_run[sft[0].path] == pytest.approx(sum(plain) / len(plain), abs=1e-4)
