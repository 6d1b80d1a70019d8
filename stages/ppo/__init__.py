"""Our PPO for RLHF (trl >= 1.13 has none): rollout, advantages, losses, roles, trainer.

Behaviour follows trl 1.12.0's ``trl.experimental.ppo`` and "The N Implementation Details of
RLHF with PPO" (Huang et al.); see each module's docstring for what it owns.
"""

from stages.ppo.config import PPOConfigError, PPOHyperparams
from stages.ppo.roles import PPORoles, SeparateRoles, SharedBaseRoles
from stages.ppo.rollout import Rollout, RolloutSettings, collect_rollout
from stages.ppo.trainer import PPOTrainer

__all__ = [
    "PPOConfigError",
    "PPOHyperparams",
    "PPORoles",
    "PPOTrainer",
    "Rollout",
    "RolloutSettings",
    "SeparateRoles",
    "SharedBaseRoles",
    "collect_rollout",
]
