"""Data recipes: pure, seeded loaders, normalisers and preference-pair generators."""
