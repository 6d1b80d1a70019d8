"""`alignpipe` / `python -m stages`: a thin Hydra entry point around ``stages.runner.run``.

alignpipe stage=sft
alignpipe stage=dpo peft=qlora experiment=toy stage.beta=0.05
alignpipe -m stage=dpo stage.beta=0.05,0.1,0.3      # one run dir + W&B run per job
alignpipe -m +sweep=dpo_optuna                      # a named sweep from conf/sweep/
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from stages.core.schema import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

register_configs()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    from stages.core.runtime import adopt_submitit_ranks
    from stages.core.sweep import from_hydra
    from stages.runner import run  # heavy imports only after the config composed

    adopt_submitit_ranks()  # a multi-task Slurm job trains data-parallel, like accelerate

    # Multirun jobs get their own run dir (paths.variant), W&B group and tags; run() itself
    # only ever sees a plain config.
    metrics = run(from_hydra(cfg))
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
