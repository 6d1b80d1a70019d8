"""RLOO stage: config schema (``config``) and recipe (``recipe``, imported only to run).

The recipe is GRPO's (`stages.grpo.recipe.run_online_rl`) with TRL's RLOOTrainer.
"""
