"""Every `alignpipe` and `make` command of README.md composes, validates and plans.

Stage commands (make ones expanded with `make -n`, so the Makefile is tested too) run with
`dry_run=true` in a tmp runs root: config validated, parents resolved through manifests, data
files opened. Multirun and sweep commands compose every job's config (sweep-file params
included; an Optuna interval by its two ends). The cheap ones run for real on the tiny model
(FAST settings), in README order, so later commands find their parents; a parent that is
still missing must be one an earlier README command produces. Make targets that are not
stages must exist (`make -n` succeeds) and the modules they run must be importable.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from stages.core.cli_errors import describe_user_error
from stages.core.plan import build_plan
from tests.conftest import CONF_DIR, FAST, FIXTURES, REPO
from tests.readme_commands import (
    command_lines,
    expand_jobs,
    invocations,
    other_modules,
    shell_commands,
)

# README placeholders for "your own file" -> a fixture in that format.
PLACEHOLDER_FILES = {
    "my.jsonl": FIXTURES / "sft_sharegpt.jsonl",
    "hh.jsonl": FIXTURES / "pref_hh_rlhf.jsonl",
}
# The 12-step FAST SFT never answers right, so best-vs-worst pairs would all be ties: pair
# its samples with the correct answer instead (as tests/test_dpo.py does).
PAIRS_FAST = [
    "data.pairs.num_prompts=64",
    "data.pairs.samples_per_prompt=2",
    "data.pairs.strategy=ground_truth_vs_sample",
    "data.pairs.heldout_fraction=0.2",
]


@dataclass
class Coverage:
    commands: int = 0  # README commands checked
    jobs: int = 0  # alignpipe configs composed, validated and planned
    ran: list[str] = field(default_factory=list)  # stages run for real ("toy/sft", ...)


def check_commands(
    commands: list[str], runs_root: Path, builtin: Path, *, run_for_real: tuple[str, ...] = ()
) -> Coverage:
    """Check each command in order; raises AssertionError naming the first broken one."""
    extra = [f"paths.runs_root={runs_root}", f"paths.builtin_models={builtin}", "tracking=none"]
    produced: set[tuple[str, str]] = set()  # (experiment, stage) an earlier command runs
    coverage = Coverage()
    for command in commands:
        for placeholder, fixture in PLACEHOLDER_FILES.items():
            command = command.replace(f"={placeholder}", f"={fixture}")
        try:
            _check_command(command, extra, produced, coverage, run_for_real)
        except AssertionError:
            raise
        except Exception as err:
            shown = describe_user_error(err) or f"{type(err).__name__}: {err}"
            raise AssertionError(f"README command `{command}` is broken:\n{shown}") from err
        coverage.commands += 1
    return coverage


def _check_command(
    command: str,
    extra: list[str],
    produced: set[tuple[str, str]],
    coverage: Coverage,
    run_for_real: tuple[str, ...],
) -> None:
    lines = command_lines(command)  # make: the Makefile's recipes, run with stand-ins
    for module in other_modules(lines):
        assert importlib.util.find_spec(module), f"`{command}` runs a missing module {module}"
    for invocation in invocations(command, lines):
        options = [o for o in invocation.overrides if o.startswith("-")]
        if options:  # e.g. `alignpipe --help`: must run and succeed as it is
            result = subprocess.run(
                [sys.executable, "-m", "stages", *invocation.overrides],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert result.returncode == 0, f"`{command}` fails:\n{result.stderr[-2000:]}"
            coverage.jobs += 1
            continue
        sweep = invocation.multirun or any(o.startswith("+sweep=") for o in invocation.overrides)
        jobs = expand_jobs(invocation.overrides, extra) if sweep else [invocation.overrides]
        for job in jobs:
            overrides = [*job, *extra]
            # Composed and validated as the CLI's preflight does, minus its check that a hub
            # model is reachable (the tests run offline; README names hub models).
            cfg = _compose([*overrides, "dry_run=true"])
            plan = build_plan(cfg, overrides)  # validates, resolves parents, opens data
            experiment, stage = cfg.experiment_name, cfg.stage.name
            unplanned = [p for p in plan.missing_parents if (experiment, p) not in produced]
            data_problems = len(plan.blockers) - len(plan.missing_parents)
            assert not unplanned and not data_problems, (
                f"README command `{command}` (job {shlex.join(job)}) cannot start and no "
                f"earlier README command makes up for it:\n{plan.render()}"
            )
            coverage.jobs += 1
            real = not sweep and stage in run_for_real and not plan.blockers
            if real and plan.state == "fresh" and experiment == "toy":
                _run_for_real([*overrides, *FAST, *(PAIRS_FAST if stage != "sft" else [])])
                coverage.ran.append(f"{experiment}/{stage}")
            produced.add((experiment, stage))


def _compose(overrides: list[str]) -> DictConfig:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def _run_for_real(overrides: list[str]) -> None:
    from stages.runner import run  # heavy: torch, trl

    run(_compose(overrides))


def readme_commands() -> list[str]:
    return shell_commands((REPO / "README.md").read_text())


def test_readme_has_the_commands_we_expect() -> None:
    commands = readme_commands()
    assert commands[0] == "make sft dpo"  # the Quick start
    assert "alignpipe stage=sft data=file data.sft.path=my.jsonl" in commands
    assert "alignpipe stage=dpo data=file data.pairs.path=hh.jsonl" in commands
    assert len(commands) >= 25


def test_every_readme_command_composes_validates_and_plans(tmp_path, builtin_models_dir) -> None:
    commands = readme_commands()
    coverage = check_commands(
        commands, tmp_path / "runs", builtin_models_dir, run_for_real=("sft",)
    )
    print(f"README: {coverage.commands} commands, {coverage.jobs} jobs, ran {coverage.ran}")
    assert coverage.commands == len(commands)
    assert coverage.ran == ["toy/sft"]  # `make sft dpo` really trained its SFT parent
    assert coverage.jobs > coverage.commands  # sweeps were expanded into their jobs
    assert not list((tmp_path / "runs").glob("*/dpo"))  # dry runs wrote nothing


@pytest.mark.slow
def test_readme_chain_runs_for_real(tmp_path, builtin_models_dir) -> None:
    """SFT, RM and DPO of the toy experiment really run (FAST); PPO / eval then plan clean."""
    coverage = check_commands(
        readme_commands(), tmp_path / "runs", builtin_models_dir, run_for_real=("sft", "rm", "dpo")
    )
    assert coverage.ran[:3] == ["toy/sft", "toy/dpo", "toy/rm"]


@pytest.mark.parametrize(
    ("command", "says"),
    [
        ("alignpipe stage=dpo stage.bta=0.1", "did you mean stage.beta"),
        ("make sft EXP=nope", "Could not find 'experiment/nope'"),
        ('make dpo ARGS="stage.beta=-1"', "stage.beta=-1.0 must be > 0"),
        ("make frontir", "No rule to make target"),
        ("make sweep SWEEP=nope", "no conf/sweep/nope.yaml"),
        ("alignpipe --hlep", "unrecognized arguments: --hlep"),
        ("alignpipe stage=dpo data=file data.pairs.path=missing.jsonl", "no such file"),
        ("make dpo EXP=toy_lora", "needs the 'sft' stage of experiment 'toy_lora'"),
        ("alignpipe -m stage=dpo stage.beta=0.1,-2", "stage.beta=-2.0 must be > 0"),
    ],
)
def test_a_broken_readme_command_fails_the_check(tmp_path, command, says) -> None:
    markdown = f"# Quick start\n\n```bash\nmake sft   # fine\n{command}   # broken\n```\n"
    commands = shell_commands(markdown)
    assert commands[1] == shlex.join(shlex.split(command))
    with pytest.raises(AssertionError, match=r"README command|fails") as err:
        check_commands(commands, tmp_path / "runs", tmp_path / "builtin")
    assert says in str(err.value)
