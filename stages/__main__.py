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
    from stages.core.sweep import from_hydra
    from stages.runner import run  # heavy imports only after the config composed

    # Multirun jobs get their own run dir (paths.variant), W&B group and tags; run() itself
    # only ever sees a plain config.
    metrics = run(from_hydra(cfg))
    objective = cfg.get("objective")  # the Optuna sweeper optimises this metric
    if not objective:
        return metrics
    if objective not in metrics:
        raise KeyError(
            f"objective={objective!r} is not a metric of stage {cfg.stage.name!r}; "
            f"it reported: {sorted(metrics)}"
        )
    return float(metrics[objective])


if __name__ == "__main__":
    main()
