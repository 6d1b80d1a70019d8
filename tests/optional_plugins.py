"""Whether an optional Hydra plugin (the `optuna` / `slurm` extras) is installed."""

from __future__ import annotations

import importlib.util


def hydra_plugin_installed(module: str) -> bool:
    """True when ``hydra_plugins.<module>`` can be imported.

    ``find_spec("hydra_plugins.x")`` imports the parent package first and raises
    ModuleNotFoundError when no Hydra plugin at all is installed (no ``hydra_plugins``
    namespace), which would abort test collection instead of skipping.
    """
    try:
        return importlib.util.find_spec(f"hydra_plugins.{module}") is not None
    except ModuleNotFoundError:
        return False
