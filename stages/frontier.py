"""`make frontier`: the reward-KL frontier of DPO, PPO and KTO on one experiment, PNG + table.

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
5. one point per DPO/PPO/KTO run of this frontier (W&B group ``<exp>-frontier``): the toy
   task's true reward (the judge's held-out accuracy) against KL(policy || SFT), plus SFT at
   KL 0.

Finished runs are reused (a stage that is DONE is a no-op), so re-running only adds what is
missing. Stages run as subprocesses: each sweep job is a normal Hydra job with its own run
dir and W&B run.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from stages.compare import (
    KL_KEY,
    REWARD_KEY,
    CompareError,
    Run,
    fill_settings,
    find_runs,
    frontier_points,
    is_parent_of_any,
    plot_frontier,
    reference_points,
    render_markdown,
    table_rows,
)

# Output goes next to the runs it plots: the tracked docs/ changes only when asked (--out docs).
OUTPUT_DIR_NAME = "_frontier"
METHODS = ("dpo", "ppo", "kto")
# Per-stage extra overrides (--<stage>-args): every stage the frontier runs.
STEP_STAGES = ("sft", "dpo", "rm", "ppo", "kto")


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
    betas: str | None = None,
    kl_coefs: str | None = None,
    kto_betas: str | None = None,
) -> list[list[str]]:
    """The CLI invocations that produce the frontier's runs, in order."""
    per_stage = per_stage or {}
    base = [sys.executable, "-m", "stages"]
    exp = [f"experiment={experiment}", *common]
    group = f"tracking.group={frontier_group(experiment)}"
    cmds = [[*base, "stage=sft", *exp, *per_stage.get("sft", ())]]
    if "dpo" in methods:
        grid = [f"stage.beta={betas}"] if betas else []
        cmds.append([*base, "-m", "+sweep=dpo_beta", *exp, group, *grid, *per_stage.get("dpo", ())])
    if "ppo" in methods:
        cmds.append([*base, "stage=rm", *exp, *per_stage.get("rm", ())])
        grid = [f"stage.kl_coef={kl_coefs}"] if kl_coefs else []
        cmds.append([*base, "-m", "+sweep=ppo_kl", *exp, group, *grid, *per_stage.get("ppo", ())])
    if "kto" in methods:
        grid = [f"stage.beta={kto_betas}"] if kto_betas else []
        cmds.append([*base, "-m", "+sweep=kto_beta", *exp, group, *grid, *per_stage.get("kto", ())])
    return cmds


def select(runs: Sequence[Run], experiment: str) -> list[Run]:
    """This frontier's DPO/PPO/KTO runs (by W&B group) and the SFT runs they descend from."""
    group = frontier_group(experiment)
    chosen = [
        r
        for r in runs
        if r.stage in METHODS
        and r.experiment == experiment
        and ((r.manifest.get("config") or {}).get("tracking") or {}).get("group") == group
    ]
    return [r for r in runs if r.stage == "sft" and is_parent_of_any(r, chosen)] + chosen


def write_frontier(runs_root: Path, experiment: str, out: Path) -> tuple[Path, Path, str]:
    """frontier.png + frontier.md under ``out`` from the runs of this frontier."""
    runs = select(find_runs([runs_root / experiment]), experiment)
    fill_settings(runs)  # label each point by what varies within this frontier (beta, kl_coef)
    points, missing = frontier_points(runs)
    if not points:
        hint = (
            f" ({', '.join(r.label for r in missing)} lack {REWARD_KEY} / {KL_KEY})"
            if missing
            else ""
        )
        raise CompareError(
            f"no DPO/PPO/KTO run of W&B group {frontier_group(experiment)!r} under "
            f"{runs_root / experiment} has both frontier metrics{hint}; run without --plot-only"
        )
    png = plot_frontier(runs, out / "frontier.png", f"Reward-KL frontier: {experiment}")
    assert png is not None
    rows = [
        [p.method, p.label, p.run, f"{p.kl:.3f}", f"{p.reward:.3f}"]
        for p in sorted(points, key=lambda p: (p.method, p.kl))
    ]
    refs = reference_points(runs)
    rows = [["SFT (reference)", "-", label, "0", f"{acc:.3f}"] for label, acc in refs] + rows
    frontier_table = render_markdown(
        ["method", "setting", "run", "KL to SFT", "accuracy"], rows, text_columns=3
    )
    header, run_rows = table_rows(runs, full_labels=True)
    md = "\n".join(
        [
            f"# Reward-KL frontier: {experiment}",
            "",
            "![reward-KL frontier](frontier.png)",
            "",
            f"Each point is one run. y = the toy task's true reward: greedy accuracy on held-out "
            f"`What is A + B?` prompts by the rule judge (`{REWARD_KEY}`). x = Monte-Carlo "
            f"KL(policy ‖ SFT) per response on the policy's own samples at T=1 (`{KL_KEY}`). "
            "Up and to the left is better: more reward for less drift from the SFT policy. "
            "DPO and KTO trade them off through beta, PPO through kl_coef.",
            "",
            frontier_table,
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
    return png, md_path, frontier_table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stages.frontier",
        description="Run the DPO-beta, PPO-kl_coef and KTO-beta sweeps and plot the reward-KL "
        "frontier.",
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
                        help="comma list of dpo,ppo,kto (default: all three)")  # fmt: skip
    parser.add_argument(
        "--betas", help="DPO betas, e.g. 0.03,0.1,0.3 (default: conf/sweep/dpo_beta.yaml)"
    )
    parser.add_argument("--kl-coefs", help="PPO kl_coefs (default: conf/sweep/ppo_kl.yaml)")
    parser.add_argument("--kto-betas", help="KTO betas (default: conf/sweep/kto_beta.yaml)")
    for stage in STEP_STAGES:
        parser.add_argument(
            f"--{stage}-args", default="", help=f"extra overrides for the {stage} step"
        )
    parser.add_argument(
        "--plot-only", action="store_true", help="plot existing runs; train nothing"
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

    runs_root = Path(args.runs_root)
    common = [f"paths.runs_root={runs_root}", *args.overrides]
    per_stage = {s: shlex.split(getattr(args, f"{s}_args")) for s in STEP_STAGES}
    if not args.plot_only:
        for cmd in commands(args.experiment, methods, common=common, per_stage=per_stage,
                            betas=args.betas, kl_coefs=args.kl_coefs,
                            kto_betas=args.kto_betas):  # fmt: skip
            print("+ " + shlex.join(["python", *cmd[1:]]), flush=True)
            if not args.dry_run and subprocess.run(cmd).returncode != 0:
                print(f"frontier: step failed: {shlex.join(cmd)}", file=sys.stderr)
                return 1
    if args.dry_run:
        return 0
    try:
        out = Path(args.out) if args.out else default_out(runs_root, args.experiment)
        png, md, table = write_frontier(runs_root, args.experiment, out)
    except CompareError as err:
        print(f"frontier: {err}", file=sys.stderr)
        return 2
    print(table)
    print(f"\nwrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
