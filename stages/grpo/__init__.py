"""GRPO stage: config schema (``config``) and recipe (``recipe``, imported only to run).

RLOO (``stages/rloo``) is the same recipe with RLOO's trainer and advantage: both share the
online-RL knobs (`OnlineRLStageConfig`) and the recipe body (`recipe.run_online_rl`) here.
"""
