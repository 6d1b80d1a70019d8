"""`alignpipe` / `python -m stages`: a thin Hydra entry point around ``stages.runner.run``.

    alignpipe stage=sft
    alignpipe stage=dpo peft=qlora experiment=toy stage.beta=0.05
    alignpipe -m stage=dpo stage.beta=0.05,0.1,0.3
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
    from stages.runner import run  # heavy imports only after the config composed

    metrics = run(cfg)
    objective = cfg.get("objective")  # the Optuna sweeper optimises this metric
    return metrics.get(objective) if objective else metrics


if __name__ == "__main__":
    main()
