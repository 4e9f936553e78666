"""Learning-rate sweeps that bracket the best rate: how the claim benchmark tunes every arm (train_once.py --tune-lr).

A comparison against a baseline holds only when the baseline got the same tuning effort as the method, so every arm
(the elastic run, the full model alone, each twin, each distillation) gets the same procedure: train it at a grid of
peak learning rates around the preset's, then keep extending the grid by one factor beyond whichever end holds the
best loss until the best has a worse rate on both sides (or the extension budget is spent, which the sweep reports
as not bracketed). The arm is then trained on every seed at its best rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# The grid around the preset's rate that every arm starts from (issue: at least 0.5x, 1x, 2x, 4x).
MULTIPLIERS = (0.5, 1.0, 2.0, 4.0)
# Beyond the grid's ends: each extension multiplies (or divides) the best end by FACTOR, at most MAX_EXTENSIONS times.
FACTOR = 2.0
MAX_EXTENSIONS = 3


def rounded(lr: float) -> float:
    """A learning rate as the sweep stores it: 4 significant digits, so 3e-3 * 0.5 * 2 is 3e-3 again."""
    return float(f"{lr:.4g}")


def best_rate(losses: dict[float, float]) -> float:
    """The rate with the lowest loss; a diverged run (NaN or inf) is never best, ties go to the lower rate."""
    if not losses:
        raise ValueError("no learning rate was measured")
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        raise ValueError(f"every learning rate diverged: {sorted(losses)}")
    return min(sorted(finite), key=finite.__getitem__)


def is_bracketed(losses: dict[float, float]) -> bool:
    """Whether a lower and a higher rate than the best were both measured (the optimum lies inside the grid)."""
    best = best_rate(losses)
    return min(losses) < best < max(losses)


def next_rate(losses: dict[float, float], factor: float = FACTOR) -> float | None:
    """The rate to measure next so the best gets a neighbour beyond it, or None when it already has both."""
    if is_bracketed(losses):
        return None
    best = best_rate(losses)
    return rounded(best / factor if best == min(losses) else best * factor)


@dataclass(frozen=True)
class LrSweep:
    """The losses measured at each peak learning rate of one arm, and what the sweep concluded."""

    losses: dict[float, float]

    @property
    def best(self) -> float:
        return best_rate(self.losses)

    @property
    def bracketed(self) -> bool:
        return is_bracketed(self.losses)

    def to_json(self) -> dict:
        return {
            "losses": {repr(lr): loss for lr, loss in sorted(self.losses.items())},
            "best": self.best,
            "bracketed": self.bracketed,
        }

    @classmethod
    def from_json(cls, stored: dict) -> LrSweep:
        return cls({float(lr): float(loss) for lr, loss in stored["losses"].items()})


def sweep_learning_rate(
    measure: Callable[[list[float]], dict[float, float]],
    base_lr: float,
    multipliers: tuple[float, ...] = MULTIPLIERS,
    factor: float = FACTOR,
    max_extensions: int = MAX_EXTENSIONS,
) -> LrSweep:
    """Measure the grid `base_lr * multipliers` in one call (so its arms can train side by side), then extend it one
    rate at a time until the best is bracketed or `max_extensions` rates were added. `measure(rates)` returns the
    validation loss of each rate it was given (NaN for a run that diverged)."""
    grid = sorted({rounded(base_lr * m) for m in multipliers})
    if len(grid) < 2:
        raise ValueError(f"a sweep needs at least two distinct rates, got multipliers {multipliers}")
    losses = dict(measure(grid))
    for _ in range(max_extensions):
        rate = next_rate(losses, factor)
        if rate is None:
            break
        losses.update(measure([rate]))
    return LrSweep(losses)
