"""The report's statistics: an arm's spread at one point, the interval of the difference between two arms, the
verdict it supports, and the distance to the noise floor. Pure functions of numbers (no pandas), documented in
docs/report.md and in each report's footer (`FOOTER`).

Choices, and why:

- Several seeds per arm: the spread is the sample std over seeds (it holds training *and* evaluation noise).
  The difference between two arms gets a t interval, because with the 2-5 seeds such sweeps have a bootstrap
  over seeds is degenerate (3 values have 10 distinct resamples) and undercovers badly, while the t interval is
  exact for normal errors and robust enough at these sizes. Seeds both arms share are paired
  (scipy.stats.ttest_rel on the per-seed differences): the harness gives stages of one seed the same batches and
  noise (common random numbers), so pairing removes what the arms share. Without two shared seeds: Welch's t
  (scipy.stats.ttest_ind, equal_var=False), which does not assume equal spreads.
- One run per arm (or one side with a single run): each run's evaluation carries a bootstrap std of its FID over
  the generated and reference features (harness.evaluate); the difference's std is the two stds combined in
  quadrature and the interval normal: d +/- z * sqrt(s_a^2 + s_b^2). Arms scored against the same reference set
  share its noise, which partly cancels in the difference, so treating the two as independent is conservative
  (wider). This interval covers *evaluation* noise only, not seed-to-seed training noise: between single runs a
  relative difference under MIN_SINGLE_RUN_EFFECT is never called, whatever the interval says.
- A winner is named only when the 95% interval of the difference excludes zero; otherwise "within noise", with
  the interval. Run folders evaluated before the bootstrap existed have no interval: "untested", never a winner.
- An arm whose FID (or KID) is above FLOOR_FACTOR times the noise floor (the metric between two disjoint real
  sets at the evaluation's counts) is "not yet converged": differences there say little about the final models.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

CONFIDENCE = 0.95
FLOOR_FACTOR = 2.0  # an arm above FLOOR_FACTOR x the noise floor is "not yet converged"
MIN_SINGLE_RUN_EFFECT = 0.05  # between single runs, a relative difference under 5% is never called
LOWER_IS_BETTER = frozenset({"fid", "kid", "kid_std", "loss"})  # precision, recall, isc: higher is better
DISTANCE_METRICS = frozenset({"fid", "kid"})  # metrics whose floor is a distance ("far above" it = unconverged)

FOOTER = [
    f"Intervals are {CONFIDENCE:.0%}. Spread: with several seeds per arm, mean ± sample std over seeds (n); with "
    "one run, ± the evaluation's bootstrap std over generated and reference features (KID: from its bootstrap "
    "interval; method and resamples as recorded by the evaluation).",
    "Difference between arms at a budget: seeds both arms share are paired (t interval of the per-seed "
    "differences, scipy.stats.ttest_rel); other seeds: Welch's t interval (scipy.stats.ttest_ind, "
    "equal_var=False); one run per arm: normal interval from the two bootstrap stds in quadrature (conservative: "
    "the shared reference set's noise partly cancels; covers evaluation noise only).",
    "A winner is named only when the interval excludes zero (and, between single runs, the difference is at "
    f"least {MIN_SINGLE_RUN_EFFECT:.0%}); otherwise 'within noise'. Without recorded spread (older run folders): "
    "'untested'.",
    f"Not yet converged: FID or KID above {FLOOR_FACTOR:g}x the noise floor, the same metric between two "
    "disjoint real sets at the evaluation's counts.",
    "Cost to reach: the first crossing of the target on each arm's measured curve, FID linear in log(cost) "
    "between the two bracketing evaluations. Ratio interval: per-seed ratios (t interval of the mean log ratio, "
    "scipy.stats.ttest_1samp) where seeds are shared; otherwise the crossing re-solved with the arm's curve "
    "shifted by ± z·sqrt(std_point² + std_target²) (bootstrap stds for single runs, z normal; standard errors "
    "of seed means, z from t with min(n)-1 degrees of freedom).",
]


def z_value() -> float:
    from scipy import stats

    return float(stats.norm.ppf(0.5 + CONFIDENCE / 2))


def t_value(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, df))


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def run_std(value_std: float, ci_low: float, ci_high: float, metric: str = "") -> float:
    """One evaluation's std: its bootstrap std, else the half-width of its 95% interval over z, else NaN. For KID
    the interval comes first: the recorded kid_std is torch-fidelity's spread of *subset* estimates, wider than
    the full-sample estimate's (it stands in only where no bootstrap interval was recorded)."""
    from_interval = (ci_high - ci_low) / (2 * z_value()) if _finite(ci_low) and _finite(ci_high) else math.nan
    if metric == "kid" and _finite(from_interval):
        return from_interval
    return float(value_std) if _finite(value_std) else from_interval


@dataclass(frozen=True)
class Sample:
    """One arm at one point: a value per run (seed), each run's own evaluation std and noise floor."""

    values: tuple[float, ...]
    seeds: tuple[object, ...] = ()
    stds: tuple[float, ...] = ()
    floors: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n if self.n else math.nan

    @property
    def spread(self) -> float:
        """Sample std over seeds (n > 1), else the single run's evaluation std (NaN: unknown)."""
        if self.n > 1:
            m = self.mean
            return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))
        return self.stds[0] if self.n == 1 and self.stds else math.nan

    @property
    def standard_error(self) -> float:
        """Of the mean: std / sqrt(n) over seeds, or the single run's evaluation std."""
        return self.spread / math.sqrt(self.n) if self.n > 1 else self.spread

    @property
    def floor(self) -> float:
        known = [f for f in self.floors if _finite(f)]
        return sum(known) / len(known) if known else math.nan


@dataclass(frozen=True)
class Difference:
    """arm - reference, with its interval and the verdict it supports."""

    estimate: float
    low: float
    high: float
    relative: float  # estimate / reference mean
    method: str
    verdict: str  # 'lower' | 'higher' (the arm's value against the reference's) | 'within noise' | 'untested'
    note: str = ""

    @property
    def has_interval(self) -> bool:
        return _finite(self.low) and _finite(self.high)

    def winner(self, arm: str, reference: str, metric: str) -> str | None:
        """The better of the two, or None when the numbers do not say."""
        if self.verdict not in ("lower", "higher"):
            return None
        return arm if (self.verdict == "lower") == (metric in LOWER_IS_BETTER) else reference


def _t_interval(result) -> tuple[float, float]:
    interval = result.confidence_interval(CONFIDENCE)
    return float(interval.low), float(interval.high)


def compare(arm: Sample, reference: Sample) -> Difference:
    """The difference arm - reference at one point, its interval and verdict (module docstring)."""
    from scipy import stats

    if not arm.n or not reference.n:
        return Difference(math.nan, math.nan, math.nan, math.nan, "", "untested", "no evaluation to compare")
    shared = [s for s in dict.fromkeys(arm.seeds) if s is not None and s in reference.seeds]
    single = arm.n == 1 and reference.n == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # identical values: scipy warns, the interval is exact
        if arm.n > 1 and reference.n > 1 and len(shared) >= 2:
            a = [arm.values[arm.seeds.index(s)] for s in shared]
            b = [reference.values[reference.seeds.index(s)] for s in shared]
            estimate = sum(x - y for x, y in zip(a, b)) / len(a)
            low, high = _t_interval(stats.ttest_rel(a, b))
            method = f"paired t over {len(shared)} shared seeds"
            if not _finite(low):  # every pair differs by the same amount
                low = high = estimate
        elif arm.n > 1 and reference.n > 1:
            estimate = arm.mean - reference.mean
            low, high = _t_interval(stats.ttest_ind(list(arm.values), list(reference.values), equal_var=False))
            method = f"Welch t, {arm.n} vs {reference.n} seeds"
        else:
            estimate = arm.mean - reference.mean
            se = math.hypot(arm.standard_error, reference.standard_error)
            low, high = estimate - z_value() * se, estimate + z_value() * se
            method = ("bootstrap stds in quadrature" if single else
                      "normal, single-run bootstrap std and seed-mean standard error in quadrature")
    relative = estimate / reference.mean if reference.mean else math.nan
    if not (_finite(low) and _finite(high)):
        return Difference(estimate, math.nan, math.nan, relative, method, "untested",
                          "no spread recorded for these evaluations")
    if low <= 0 <= high:
        return Difference(estimate, low, high, relative, method, "within noise")
    if single and _finite(relative) and abs(relative) < MIN_SINGLE_RUN_EFFECT:
        return Difference(estimate, low, high, relative, method, "within noise",
                          f"under {MIN_SINGLE_RUN_EFFECT:.0%} between single runs: not called")
    return Difference(estimate, low, high, relative, method, "lower" if high < 0 else "higher")


def floor_multiple(value: float, floor: float) -> float:
    """value / floor, NaN when the floor is unknown or not positive (a KID floor can be ~0 or below)."""
    return value / floor if _finite(value) and _finite(floor) and floor > 0 else math.nan


def converged(value: float, floor: float, metric: str) -> bool | None:
    """False when a distance metric sits above FLOOR_FACTOR x its floor; None when that cannot be said."""
    multiple = floor_multiple(value, floor)
    if metric not in DISTANCE_METRICS or not _finite(multiple):
        return None
    return multiple <= FLOOR_FACTOR

