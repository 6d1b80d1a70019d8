"""Row accounting for a data source: rows read, kept, and dropped by reason.

Every loader and filter in `data_recipes` counts into a `RowAccount`; the stage adds the
reasons that need a tokenizer (too long for `model.max_length`) and writes the result to the
run manifest and the log, so the numbers there are what the trainer really trained on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from data_recipes.rows import DataFormatError

# Why a row was dropped, in the words the log and errors use.
DROP_REASONS: dict[str, str] = {
    "empty": "reply is empty",
    "duplicate": "repeats an earlier row",
    "identical_pair": "chosen == rejected",
    "decontaminated": "prompt is a held-out eval prompt",
    "tie": "every sample of the prompt scored the same",
    "below_min_margin": "judge margin below data.pairs.min_margin",
    "length_ratio": "chosen longer than data.pairs.max_length_ratio x rejected",
    "too_long": "longer than model.max_length tokens",
}
# Reasons that are a configured selection, not a loss of the user's rows: they do not count
# towards data.max_dropped_fraction (on-policy pairs drop ~40% of prompts as ties by design).
SELECTION_REASONS: frozenset[str] = frozenset({"tie", "below_min_margin", "length_ratio"})


class NoRowsLeftError(DataFormatError):
    """Every row of a data source was dropped: nothing is left to train on."""


@dataclass
class RowAccount:
    """How many rows a data source yielded, and why each dropped row was dropped.

    ``truncated`` counts rows that were kept but cut to ``model.max_length`` (SFT);
    ``max_length`` is that limit, once a stage has checked lengths.
    """

    source: str  # the file path, or the recipe name for generated data
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    max_length: int | None = None
    unit: str = "rows"  # what one row is, in messages: "prompts" for on-policy pairs

    def drop(self, reason: str, count: int = 1) -> None:
        if reason not in DROP_REASONS:
            raise ValueError(f"unknown drop reason {reason!r}; known: {sorted(DROP_REASONS)}")
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    @property
    def kept(self) -> int:
        return self.read - sum(self.dropped.values())

    def lost_fraction(self) -> float:
        """Share of the rows read that were dropped for other than a configured selection."""
        lost = sum(n for reason, n in self.dropped.items() if reason not in SELECTION_REASONS)
        return lost / self.read if self.read else 0.0

    def as_manifest(self) -> dict[str, Any]:
        return {
            "rows_read": self.read,
            "rows_kept": self.kept,
            "rows_dropped": dict(sorted(self.dropped.items())),
            "rows_truncated": self.truncated,
        }

    def describe_dropped(self) -> str:
        """'too_long 9 (longer than ...), duplicate 2 (...)', or 'none'."""
        if not self.dropped:
            return "none"
        return ", ".join(
            f"{reason} {n} ({self._meaning(reason)})" for reason, n in sorted(self.dropped.items())
        )

    def _meaning(self, reason: str) -> str:
        if reason == "too_long" and self.max_length is not None:
            return f"longer than model.max_length={self.max_length} tokens"
        return DROP_REASONS[reason]

    def summary(self) -> str:
        """One log line: where from, read, kept, dropped by reason, truncated."""
        text = (
            f"{self.source}: {self.read} {self.unit} read, {self.kept} kept, "
            f"{self.read - self.kept} dropped"
        )
        if self.dropped:
            text += " (" + ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) + ")"
        if self.truncated:
            text += (
                f", {self.truncated} of the kept truncated to model.max_length={self.max_length}"
            )
        return text

    def no_rows_left(self, hint: str) -> NoRowsLeftError:
        """The error for a source with no row left: what was read, why each group went."""
        return NoRowsLeftError(
            f"none of the {self.read} {self.unit} read is left to train on. Dropped: "
            f"{self.describe_dropped()}",
            path=self.source,
            expected="at least one row that passes the filters",
            hint=hint,
        )
