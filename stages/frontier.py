"""`make frontier`: the reward-KL frontier of every method on one experiment, PNGs + table.

    python -m stages.frontier              # EXP=toy: runs/toy/_frontier/frontier.{png,md}
    python -m stages.frontier --plot-only  # re-plot from existing runs
    python -m stages.frontier --dry-run    # print the commands, run nothing
    python -m stages.frontier --out docs   # regenerate the committed docs/frontier.{png,md}

Owns the recipe, nothing else: it runs the same commands a user would type (each printed
first), then plots with `stages.compare`:

1. ``alignpipe stage=sft``                      the shared parent (a no-op when DONE)
2. ``alignpipe -m +sweep=dpo_beta``             DPO over beta (conf/sweep/dpo_beta.yaml)
3. ``alignpipe stage=rm`` then ``-m +sweep=ppo_kl``   PPO over kl_coef (conf/sweep/ppo_kl.yaml)
4. ``alignpipe -m +sweep=kto_beta``             KTO over beta (conf/sweep/kto_beta.yaml)
5. ``alignpipe -m +sweep=grpo_beta``            GRPO over beta, rule-judge reward
6. ``alignpipe -m +sweep=grpo_rm_beta``         GRPO over beta, the RM of step 3 as reward
7. ``alignpipe -m +sweep=rloo_beta``            RLOO over beta, rule-judge reward
8. ``alignpipe -m stage=dpo stage.rounds=3``    iterative DPO, one point per round
9. one point per run of this frontier (W&B group ``<exp>-frontier``): the toy task's true
   reward (the judge's held-out accuracy) against KL(policy || SFT), plus SFT at KL 0; and
   a second picture with the **proxy** reward, the experiment's RM's mean score of the same
   held-out replies (`stages.proxy_reward`, cached in ``runs/<exp>/_frontier/``).

The RM (``alignpipe stage=rm``) runs before the first method that needs it (PPO, GRPO with
the RM as reward). Finished runs are reused (a stage that is DONE is a no-op), so re-running
only adds what is missing. Stages run as subprocesses: each sweep job is a normal Hydra job
with its own run dir and W&B run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stages import proxy_reward
from stages.compare import (
    KL_KEY,
    REWARD_KEY,
    CompareError,
    Run,
    fill_settings,
    find_runs,
    frontier_method,
    frontier_points,
    is_parent_of_any,
    method_order,
    plot_frontier,
    reference_runs,
    render_markdown,
    table_rows,
)

# Output goes next to the runs it plots: the tracked docs/ changes only when asked (--out docs).
OUTPUT_DIR_NAME = "_frontier"
PNG = "frontier.png"
PROXY_PNG = "frontier_proxy.png"
# The proxy scores stay next to the runs whatever --out says, so `--out docs` reuses them.
PROXY_CACHE = "proxy_rewards.json"
DPO_ROUNDS = 3  # iterative DPO's rounds (--dpo-rounds)


@dataclass(frozen=True)
class Sweep:
    """One method of the frontier run as a named sweep (conf/sweep/<name>.yaml)."""

    method: str  # its name in --methods
    name: str  # conf/sweep/<name>.yaml
    stage: str  # the stage it runs: --<stage>-args apply to it
    knob: str  # the swept key
    option: str  # the CLI option (and commands() keyword) giving another grid


SWEEPS = (
    Sweep("dpo", "dpo_beta", "dpo", "stage.beta", "betas"),
    Sweep("ppo", "ppo_kl", "ppo", "stage.kl_coef", "kl_coefs"),
    Sweep("kto", "kto_beta", "kto", "stage.beta", "kto_betas"),
    Sweep("grpo", "grpo_beta", "grpo", "stage.beta", "grpo_betas"),
    Sweep("grpo_rm", "grpo_rm_beta", "grpo", "stage.beta", "grpo_rm_betas"),
    Sweep("rloo", "rloo_beta", "rloo", "stage.beta", "rloo_betas"),
)
ITERATIVE_DPO = "dpo_iter"  # --methods name of iterative DPO (stage=dpo stage.rounds=K)
METHODS = (*(s.method for s in SWEEPS), ITERATIVE_DPO)
# Methods trained against this experiment's reward model: `alignpipe stage=rm` runs first.
NEEDS_REWARD_MODEL = ("ppo", "grpo_rm")
# Stages whose runs in this frontier's W&B group are plotted.
FRONTIER_RUN_STAGES = ("dpo", "ppo", "kto", "grpo", "rloo")
# Per-stage extra overrides (--<stage>-args): every stage the frontier runs.
STEP_STAGES = ("sft", "dpo", "rm", "ppo", "kto", "grpo", "rloo")


def frontier_group(experiment: str) -> str:
    return f"{experiment}-frontier"


def default_out(runs_root: Path, experiment: str) -> Path:
    """Where frontier.png/.md go without --out: ``<runs_root>/<experiment>/_frontier``."""
    return runs_root / experiment / OUTPUT_DIR_NAME


def commands(
    experiment: str,
    methods: Sequence[str],
    *,
    common: Sequence[str] = (),
    per_stage: dict[str, Sequence[str]] | None = None,
    dpo_rounds: int = DPO_ROUNDS,
    **grids: str | None,
) -> list[list[str]]:
    """The CLI invocations that produce the frontier's runs, in order. ``grids``: another
    grid per sweep, by its option name (``betas="0.1,0.3"``, ``grpo_betas=...``)."""
    unknown = set(grids) - {s.option for s in SWEEPS}
    if unknown:
        raise TypeError(f"unknown grid(s) {sorted(unknown)}; known: {[s.option for s in SWEEPS]}")
    per_stage = per_stage or {}
    base = [sys.executable, "-m", "stages"]
    exp = [f"experiment={experiment}", *common]
    group = f"tracking.group={frontier_group(experiment)}"
    cmds = [[*base, "stage=sft", *exp, *per_stage.get("sft", ())]]
    reward_model_made = False
    for sweep in SWEEPS:
        if sweep.method not in methods:
            continue
        if sweep.method in NEEDS_REWARD_MODEL and not reward_model_made:
            cmds.append([*base, "stage=rm", *exp, *per_stage.get("rm", ())])
            reward_model_made = True
        grid = grids.get(sweep.option)
        cmds.append(
            [*base, "-m", f"+sweep={sweep.name}", *exp, group,
             *([f"{sweep.knob}={grid}"] if grid else []), *per_stage.get(sweep.stage, ())]
        )  # fmt: skip
    if ITERATIVE_DPO in methods:
        # A one-job multirun, so its run dir is a variant: runs/<exp>/dpo/stage.rounds=K.
        cmds.append([*base, "-m", "stage=dpo", f"stage.rounds={dpo_rounds}", *exp, group,
                     *per_stage.get("dpo", ())])  # fmt: skip
    return cmds


def select(runs: Sequence[Run], experiment: str) -> list[Run]:
    """This frontier's policy runs (by W&B group) and the SFT runs they descend from."""
    group = frontier_group(experiment)
    chosen = [
        r
        for r in runs
        if r.stage in FRONTIER_RUN_STAGES
        and r.experiment == experiment
        and ((r.manifest.get("config") or {}).get("tracking") or {}).get("group") == group
    ]
    return [r for r in runs if r.stage == "sft" and is_parent_of_any(r, chosen)] + chosen


def _explanation(experiment: str) -> list[str]:
    """What the pictures say, in words that hold whatever the numbers (the tables carry those)."""
    return [
        "Each point is one run. y = the toy task's true reward: greedy accuracy on held-out "
        f"`What is A + B?` prompts by the rule judge (`{REWARD_KEY}`). x = Monte-Carlo "
        f"KL(policy ‖ SFT) per response on the policy's own samples at T=1 (`{KL_KEY}`). "
        "Up and to the left is better: more reward for less drift from the SFT policy. "
        "DPO and KTO trade them off through beta, PPO through kl_coef, GRPO and RLOO through "
        "beta, iterative DPO through its rounds:",
        "",
        "- **DPO**, **KTO**: `stage.beta`, the strength of the implicit KL constraint; a small "
        "beta lets the policy move further from SFT.",
        "- **PPO**: `stage.kl_coef`, the KL penalty subtracted from the reward model's score; "
        "a small one lets it drift further to chase that score.",
        "- **GRPO**, **RLOO** (filled markers): `stage.beta`, the KL coefficient to the SFT "
        "reference (0: no KL term at all), with the rule judge as reward: a verifiable "
        "reward, no reward model. **GRPO (RM reward)** (hollow markers): the same over "
        f"`stage.beta`, rewarded by this experiment's reward model (`runs/{experiment}/rm`).",
        "- **iterative DPO** (hollow, joined by a line): `stage.rounds`; each round samples "
        "the current policy, judges and pairs its replies and trains DPO on them. The line "
        "runs from round 1 to the last round: how far each round moves the policy, and what "
        "it buys.",
        "",
        "The second picture puts the same runs, at the same KL, against the **proxy** reward: "
        f"the mean score this experiment's reward model (`runs/{experiment}/rm`) gives the "
        "same greedy held-out replies (`eval_samples.jsonl`), with SFT's at KL 0. The reward "
        "model's scores are on an arbitrary scale (a Bradley-Terry logit): compare runs with "
        "each other, never a score with an accuracy.",
        "",
        "How to read the two together (Gao et al. 2022, *Scaling Laws for Reward Model "
        "Overoptimization*): a method that solves the task gains on both as KL grows. "
        "**Over-optimisation** is the gap opening between them: along a method's points, the "
        "proxy reward keeps rising with KL while the true reward levels off and then falls: "
        "the policy has found what the reward model scores high but the rule judge rejects. "
        "Only runs trained on the reward model can do that (PPO, GRPO (RM reward)); GRPO and "
        "RLOO with the rule judge optimise the true reward itself, and DPO / KTO learn from "
        "pairs judged by `data.pairs.judge` (the rule judge unless set to the reward model). "
        "A stronger KL knob (larger beta or kl_coef) keeps a run at lower KL, where the two "
        "still agree.",
    ]


def write_frontier(
    runs_root: Path, experiment: str, out: Path, *, proxy: bool = True
) -> tuple[Path, Path, str]:
    """frontier.png (+ frontier_proxy.png) + frontier.md under ``out`` from the runs of this
    frontier. ``proxy``: score the runs' held-out replies with the experiment's RM (cached)."""
    runs = select(find_runs([runs_root / experiment]), experiment)
    # Label each point by what varies within its method (beta, kl_coef), not across them.
    fill_settings(runs, group_by=lambda run: frontier_method(run) or run.stage)
    points, missing = frontier_points(runs)
    if not points:
        hint = (
            f" ({', '.join(r.label for r in missing)} lack {REWARD_KEY} / {KL_KEY})"
            if missing
            else ""
        )
        raise CompareError(
            f"no policy run of W&B group {frontier_group(experiment)!r} under "
            f"{runs_root / experiment} has both frontier metrics{hint}; run without --plot-only"
        )
    title = f"Reward-KL frontier: {experiment}"
    png = plot_frontier(runs, out / PNG, title)
    assert png is not None
    proxies = proxy_reward.ProxyRewards()
    if proxy:
        cache = default_out(runs_root, experiment) / PROXY_CACHE
        plotted = {p.run for p in points}
        scored = reference_runs(runs) + [r for r in runs if r.label in plotted]
        proxies = proxy_reward.proxy_rewards(scored, runs_root, experiment, cache)
    proxy_png = plot_frontier(
        runs, out / PROXY_PNG, f"Proxy reward-KL frontier: {experiment}", proxy=proxies.by_run
    )
    if proxy_png is None:
        (out / PROXY_PNG).unlink(missing_ok=True)  # never leave an older run's picture
    points, _ = frontier_points(runs, proxies.by_run)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rank = {method: i for i, method in enumerate(method_order())}
    ordered = sorted(
        points, key=lambda p: (rank.get(p.method, len(rank)), p.method, 0 if p.series else p.kl)
    )  # an iterative run's rounds stay in round order
    rows = [
        [p.method, p.label, p.run, f"{p.kl:.3f}", f"{p.reward:.3f}", fmt(p.proxy)] for p in ordered
    ]
    refs = [
        ["SFT (reference)", "-", r.label, "0", fmt(accuracy), fmt(proxies.by_run.get(r.path))]
        for r in reference_runs(runs)
        if (accuracy := r.metric(REWARD_KEY)) is not None
    ]
    frontier_table = render_markdown(
        ["method", "setting", "run", "KL to SFT", "accuracy", "proxy (RM score)"],
        refs + rows,
        text_columns=3,
    )
    if proxies.reward_model:
        scored_by = f"Proxy reward scored by the reward model in {proxies.reward_model}."
    elif not proxy:
        scored_by = "No proxy reward (--no-proxy)."
    else:
        scored_by = "No proxy reward (no finished reward model of this experiment)."
    notes = [f"- {note}" for note in proxies.notes]
    header, run_rows = table_rows(runs, full_labels=True)
    md = "\n".join(
        [
            f"# Reward-KL frontier: {experiment}",
            "",
            f"![reward-KL frontier]({PNG})",
            *([f"![proxy reward-KL frontier]({PROXY_PNG})"] if proxy_png else []),
            "",
            *_explanation(experiment),
            "",
            frontier_table,
            "",
            scored_by,
            *(["", "Left out of the proxy picture:", "", *notes] if notes else []),
            "",
            "## All runs of this frontier",
            "",
            render_markdown(header, run_rows),
            "",
            f"Reproduce: `make frontier EXP={experiment}` (writes "
            f'runs/{experiment}/{OUTPUT_DIR_NAME}/; add `ARGS="--out docs"` for docs/; see '
            "`python -m stages.frontier --help`).",
            "",
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    md_path = out / "frontier.md"
    md_path.write_text(md)
    summary = "\n".join([frontier_table, "", scored_by, *notes])
    return png, md_path, summary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.frontier",
        description="Run the DPO, PPO, KTO, GRPO, RLOO and iterative-DPO sweeps and plot the "
        "reward-KL frontier (true and proxy reward).",
    )
    parser.add_argument("--experiment", default="toy", help="experiment name (EXP); default toy")
    parser.add_argument(
        "--runs-root", default="runs", help="paths.runs_root of the runs; default runs"
    )
    parser.add_argument(
        "--out",
        help="where frontier.png/.md go; default <runs-root>/<experiment>/_frontier "
        "(--out docs regenerates the committed docs/frontier.{png,md})",
    )
    parser.add_argument("--methods", default=None,
                        help=f"comma list of {','.join(METHODS)} (default: all)")  # fmt: skip
    for sweep in SWEEPS:
        parser.add_argument(
            "--" + sweep.option.replace("_", "-"),
            help=f"{sweep.method} grid of {sweep.knob}, e.g. 0.05,0.5 "
            f"(default: conf/sweep/{sweep.name}.yaml)",
        )
    parser.add_argument("--dpo-rounds", type=int, default=DPO_ROUNDS,
                        help=f"iterative DPO's stage.rounds (default {DPO_ROUNDS})")  # fmt: skip
    for stage in STEP_STAGES:
        parser.add_argument(
            f"--{stage}-args", default="", help=f"extra overrides for the {stage} step(s)"
        )
    parser.add_argument(
        "--plot-only", action="store_true", help="plot existing runs; train nothing"
    )
    parser.add_argument(
        "--no-proxy", action="store_true", help="skip the proxy reward (loads no reward model)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides for every step, e.g. tracking=none"
    )
    args = parser.parse_args(argv)

    if args.methods is None:
        methods = list(METHODS)
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = sorted(set(methods) - set(METHODS))
        if unknown or not methods:
            parser.error(f"--methods must be a comma list of {list(METHODS)}, got {args.methods!r}")
    if args.dpo_rounds < 2:
        parser.error(f"--dpo-rounds must be at least 2 (iterative DPO), got {args.dpo_rounds}")

    runs_root = Path(args.runs_root)
    common = [f"paths.runs_root={runs_root}", *args.overrides]
    per_stage = {s: shlex.split(getattr(args, f"{s}_args")) for s in STEP_STAGES}
    grids = {s.option: getattr(args, s.option) for s in SWEEPS}
    if not args.plot_only:
        for cmd in commands(args.experiment, methods, common=common, per_stage=per_stage,
                            dpo_rounds=args.dpo_rounds, **grids):  # fmt: skip
            print("+ " + shlex.join(["python", *cmd[1:]]), flush=True)
            if not args.dry_run and subprocess.run(cmd).returncode != 0:
                print(f"frontier: step failed: {shlex.join(cmd)}", file=sys.stderr)
                return 1
    if args.dry_run:
        return 0
    try:
        out = Path(args.out) if args.out else default_out(runs_root, args.experiment)
        png, md, summary = write_frontier(runs_root, args.experiment, out, proxy=not args.no_proxy)
    except CompareError as err:
        print(f"frontier: {err}", file=sys.stderr)
        return 2
    print(summary)
    proxy_png = out / PROXY_PNG
    shown = [png, proxy_png] if proxy_png.is_file() else [png]
    print(f"\nwrote {', '.join(map(str, shown))} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
