"""The validation split of a stage's training rows: seeded, exact in size, grouped by prompt.

A stage holds out a share of the rows it would train on (after the data accounting dropped
the too-long ones) to evaluate during training and pick the best checkpoint. Rows are grouped
by prompt (``prompts.prompt_key``: all demonstrations, pairs or labelled replies of a prompt
land on the same side), so the validation loss never scores a prompt the model trained on.
The task's held-out eval prompts never reach a stage's training rows, so they are disjoint
from this split by construction.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from data_recipes.prompts import prompt_key

Row = TypeVar("Row")

# Salt of the shuffle: the split must not coincide with the other seeded splits of the same
# rows (data.pairs.heldout_fraction keys its own hash by seed and prompt too).
_SALT = "alignpipe-validation"


def sft_row_prompt(row: dict[str, Any]) -> str:
    """Prompt key of a conversational SFT row: its last user turn before the final reply."""
    messages = row["messages"]
    return prompt_key(
        messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    )


def preference_row_prompt(row: dict[str, Any]) -> str:
    """Prompt key of a preference pair or a labelled (KTO) reply: its ``prompt``."""
    return prompt_key(row["prompt"])


def split_validation(
    rows: Sequence[Row], fraction: float, seed: int, prompt_of: Callable[[Row], str]
) -> tuple[list[int], list[int]]:
    """Indices of (train, validation) rows: ``ceil(fraction * prompts)`` distinct prompts,
    drawn with ``random.Random`` seeded by ``seed``, with every row of those prompts.

    Both index lists keep the rows' order. Raises ``ValueError`` when ``fraction`` is outside
    [0, 1) or the rows have fewer than two distinct prompts (nothing to split)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    if fraction == 0:
        return list(range(len(rows))), []
    keys = [prompt_of(row) for row in rows]
    distinct = sorted(set(keys))  # sorted: the draw must not depend on the rows' order
    if len(distinct) < 2:
        raise ValueError(
            f"{len(rows)} rows with {len(distinct)} distinct prompt(s): a validation split "
            "needs at least 2 prompts (one to train on, one to validate)"
        )
    count = min(math.ceil(fraction * len(distinct)), len(distinct) - 1)
    held = set(random.Random(f"{_SALT}:{seed}").sample(distinct, count))
    train = [i for i, key in enumerate(keys) if key not in held]
    validation = [i for i, key in enumerate(keys) if key in held]
    return train, validation
