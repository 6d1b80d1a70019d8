"""Where a stage's wall time goes: exclusive seconds per phase, for the manifest and the
one-line summary every stage prints at its end.

A stage run is split into the phases users ask about when a run is slow: loading weights,
preparing data (including sampling on-policy pairs), training, evaluating and saving. Phases
nest (the comparison at the end loads nothing, but pair sampling may run inside a data
phase that a recipe opened): the innermost phase gets the time, so the phases never count a
second twice and ``other`` (start-up checks, hashing the parent, tracker set-up) is simply
the wall time no phase claimed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# In the order a stage usually goes through them; the summary line keeps this order.
PHASES = ("load", "data", "train", "eval", "save")


class PhaseClock:
    """Exclusive wall-clock seconds per phase (``time.perf_counter``), from ``start()`` on."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._stack: list[str] = []
        self._mark = 0.0  # when the innermost open phase (or "no phase") last took the clock
        self._started: float | None = None

    def start(self) -> None:
        self._started = self._mark = time.perf_counter()

    def _charge(self, now: float) -> None:
        """Give the time since the last mark to the innermost open phase."""
        if self._stack:
            name = self._stack[-1]
            self._seconds[name] = self._seconds.get(name, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; one of {', '.join(PHASES)}")
        if self._started is None:  # work outside `with stage:` (checks before it) is not timed
            yield
            return
        self._charge(time.perf_counter())
        self._stack.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._stack.pop()

    def report(self) -> PhaseTimes:
        """Wall seconds since ``start()``, split into the phases that ran and the rest."""
        now = time.perf_counter()
        seconds = dict(self._seconds)
        if self._stack:  # asked from inside a phase: charge it up to now
            name = self._stack[-1]
            seconds[name] = seconds.get(name, 0.0) + now - self._mark
        total = now - self._started if self._started is not None else 0.0
        return PhaseTimes(
            seconds=total,
            phases={name: seconds[name] for name in PHASES if name in seconds},
            other=max(total - sum(seconds.values()), 0.0),
        )


@dataclass(frozen=True)
class PhaseTimes:
    seconds: float  # wall time of the stage
    phases: dict[str, float]  # exclusive seconds of each phase that ran, in PHASES order
    other: float  # what no phase claimed: start-up checks, hashing the parent, tracking

    def as_manifest(self) -> dict[str, object]:
        return {
            "seconds": round(self.seconds, 2),
            "phases": {name: round(value, 2) for name, value in self.phases.items()},
            "other": round(self.other, 2),
        }

    def tracker_summary(self) -> dict[str, float]:
        """For the W&B run summary, to compare where runs spend their time."""
        return {
            "time/total_s": round(self.seconds, 2),
            **{f"time/{name}_s": round(value, 2) for name, value in self.phases.items()},
            "time/other_s": round(self.other, 2),
        }

    def summary(self, stage: str) -> str:
        """``dpo: 115.4 s | load 0.1 · data 39.6 · train 73.2 · eval 2.5 · save 0.0 · other 0.0``"""
        parts = [f"{name} {value:.1f}" for name, value in self.phases.items()]
        parts.append(f"other {self.other:.1f}")
        return f"{stage}: {self.seconds:.1f} s | " + " · ".join(parts)
