"""Cost to reach a quality, against curves worked by hand: log-cost interpolation, first crossing, not reached,
the interval from the shifted curve, per-seed ratios."""
from __future__ import annotations

import math

import pytest

from harness.cost_to_reach import Curve, first_reach, ratio_from_intervals, ratio_from_pairs


def curve(costs, values, stds=None):
    return Curve.of(costs, values, stds)


@pytest.mark.parametrize("target, cost, first", [
    (35.0, 10 ** 1.5, False),  # between (10, 50) and (100, 20): halfway in FID -> halfway in log10 cost
    (50.0, 10.0, False),  # exactly at an evaluation
    (44.0, 10 ** 1.2, False),  # (50 - 44) / 30 = 0.2 of the way from 10 to 100 in log cost
    (100.0, 1.0, True),  # already there at the first evaluation: "at or before"
    (120.0, 1.0, True),
])
def test_first_reach_interpolates_linearly_in_log_cost(target, cost, first):
    reach = first_reach(curve([1, 10, 100], [100, 50, 20]), target)
    assert reach.cost == pytest.approx(cost) and reach.first is first and reach.reached


def test_a_curve_that_never_gets_there_is_not_reached():
    reach = first_reach(curve([1, 10, 100], [100, 50, 20]), 10.0)
    assert not reach.reached and math.isnan(reach.cost)
    assert not first_reach(curve([], []), 10.0).reached


def test_the_first_crossing_counts_even_if_the_curve_comes_back_up():
    # 50 -> 30 crosses 35 between cost 1 and 2 at (50-35)/20 = 0.75: 2 ** 0.75; the later 45 does not undo it
    assert first_reach(curve([1, 2, 4, 8], [50, 30, 45, 25]), 35.0).cost == pytest.approx(2 ** 0.75)


def test_points_are_taken_in_cost_order_and_unplaceable_points_dropped():
    c = curve([100, 1, 10, 0, math.nan], [20, 100, 50, 5, 5])
    assert c.costs == (1.0, 10.0, 100.0) and c.values == (100.0, 50.0, 20.0)


def test_a_higher_is_better_metric_reaches_from_below():
    # precision 0.2 at cost 1, 0.6 at cost 100: 0.5 is 3/4 of the way -> 100 ** 0.75
    reach = first_reach(curve([1, 100], [0.2, 0.6]), 0.5, lower_is_better=False)
    assert reach.cost == pytest.approx(100 ** 0.75)


def test_ratio_interval_re_solves_the_crossing_on_the_shifted_curve():
    """FID 40 at cost 10, 20 at cost 100, std 0.6 each; target 30 with std 0.8: combined std 1.0, z = 2 shifts
    the curve by 2. Point: (40-30)/20 = 0.5 -> 10 ** 1.5; down-shifted (38, 18): 0.4 -> 10 ** 1.4; up-shifted
    (42, 22): 0.6 -> 10 ** 1.6. Over the reference's cost 100."""
    r = ratio_from_intervals(curve([10, 100], [40, 20], [0.6, 0.6]), 100.0, 30.0, 0.8, z=2.0)
    assert (r.ratio, r.low, r.high) == pytest.approx((10 ** -0.5, 10 ** -0.6, 10 ** -0.4))
    assert r.has_interval and not r.at_or_before


def test_ratio_upper_end_not_reached_is_open():
    r = ratio_from_intervals(curve([10, 100], [40, 29], [1.0, 1.0]), 100.0, 30.0, 0.0, z=2.0)
    # point: (40-30)/11 of the way; up-shifted (42, 31) never reaches 30
    assert r.ratio == pytest.approx(10 ** (1 + 10 / 11) / 100)
    assert r.high == math.inf and r.low == pytest.approx(10 ** (1 + 8 / 11) / 100)


def test_an_optimistic_end_at_the_first_evaluation_is_an_upper_bound():
    # down-shifted by 2: (33, 18) reaches 35 at the first evaluation already; up-shifted (37, 22): 2/15 of the way
    r = ratio_from_intervals(curve([10, 100], [35, 20], [1.0, 1.0]), 100.0, 35.0, 0.0, z=2.0)
    assert r.ratio == pytest.approx(0.1) and r.at_or_before is True  # at the first evaluation: at or before it
    assert r.low == pytest.approx(0.1) and r.low_at_or_before is True
    assert r.high == pytest.approx(10 ** (1 + 2 / 15) / 100)


def test_ratio_without_spread_has_no_interval_and_says_so():
    r = ratio_from_intervals(curve([10, 100], [40, 20]), 100.0, 30.0, math.nan, z=1.96)
    assert r.ratio == pytest.approx(10 ** -0.5) and not r.has_interval and "no interval" in r.note


def test_ratio_not_reached_even_within_noise():
    r = ratio_from_intervals(curve([10, 100], [80, 60], [1.0, 1.0]), 100.0, 30.0, 1.0, z=1.96)
    assert math.isnan(r.ratio) and "not reached" in r.note


def test_paired_ratios_give_a_geometric_mean_with_a_t_interval():
    # logs of 0.4, 0.5, 0.625: mean log 0.5 exactly (symmetric in log), sd = ln 1.25, t(0.975, 2) = 4.302653
    r = ratio_from_pairs([0.4, 0.5, 0.625])
    half = 4.302652729911275 * math.log(1.25) / math.sqrt(3)
    assert r.ratio == pytest.approx(0.5)
    assert (r.low, r.high) == pytest.approx((0.5 * math.exp(-half), 0.5 * math.exp(half)))
    assert ratio_from_pairs([0.5, 0.5]).low == pytest.approx(0.5)  # no spread
    missed = ratio_from_pairs([0.5, math.nan, 0.6])
    assert math.isnan(missed.ratio) and missed.note == "not reached by 1 of 3 seeds"
