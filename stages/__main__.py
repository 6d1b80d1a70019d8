"""`alignpipe` / `python -m stages`: a thin Hydra entry point around ``stages.runner.run``.

alignpipe stage=sft
alignpipe stage=dpo peft=qlora experiment=toy stage.beta=0.05
alignpipe -m stage=dpo stage.beta=0.05,0.1,0.3      # one run dir + W&B run per job
alignpipe -m +sweep=dpo_optuna                      # a named sweep from conf/sweep/
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from stages import config_files
from stages.cli_help import print_help, wants_help
from stages.core.cli_errors import reported_user_errors
from stages.core.console import quiet_console
from stages.core.run_paths import check_command_line
from stages.registry import register_configs

CONF_DIR = str(config_files.CONF_DIR)  # the checkout's conf/, or the wheel's copy

if __name__ == "__main__" or Path(sys.argv[0]).name == "alignpipe":
    # Our --help page, before Hydra parses argv (stages/cli_help.py); then the console
    # filters, before torch / transformers / bitsandbytes are imported (stages/core/console.py).
    if wants_help(sys.argv[1:]):
        sys.exit(print_help(sys.argv[1:]))
    quiet_console()

register_configs()


def main() -> Any:
    """`alignpipe`: check a single run's config before any heavy import, then run it."""
    overrides = sys.argv[1:]
    with reported_user_errors():  # run-dir names of every job, before Hydra makes its sweep dir
        check_command_line(overrides)
    if is_plain_single_run(overrides):
        with reported_user_errors():
            cfg = preflight(overrides)
            if cfg.get("dry_run"):
                raise SystemExit(dry_run(cfg, overrides))
            from stages.core.plan import check_startable

            check_startable(cfg, overrides)
    elif is_plain_multirun(overrides):
        with reported_user_errors():
            for job in sweep_value_probes([a for a in overrides if a not in MULTIRUN_FLAGS]):
                preflight(job)
    return hydra_main()


MULTIRUN_FLAGS = ("-m", "--multirun")


def is_plain_multirun(argv: list[str]) -> bool:
    """`-m` plus overrides only (no --cfg, --info, ...)."""
    flags = [arg for arg in argv if arg.startswith("-")]
    return bool(flags) and all(flag in MULTIRUN_FLAGS for flag in flags)


def sweep_value_probes(overrides: list[str]) -> list[list[str]]:
    """Configs that together try every value of every command-line choice sweep once
    (``stage.beta=0.1,-2`` -> one config per beta), so a typo or a bad value in any of them
    fails before the first job starts. Range / interval sweeps and a sweep file's params are
    checked by each job as it starts."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override() and isinstance(o.value(), ChoiceSweep)]
    if len(sweeps) < sum(o.is_sweep_override() for o in parsed):
        return []  # another kind of sweep: leave composing to Hydra's sweeper
    values = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in sweeps]
    first = [choices[0] for choices in values]
    probes = [[*fixed, *first]]
    for i, choices in enumerate(values):
        probes += [[*fixed, *first[:i], choice, *first[i + 1 :]] for choice in choices[1:]]
    return probes


def is_plain_single_run(argv: list[str]) -> bool:
    """Only overrides (no -m, --cfg, ...): a run we can compose and check up front.
    Multirun jobs are checked one by one as they start (in hydra_main)."""
    return not any(arg.startswith("-") for arg in argv)


def preflight(overrides: list[str]) -> DictConfig:
    """Compose and validate as Hydra will, in about a second: every config problem is
    reported at once, before torch / transformers / trl load and before any directory exists.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from stages.core.schema import validate_config

    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()  # hydra_main initialises its own
    validate_config(cfg)
    if not cfg.model.name_or_path.startswith("builtin:"):  # loadable here? (no torch)
        from stages.core.model_sources import check_model_source, check_training_length_fits

        check_model_source(cfg.model.name_or_path, cfg.model.revision)
        check_training_length_fits(cfg.model.name_or_path, cfg.model.revision, cfg.model.max_length)
    return cfg


def dry_run(cfg: DictConfig, overrides: list[str] | None = None) -> int:
    """Print the plan (stages.core.plan); returns the exit status (0 ready, 2 blocked)."""
    from stages.core.plan import build_plan

    plan = build_plan(cfg, overrides)
    print(plan.render(), flush=True)
    return plan.exit_status


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> Any:
    from stages.core.handoff import stage_dir
    from stages.core.sweep import from_hydra

    # Multirun jobs get their own run dir (paths.variant), W&B group and tags; run() itself
    # only ever sees a plain config.
    job_cfg = from_hydra(cfg)
    paths = job_cfg.paths
    run_dir = stage_dir(paths.runs_root, job_cfg.experiment_name, job_cfg.stage.name, paths.variant)
    with reported_user_errors(run_dir=run_dir):
        from stages.core.runtime import adopt_submitit_ranks
        from stages.runner import run  # heavy imports only after the config composed

        adopt_submitit_ranks()  # a multi-task Slurm job trains data-parallel, like accelerate
        metrics = run(job_cfg)
        return objective_value(metrics, cfg.get("objective"), cfg.stage.name)


def objective_value(metrics: dict[str, Any], objective: str | None, stage: str) -> Any:
    """What the job returns to Hydra: the metric a sweeper (Optuna) optimises, or all of them."""
    if not objective:
        return metrics
    value = metrics.get(objective)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"objective={objective!r} is not a numeric metric of stage {stage!r} "
            f"(got {value!r}); it reported: {sorted(metrics)}"
        )
    return float(value)


if __name__ == "__main__":
    main()
