"""Our PPO for RLHF (trl >= 1.13 has none): rollout, advantages, losses, roles, trainer.

Behaviour follows trl 1.12.0's ``trl.experimental.ppo`` and "The N Implementation Details of
RLHF with PPO" (Huang et al.); see each module's docstring for what it owns. ``stage.py`` is
the Hydra stage (``alignpipe stage=ppo``) that assembles them.

Only ``config`` is imported eagerly: the typed config schema inherits ``PPOHyperparams``, and
validating a config must not import torch. Everything else loads on first use.
"""

from importlib import import_module
from typing import Any

from stages.ppo.config import PPOConfigError, PPOHyperparams

_LAZY = {
    "PPORoles": "stages.ppo.roles",
    "SeparateRoles": "stages.ppo.roles",
    "SharedBaseRoles": "stages.ppo.roles",
    "Rollout": "stages.ppo.rollout",
    "RolloutSettings": "stages.ppo.rollout",
    "collect_rollout": "stages.ppo.rollout",
    "PPOTrainer": "stages.ppo.trainer",
}

__all__ = ["PPOConfigError", "PPOHyperparams", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stages.ppo' has no attribute {name!r}")
