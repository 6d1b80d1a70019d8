"""Allowed ranges of numeric config knobs, declared next to each schema.

Every int/float field of a config schema names its range in the class's ``BOUNDS`` mapping;
``tests/test_config.py`` walks every numeric field of every schema and fails when one has no
bound, so a new knob cannot ship unchecked. Kept free of Hydra/torch imports: the PPO
hyper-parameters (``stages/ppo/config.py``) use it too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bound:
    """A closed, open or half-open interval; ``None`` means unbounded on that side."""

    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    nullable: bool = False  # None is allowed too (an optional knob switched off)

    def allows(self, value: object) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.low is not None and (
            value < self.low or (value == self.low and not self.low_inclusive)
        ):
            return False
        return not (
            self.high is not None
            and (value > self.high or (value == self.high and not self.high_inclusive))
        )

    def describe(self) -> str:
        """Human wording, e.g. '>= 1', '> 0', 'in [0, 1)', '>= 1 or null'."""
        if self.low is not None and self.high is not None:
            text = (
                f"in {'[' if self.low_inclusive else '('}{_num(self.low)}, "
                f"{_num(self.high)}{']' if self.high_inclusive else ')'}"
            )
        elif self.low is not None:
            text = f"{'>=' if self.low_inclusive else '>'} {_num(self.low)}"
        elif self.high is not None:
            text = f"{'<=' if self.high_inclusive else '<'} {_num(self.high)}"
        else:
            text = "a number"
        return f"{text} or null" if self.nullable else text

    def outside_values(self) -> list[float]:
        """Values just outside the range (what the meta-test feeds every knob)."""
        values: list[float] = []
        if self.low is not None:
            values.append(self.low - 1 if self.low_inclusive else self.low)
        if self.high is not None:
            values.append(self.high + 1 if self.high_inclusive else self.high)
        return values


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def at_least(low: float, *, nullable: bool = False) -> Bound:
    return Bound(low=low, nullable=nullable)


def positive(*, nullable: bool = False) -> Bound:
    return Bound(low=0, low_inclusive=False, nullable=nullable)


def unit_interval(*, low_inclusive: bool = True, high_inclusive: bool = True) -> Bound:
    return Bound(low=0, high=1, low_inclusive=low_inclusive, high_inclusive=high_inclusive)


# Numpy's and torch's seeders take 0 <= seed < 2**32.
SEED = Bound(low=0, high=2**32 - 1)
NULLABLE_SEED = Bound(low=0, high=2**32 - 1, nullable=True)


def out_of_bounds(prefix: str, values: dict[str, object], bounds: dict[str, Bound]) -> list[str]:
    """One problem line per value outside its bound, e.g.
    "stage.warmup_ratio=2.5 must be in [0, 1]"."""
    return [
        f"{prefix}{name}={values[name]!r} must be {bound.describe()}"
        for name, bound in bounds.items()
        if not bound.allows(values[name])
    ]
