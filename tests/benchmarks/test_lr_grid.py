"""The claim benchmark's learning-rate sweep: which rate it keeps and when it extends its grid."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from lr_grid import LrSweep, best_rate, is_bracketed, next_rate, rounded, sweep_learning_rate  # noqa: E402


def valley(optimum: float):
    """A loss that is lowest at `optimum` and rises with the log-distance from it, as a learning-rate sweep does."""
    return lambda lr: 3.0 + (math.log2(lr) - math.log2(optimum)) ** 2


def measured(loss, calls: list[list[float]]):
    def measure(rates: list[float]) -> dict[float, float]:
        calls.append(list(rates))
        return {lr: loss(lr) for lr in rates}

    return measure


def test_an_optimum_inside_the_grid_is_kept_without_extending() -> None:
    calls: list[list[float]] = []
    sweep = sweep_learning_rate(measured(valley(6e-3), calls), 3e-3)
    assert calls == [[1.5e-3, 3e-3, 6e-3, 1.2e-2]]  # the whole grid at once, so its arms train side by side
    assert sweep.best == 6e-3 and sweep.bracketed


@pytest.mark.parametrize(
    ("optimum", "added"), [(4.8e-2, [2.4e-2, 4.8e-2, 9.6e-2]), (3.75e-4, [7.5e-4, 3.75e-4, 1.875e-4])]
)
def test_an_optimum_beyond_an_end_extends_the_grid_until_it_is_bracketed(optimum: float, added: list[float]) -> None:
    calls: list[list[float]] = []
    sweep = sweep_learning_rate(measured(valley(optimum), calls), 3e-3)
    assert [rate for call in calls[1:] for rate in call] == added
    assert sweep.best == rounded(optimum) and sweep.bracketed


def test_the_extension_budget_bounds_a_sweep_that_never_turns() -> None:
    calls: list[list[float]] = []
    sweep = sweep_learning_rate(measured(lambda lr: 10 - lr, calls), 1e-3, max_extensions=2)
    assert len(calls) == 3 and max(sweep.losses) == 1.6e-2
    assert sweep.best == 1.6e-2 and not sweep.bracketed  # reported as not bracketed, never silently


def test_a_diverged_run_is_never_best_and_ties_go_to_the_lower_rate() -> None:
    assert best_rate({1e-3: 3.2, 2e-3: float("nan"), 4e-3: 3.1, 8e-3: math.inf}) == 4e-3
    assert best_rate({1e-3: 3.0, 2e-3: 3.0, 4e-3: 3.5}) == 1e-3
    with pytest.raises(ValueError, match="every learning rate diverged"):
        best_rate({1e-3: float("nan")})
    # a rate that diverged above the best still brackets it: higher rates are worse
    assert is_bracketed({1e-3: 3.2, 2e-3: 3.1, 4e-3: float("nan")})
    assert next_rate({1e-3: 3.2, 2e-3: 3.1, 4e-3: float("nan")}) is None


def test_rates_are_stored_rounded_so_a_grid_point_is_found_again() -> None:
    assert rounded(3e-3 * 0.5 * 2) == 3e-3 and rounded(0.1 + 0.2) == 0.3
    sweep = LrSweep({1.5e-3: 3.3, 3e-3: 3.2, 6e-3: 3.25})
    assert LrSweep.from_json(sweep.to_json()) == sweep and sweep.to_json()["best"] == 3e-3
