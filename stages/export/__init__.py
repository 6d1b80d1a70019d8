"""Export stage: config schema (``config``) and recipe (``recipe``, imported only to run)."""
