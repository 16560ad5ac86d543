"""Cost to reach a quality: the training cost at which an arm's measured curve first reaches a target value.

The paper's claim is about speed ("fast distribution learners": the same FID for less training), so the report
asks, for targets taken from the scratch arm's curve, how much each arm had to spend to get there:

- `first_reach(curve, target)`: walk the evaluations in order of cost; the first one at or below the target
  (for FID; at or above for a higher-is-better metric) and the one before it bracket the crossing, and the cost
  is interpolated between them with the metric linear in log(cost):
  log c = log c0 + (v0 - target) / (v0 - v1) * (log c1 - log c0). A curve already at the target at its first
  evaluation reached it *at or before* that cost (`Reach.first`); one that never gets there is "not reached"
  (NaN). Only the first crossing counts: a curve that later wanders back above the target has still reached it.
- `ratio_from_intervals(curve, ref_cost, target, target_std, z)`: the ratio of the arm's cost to the reference's
  cost, with an interval from the uncertainty of the measured points: the curve is shifted, point by point, by
  -/+ z * sqrt(std_i**2 + target_std**2) (its own std and the target's, in quadrature: the crossing is where
  curve - target changes sign) and the crossing solved again. The down-shifted curve gives the low end, the
  up-shifted one the high end (`inf` when the shifted curve never reaches the target). With one run per arm the
  stds are the evaluations' bootstrap stds and z the normal quantile; with several unpaired seeds they are the
  standard errors of the seed means and z a t quantile (see harness.report_stats).
- `ratio_from_pairs(ratios)`: with seeds shared by both arms, one ratio per seed: their geometric mean and a
  t interval of the mean log ratio (scipy.stats.ttest_1samp), back-transformed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Curve:
    """An arm's measured points in increasing cost (> 0), with each point's std (NaN: unknown)."""

    costs: tuple[float, ...]
    values: tuple[float, ...]
    stds: tuple[float, ...]

    @classmethod
    def of(cls, costs: Sequence[float], values: Sequence[float], stds: Sequence[float] | None = None) -> "Curve":
        """Sorted by cost; points without a positive cost or a value are left out (they cannot be placed)."""
        stds = list(stds) if stds is not None else [math.nan] * len(costs)
        points = sorted((c, v, s) for c, v, s in zip(map(_float, costs), map(_float, values), map(_float, stds))
                        if math.isfinite(c) and c > 0 and math.isfinite(v))
        return cls(tuple(p[0] for p in points), tuple(p[1] for p in points), tuple(p[2] for p in points))

    def shifted(self, offsets: Sequence[float]) -> "Curve":
        return Curve(self.costs, tuple(v + o for v, o in zip(self.values, offsets)), self.stds)


@dataclass(frozen=True)
class Reach:
    cost: float  # NaN: not reached
    first: bool = False  # reached at the first evaluation already: the cost is an upper bound ("at or before")

    @property
    def reached(self) -> bool:
        return not math.isnan(self.cost)


def _float(x: object) -> float:
    """A plain float of any number (numpy and pandas scalars too); NaN for what is not one (None, pd.NA)."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def first_reach(curve: Curve, target: float, lower_is_better: bool = True) -> Reach:
    """The cost at which `curve` first reaches `target`, interpolated in log(cost) between the two bracketing
    evaluations (module docstring)."""
    if not _finite(target):
        return Reach(math.nan)
    sign = 1.0 if lower_is_better else -1.0
    previous = None
    for cost, value in zip(curve.costs, curve.values):
        if sign * value <= sign * target:
            if previous is None:
                return Reach(cost, first=True)
            c0, v0 = previous
            fraction = (sign * v0 - sign * target) / (sign * v0 - sign * value)
            return Reach(math.exp(math.log(c0) + fraction * (math.log(cost) - math.log(c0))))
        previous = (cost, value)
    return Reach(math.nan)


@dataclass(frozen=True)
class Ratio:
    """An arm's cost to reach a target over the reference arm's, with a 95% interval (NaN: none; high = inf:
    the pessimistic end never reaches the target within the measured curve)."""

    ratio: float  # NaN: not reached
    low: float = math.nan
    high: float = math.nan
    at_or_before: bool = False  # the point estimate is an upper bound (reached at the first evaluation)
    low_at_or_before: bool = False  # so is the low end: the optimistic curve is there at its first evaluation
    method: str = ""
    note: str = ""

    @property
    def has_interval(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))


def ratio_from_intervals(curve: Curve, ref_cost: float, target: float, target_std: float, z: float,
                         lower_is_better: bool = True, method: str = "") -> Ratio:
    """Point ratio from `curve` itself; interval from the curve shifted by -/+ z * sqrt(std_i^2 + target_std^2)
    (module docstring). No interval when a std is unknown."""
    if not (_finite(ref_cost) and ref_cost > 0):
        return Ratio(math.nan, method=method, note="the reference never reaches the target")
    point = first_reach(curve, target, lower_is_better)
    ratio = point.cost / ref_cost
    stds = [math.hypot(s, target_std) for s in curve.stds]
    if not curve.costs or not all(_finite(s) for s in stds):
        return Ratio(ratio, at_or_before=point.first, method=method,
                     note="no interval: the evaluations carry no spread")
    toward = -1.0 if lower_is_better else 1.0  # the shift that makes the arm reach the target sooner
    soon = first_reach(curve.shifted([toward * z * s for s in stds]), target, lower_is_better)
    late = first_reach(curve.shifted([-toward * z * s for s in stds]), target, lower_is_better)
    low = soon.cost / ref_cost  # the sooner curve always reaches it when the point curve does
    high = late.cost / ref_cost if late.reached else math.inf
    if math.isnan(low):  # not reached even by the optimistic curve: nothing to bound
        return Ratio(math.nan, method=method, note="not reached, even within the evaluations' noise")
    return Ratio(ratio, low, high, at_or_before=point.first, low_at_or_before=soon.first, method=method)


def ratio_from_pairs(ratios: Sequence[float], confidence: float = 0.95, method: str = "") -> Ratio:
    """Per-seed ratios (NaN: that seed did not reach the target) -> geometric mean with a t interval of the mean
    log ratio (scipy.stats.ttest_1samp), back-transformed; none when a seed did not reach it."""
    from scipy import stats

    ratios = [float(r) for r in ratios]
    missed = sum(1 for r in ratios if not (_finite(r) and r > 0))
    if missed:
        return Ratio(math.nan, method=method, note=f"not reached by {missed} of {len(ratios)} seeds")
    logs = [math.log(r) for r in ratios]
    mean = sum(logs) / len(logs)
    if len(logs) < 2:
        return Ratio(math.exp(mean), method=method, note="one seed: no interval")
    if max(logs) - min(logs) <= 1e-12 * max(1.0, abs(mean)):  # identical ratios: no spread to test
        return Ratio(math.exp(mean), math.exp(mean), math.exp(mean), method=method)
    interval = stats.ttest_1samp(logs, 0.0).confidence_interval(confidence)
    return Ratio(math.exp(mean), math.exp(interval.low), math.exp(interval.high), method=method)
