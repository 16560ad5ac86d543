"""Conclusions that follow the numbers: intervals of differences (seeds paired, Welch, single-run bootstrap),
'within noise' against a named winner, the noise floor and 'not yet converged', cost to reach in the report,
and run folders evaluated before any of it existed."""
from __future__ import annotations

import math

import numpy as np
import pytest
from fixtures.synthetic_runs import FLOOR_FID, final_pair, standard_experiment
from scipy import stats

from harness.cost_to_reach import Curve, first_reach, ratio_from_pairs
from harness.report import build_report, write_report
from harness.report_data import load_data
from harness.report_figures import curve_figure
from harness.report_render import to_markdown
from harness.report_stats import FLOOR_FACTOR, Sample, compare, converged, run_std

Z = stats.norm.ppf(0.975)


def summary_rows(report) -> dict[str, list[str]]:
    return {row[0]: row for row in report.summary.rows}


def verdict(report, arm: str = "two_stage") -> str:
    return summary_rows(report)[arm][-1]


def sweep(root, pairs, paired=True, fid_std=None):
    """One experiment per seed: (scratch final FID, two_stage final FID) for each."""
    return [final_pair(root, f"seed{i}", s, t, seed=i, two_stage_seed=i if paired else 10 + i, fid_std=fid_std).dir
            for i, (s, t) in enumerate(pairs)]


# ---------------------------------------------------------------------------------------------------- statistics

def test_single_runs_combine_their_bootstrap_stds_in_quadrature():
    d = compare(Sample((20.0,), (0,), (0.6,)), Sample((30.0,), (0,), (0.8,)))
    assert d.estimate == -10.0 and (d.low, d.high) == pytest.approx((-10 - Z, -10 + Z))  # sqrt(.36 + .64) = 1
    assert d.verdict == "lower" and d.winner("a", "b", "fid") == "a" and d.winner("a", "b", "recall") == "b"
    assert d.method == "bootstrap stds in quadrature"


def test_shared_seeds_are_paired_and_other_seeds_get_welch():
    a, b = (20.5, 21.0, 19.2), (30.0, 31.5, 29.2)
    paired = compare(Sample(a, (0, 1, 2)), Sample(b, (0, 1, 2)))
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (paired.low, paired.high) == pytest.approx((expected.low, expected.high))
    assert paired.method == "paired t over 3 shared seeds" and paired.verdict == "lower"
    welch = compare(Sample(a, (0, 1, 2)), Sample(b, (3, 4, 5)))
    expected = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (welch.low, welch.high) == pytest.approx((expected.low, expected.high))
    assert welch.method == "Welch t, 3 vs 3 seeds"


def test_an_evaluations_std_prefers_the_bootstrap():
    assert run_std(0.6, 18.0, 22.0, "fid") == 0.6  # fid_boot_std as recorded
    assert run_std(math.nan, 18.0, 22.0, "fid") == pytest.approx(2.0 / Z)  # from the interval
    assert run_std(0.05, 0.01, 0.03, "kid") == pytest.approx(0.01 / Z)  # KID: the bootstrap, not the subset std
    assert run_std(0.05, math.nan, math.nan, "kid") == 0.05  # older rows: the subset std stands in
    assert math.isnan(run_std(math.nan, math.nan, math.nan, "fid"))


def test_without_spread_nothing_is_called():
    d = compare(Sample((20.0,), (0,), (math.nan,)), Sample((30.0,), (0,), (math.nan,)))
    assert d.verdict == "untested" and d.winner("a", "b", "fid") is None and not d.has_interval


def test_convergence_against_the_floor():
    assert converged(FLOOR_FACTOR * 10 + 0.1, 10.0, "fid") is False
    assert converged(FLOOR_FACTOR * 10, 10.0, "fid") is True
    assert converged(30.0, math.nan, "fid") is None and converged(0.5, 0.4, "precision") is None
    assert converged(0.01, -0.001, "kid") is None  # a KID floor at or below zero says nothing


# ---------------------------------------------------------------------------------------------------- verdicts

def test_two_single_runs_from_the_same_distribution_are_within_noise(tmp_path):
    """FID 30.0 against 30.8, each ± 0.9 (bootstrap): +0.8 ± 1.96 * 1.27 includes zero."""
    report = build_report(load_data([final_pair(tmp_path, "same", 30.0, 30.8, fid_std=0.9).dir]), "t")
    half = Z * math.hypot(0.9, 0.9)
    assert verdict(report) == (f"within noise: +0.80 [{0.8 - half:+.2f}, {0.8 + half:+.2f}] (+2.7%); "
                               "not yet converged")  # 30.8 > 2 x the floor of 12
    assert not any("better" in line for line in report.detail_lines if "scratch's full budget (0.1 h)" in line)
    assert any("scratch's full budget (0.1 h)" in line and "(+2.7%) -> within noise [" in line
               for line in report.detail_lines)


def test_several_seeds_from_the_same_distribution_are_within_noise(tmp_path):
    rng = np.random.default_rng(0)
    scratch, two_stage = np.round(rng.normal(30, 1.5, 5), 2), np.round(rng.normal(30, 1.5, 5), 2)
    report = build_report(load_data(sweep(tmp_path / "sweep", zip(scratch, two_stage))), "t")
    ci = stats.ttest_rel(two_stage, scratch).confidence_interval(0.95)
    diff = float(np.mean(two_stage - scratch))
    assert ci.low < 0 < ci.high
    assert verdict(report).startswith(f"within noise: {diff:+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]")
    row = summary_rows(report)["two_stage"]
    assert row[2] == f"{two_stage.mean():.2f} ± {two_stage.std(ddof=1):.2f} (n=5)"


def test_a_clear_difference_names_the_winner_with_its_interval(tmp_path):
    report = build_report(load_data([standard_experiment(tmp_path).dir]), "t")
    assert verdict(report) == "two_stage better (lower FID): -10.00 [-12.12, -7.88] (-33.3%)"
    seeds = build_report(load_data(sweep(tmp_path / "sweep", [(30.0, 20.5), (31.5, 21.0), (29.2, 19.2)])), "t")
    ci = stats.ttest_rel([20.5, 21.0, 19.2], [30.0, 31.5, 29.2]).confidence_interval(0.95)
    relative = -10 / (90.7 / 3)
    assert verdict(seeds) == f"two_stage better (lower FID): -10.00 [{ci.low:+.2f}, {ci.high:+.2f}] ({relative:+.1%})"


def test_unpaired_seeds_are_compared_with_welch(tmp_path):
    report = build_report(load_data(sweep(tmp_path / "sweep", [(30.0, 20.5), (31.5, 21.0), (29.2, 19.2)],
                                          paired=False)), "t")
    ci = stats.ttest_ind([20.5, 21.0, 19.2], [30.0, 31.5, 29.2], equal_var=False).confidence_interval(0.95)
    assert f"[{ci.low:+.2f}, {ci.high:+.2f}]" in verdict(report)


def test_a_few_percent_between_single_runs_is_never_a_conclusion(tmp_path):
    """29.0 vs 30.0 with a tiny bootstrap std: the interval excludes zero, but 3.3% between two single runs
    (evaluation noise only; no seed-to-seed spread measured) is not called."""
    report = build_report(load_data([final_pair(tmp_path, "close", 30.0, 29.0, fid_std=0.05).dir]), "t")
    assert verdict(report).startswith("within noise (under 5% between single runs: not called): -1.00 [")
    assert not any("two_stage better" in line for line in report.detail_lines if "(-3.3%)" in line)


# ---------------------------------------------------------------------------------------------------- floor

def test_the_noise_floor_is_in_the_report_and_in_the_figure_data(tmp_path):
    exp = standard_experiment(tmp_path)
    data = load_data([exp.dir])
    report = build_report(data, "t")
    assert ("Noise floor: FID 12.00 between two disjoint real sets of 100 and 400 images (the evaluations score "
            "100 samples against 400 reference images).") in report.notes
    rows = summary_rows(report)
    assert rows["scratch"][3] == "2.5×, not converged" and rows["scratch"][-1] == "reference; not yet converged"
    assert rows["two_stage"][3] == "1.7×" and "not yet converged" not in rows["two_stage"][-1]
    figure = curve_figure(data, "fid", "hours")
    assert figure.floor == (FLOOR_FID, FLOOR_FID) and "100 vs 400" in figure.floor_label
    assert figure.boundaries == [("two_stage", pytest.approx(0.02))]  # fine-tuning starts after 0.02 h
    assert figure.target == 30.0 and figure.reached == [("two_stage", pytest.approx(math.sqrt(0.045 * 0.07)))]
    finetune = next(s for s in figure.series if s.stage == "finetune")
    assert finetune.low[-1] == pytest.approx(20 - Z * 0.6, abs=1e-6) and finetune.n == [1, 1]


def test_a_reduced_or_missing_floor_is_labelled(tmp_path):
    note = "the dataset holds 300 images: split 150/150, not 100/400"
    exp = final_pair(tmp_path, "small", 30.0, 20.0, floor_fid=15.0, floor_n_a=150, floor_n_b=150, floor_note=note)
    data = load_data([exp.dir])
    report = build_report(data, "t")
    assert any(line.startswith("Noise floor: FID 15.00 between two disjoint real sets of 150 and 150 images")
               and line.endswith(f"; {note}.") for line in report.notes)
    assert "reduced split" in curve_figure(data, "fid", "hours").floor_label
    none = build_report(load_data([final_pair(tmp_path, "nofloor", 30.0, 20.0, floor_fid=math.nan).dir]), "t")
    assert summary_rows(none)["scratch"][3] == "—"
    assert any("have no noise floor" in line for line in none.notes)
    why = "no noise floor: the dataset holds 40 images, fewer than two sets of 25"
    failed = final_pair(tmp_path, "nosplit", 30.0, 20.0, floor_fid=math.nan, floor_n_a=0, floor_n_b=0, floor_note=why)
    assert f"5 of 5 evaluations have no noise floor ({why}): those arms are not marked converged or not." in \
        build_report(load_data([failed.dir]), "t").notes


# ---------------------------------------------------------------------------------------------------- cost to reach

def test_the_report_gives_the_cost_to_reach_scratchs_final_fid(tmp_path):
    """two_stage crosses FID 30 between 0.045 h (FID 40 ± 1.2) and 0.07 h (20 ± 0.6): halfway in FID, so at
    sqrt(0.045 * 0.07) h; scratch needs 0.1 h. Interval: the curve shifted by ± z * sqrt(std² + 0.9²)."""
    report = build_report(load_data([standard_experiment(tmp_path).dir]), "t")

    def crossing(sign):
        hi, lo = 40 + sign * Z * math.hypot(1.2, 0.9), 20 + sign * Z * math.hypot(0.6, 0.9)
        fraction = (hi - 30) / (hi - lo)
        return math.exp(math.log(0.045) + fraction * math.log(0.07 / 0.045)) / 0.1

    point = math.sqrt(0.045 * 0.07) / 0.1
    cell = summary_rows(report)["two_stage"][5]
    assert cell == f"0.0561 h = {point:.1%} [{crossing(-1):.1%}, {crossing(+1):.1%}]"
    assert summary_rows(report)["scratch"][5] == "0.1 h (itself)"
    [table] = report.sections
    steps = next(r for r in table.rows if r[:2] == ["30.00 (scratch final)", "two_stage"])[2]
    assert steps.startswith(f"1,369 = {math.sqrt(1250 * 1500) / 1000:.0%}")  # more steps, each cheaper
    assert any(line.startswith(f"two_stage reaches scratch final FID (30.00) at {point:.1%}") for line in report.notes)


def test_cost_to_reach_with_seeds_pairs_their_ratios(tmp_path):
    pairs = [(30.0, 20.0), (31.0, 23.0), (29.0, 24.0)]
    dirs = sweep(tmp_path / "sweep", pairs)
    report = build_report(load_data(dirs), "t")
    ratios = []
    for scratch, two_stage in pairs:  # each seed against its own scratch run's final FID
        curve = Curve.of([0.02, 0.045, 0.07], [200.0, 1.5 * two_stage, two_stage])
        ratios.append(first_reach(curve, scratch).cost / 0.1)
    expected = ratio_from_pairs(ratios)
    cell = summary_rows(report)["two_stage"][5]
    assert cell.endswith(f"= {expected.ratio * 100:.3g}% [{expected.low * 100:.3g}%, {expected.high * 100:.3g}%]")
    assert expected.low < expected.ratio < expected.high
    assert any("paired over 3 shared seeds" in line for line in report.notes)


def test_an_arm_that_never_gets_there_is_not_reached(tmp_path):
    report = build_report(load_data([final_pair(tmp_path, "slow", 30.0, 45.0).dir]), "t")
    assert summary_rows(report)["two_stage"][5].startswith("not reached")
    assert any(line.startswith("two_stage does not reach scratch final FID (30.00)") for line in report.notes)


# ---------------------------------------------------------------------------------------------------- old folders

def test_run_folders_without_the_new_keys_still_report_and_say_there_is_no_interval(tmp_path):
    exp = standard_experiment(tmp_path, legacy=True)
    [html] = write_report(exp.dir, show=False)
    report = build_report(load_data([exp.dir]), "t")
    assert verdict(report) == "untested (no spread recorded for these evaluations): -10.00 [no interval] (-33.3%)"
    assert summary_rows(report)["scratch"][3] == "—"
    assert summary_rows(report)["two_stage"][5] == "0.0561 h = 56.1% (no interval)"
    assert any(line.startswith("No uncertainty recorded for 7 of 7 FID evaluations") for line in report.notes)
    assert not any("better" in line for line in report.detail_lines)
    assert html.is_file() and "untested" in html.read_text()


def test_markdown_leads_with_the_figure_and_summary_and_folds_the_details(tmp_path):
    md = to_markdown(build_report(load_data([standard_experiment(tmp_path).dir]), "t"))
    order = [md.index(s) for s in ("![", "## Summary", "## Cost to reach", "<details>", "### FID at equal",
                                   "</details>", "**Statistics.**")]
    assert order == sorted(order)
    footer = md[md.index("**Statistics.**"):]
    assert "scipy.stats.ttest_rel" in footer and "quadrature" in footer and f"{FLOOR_FACTOR:g}x" in footer
    assert "percentile-shifted with 200 resamples" in footer  # as the evaluations recorded it


def test_figure_error_bars_are_t_intervals_of_the_seed_means(tmp_path):
    pairs = [(30.0, 20.5), (31.5, 21.0), (29.2, 19.2)]
    figure = curve_figure(load_data(sweep(tmp_path / "sweep", pairs)), "fid", "flops")
    scratch = next(s for s in figure.series if s.group == "scratch")
    finals = [p[0] for p in pairs]
    half = stats.t.ppf(0.975, 2) * np.std(finals, ddof=1) / math.sqrt(3)
    assert scratch.n == [3, 3] and scratch.y[-1] == pytest.approx(np.mean(finals))
    assert (scratch.low[-1], scratch.high[-1]) == pytest.approx((np.mean(finals) - half, np.mean(finals) + half))
    assert figure.boundaries == [("two_stage", pytest.approx(20_000))]  # pretraining's FLOPs
