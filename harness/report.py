"""Comparison reports: does an arm reach a lower FID than the reference at equal cost, does it reach the
reference's FID at less cost, and do the numbers bear either out.

The report leads with one figure (metric against cost for every arm, 95% intervals, the noise floor, the
pretraining / fine-tuning boundary) and one summary table (final quality with spread, cost to reach the
reference's final value, the verdict), then the cost-to-reach table; the matched-budget tables follow in a
collapsible details section, and a footer states the statistics (docs/report.md). The work is split:

- harness.results          run folders -> the records table
- harness.report_data      records of one or more experiments -> arms grouped over seeds, budget levels
- harness.report_stats     spread, intervals of differences, verdicts, the noise floor (scipy.stats)
- harness.cost_to_reach    the first crossing of a target on a curve, in log cost, and its ratio's interval
- harness.report_reach     cost-to-reach rows and table from the records
- harness.report_tables    summary, matched-budget and final tables, one-line conclusions
- harness.report_figures   the figures (their data, then matplotlib)
- harness.report_render    terminal, markdown and HTML
- this module              assembles a Report and writes it
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.report_data import BUDGETS, Data, evals_of, load_data
from harness.report_format import Report, fmt_budget, fmt_value
from harness.report_reach import ReachRow, fmt_ratio, reach_rows, reach_table
from harness.report_render import print_report, write_files
from harness.report_stats import FOOTER
from harness.report_tables import final_table, matched_table, summary_table
from harness.results import write_records, write_table
from harness.run_folder import find_experiments

PLOTTED = ("hours", "flops", "images")
LEAD_BUDGETS = ("hours", "flops", "images", "steps")  # the lead figure's and summary's cost: the first with data


def lead_budget(data: Data, metric: str, budgets: list[str]) -> str:
    """Device-hours (the paper's claim is training time) unless not asked for or not recorded; then FLOPs, ..."""
    evals = evals_of(data, metric)
    for budget in LEAD_BUDGETS:
        if budget in budgets and (evals.empty or evals[BUDGETS[budget][0]].notna().any()):
            return budget
    return budgets[0]


def _unmatched_lines(data: Data) -> list[str]:
    """Why an arm has no 'vs scratch' figures: comparing it with another sweep point's scratch would mislead."""
    lines = []
    for group, refs in data.references.items():
        if len(refs) == 1:
            continue
        if not refs:
            lines.append(f"Arm '{group}' is not compared: none of its sweep points has a '{data.reference}' arm.")
        else:
            lines.append(f"Arm '{group}' is not compared: its runs come from sweep points with different "
                         f"'{data.reference}' arms ({', '.join(refs)}).")
    return lines



def _floor_lines(data: Data, metric: str) -> list[str]:
    """One line per evaluation setting: the noise floor and the counts it was computed at; or why there is none."""
    evals = evals_of(data, metric)
    if evals.empty:
        return []
    m = metric.upper()
    lines = []
    keys = ["n_samples", "n_reference", "floor_n_a", "floor_n_b", "floor_note"]
    for key, rows in evals.dropna(subset=["floor"]).groupby(keys, dropna=False, sort=True):
        n_samples, n_reference, n_a, n_b, note = key
        sizes = (f"two disjoint real sets of {int(n_a)} and {int(n_b)} images" if not (pd.isna(n_a) or pd.isna(n_b))
                 else "two disjoint real sets")
        counts = (f" (the evaluations score {int(n_samples)} samples against {int(n_reference)} reference images)"
                  if not (pd.isna(n_samples) or pd.isna(n_reference)) else "")
        floors = sorted(set(rows.floor.round(6)))
        value = fmt_value(floors[0]) if len(floors) == 1 else f"{fmt_value(floors[0])}-{fmt_value(floors[-1])}"
        lines.append(f"Noise floor: {m} {value} between {sizes}{counts}" + (f"; {note}" if note else "") + ".")
    missing = evals[evals.floor.isna()]
    if len(missing):
        reasons = "; ".join(dict.fromkeys(n for n in missing.floor_note.dropna() if n)) or (
            "evaluated before the harness computed one, or not asked for")
        lines.append(f"{len(missing)} of {len(evals)} evaluations have no noise floor ({reasons}): those arms are "
                     "not marked converged or not.")
    return lines


def _bootstrap_line(data: Data, metric: str) -> list[str]:
    """The footer's account of the evaluations' own bootstrap, as they recorded it."""
    evals = evals_of(data, metric)
    used = sorted({(str(m), int(r)) for m, r in zip(evals.bootstrap_method, evals.bootstrap_resamples)
                   if isinstance(m, str) and m and m != "none" and not pd.isna(r) and r > 0})
    if not used:
        return []
    kinds = ", ".join(f"{method} with {resamples} resamples" for method, resamples in used)
    return [f"Bootstrap of the evaluations (harness.noise, docs/statistics.md): {kinds}, over the generated and "
            "reference features from the evaluation's own Inception pass."]


def _spread_lines(data: Data, metric: str) -> list[str]:
    evals = evals_of(data, metric)
    missing = evals[evals.value_std.isna() & (evals.ci_low.isna() | evals.ci_high.isna())]
    if missing.empty:
        return []
    groups = ", ".join(dict.fromkeys(missing.group))
    return [f"No uncertainty recorded for {len(missing)} of {len(evals)} {metric.upper()} evaluations ({groups}: "
            "run folders evaluated before the harness recorded a bootstrap spread): comparisons that rest on a "
            "single run there have no interval and name no winner ('untested')."]


def _headlines(data: Data, metric: str, lead: str, reach: list[ReachRow]) -> list[str]:
    """'two_stage reaches scratch final FID (30.00) at 56.1% [52.9%, 59.2%] of scratch's device-hours (0.0561 h vs
    0.1 h), 56.1% [52.9%, 59.2%] of its training FLOPs, ... (interval: shifted curve, bootstrap stds).'"""
    lines = []
    label = BUDGETS[lead][1]
    for row in reach:
        if not row.final or row.group == row.reference:
            continue
        ratio, reach_cost = row.ratios[lead], row.costs[lead]
        ref_cost = [r.costs[lead].cost for r in reach if r.final and r.group == r.reference == row.reference]
        if math.isnan(ratio.ratio):
            lines.append(f"{row.group} does not reach {row.target_label} {metric.upper()} "
                         f"({fmt_value(row.target)}) within its evaluations: {fmt_ratio(ratio)}.")
            continue
        against = f" ({fmt_budget(lead, reach_cost.cost)} vs {fmt_budget(lead, ref_cost[0])})" if ref_cost else ""
        others = [f"{fmt_ratio(row.ratios[b])} of its {BUDGETS[b][1]}" for b in LEAD_BUDGETS
                  if b in row.ratios and b != lead]
        lines.append(f"{row.group} reaches {row.target_label} {metric.upper()} ({fmt_value(row.target)}) at "
                     f"{fmt_ratio(ratio)} of {row.reference}'s {label}{against}"
                     + "".join(f", {other}" for other in others)
                     + (f" (interval: {ratio.method})" if ratio.method else "") + ".")
    return lines


def build_report(data: Data, title: str, metric: str = "fid", budgets: list[str] | None = None) -> Report:
    budgets = budgets or list(BUDGETS)
    has_metric = (data.records.metric == metric).any()
    known = ", ".join(sorted(set(data.records.metric.dropna()))) or "none"
    notes = [] if has_metric else [f"No '{metric}' evaluations yet (metrics found: {known})."]
    lead = lead_budget(data, metric, budgets)
    reach = reach_rows(data, metric, budgets) if has_metric else []
    notes += _headlines(data, metric, lead, reach)
    for group, paths in data.external.items():  # e.g. fine-tuning a released MaskDM checkpoint
        notes.append(f"Arm '{group}' starts from an external checkpoint ({', '.join(paths)}): what training it "
                     "cost is not in its budgets, so matched-budget comparisons flatter this arm.")
    notes += _unmatched_lines(data) + _floor_lines(data, metric) + _spread_lines(data, metric)
    details, detail_lines = [final_table(data, metric)], []
    for budget in budgets:
        table, conclusions = matched_table(data, metric, budget)
        details.append(table)
        detail_lines += conclusions
    from harness.report_figures import cost_curves, sample_grids

    lead_name = f"{metric}_vs_cost.png"
    figures = {lead_name: cost_curves(data, metric, lead, lead=True)}
    figures.update({f"{metric}_vs_{b}.png": cost_curves(data, metric, b) for b in PLOTTED
                    if b in budgets and b != lead})
    grid = sample_grids(data)
    if grid is not None:
        figures["samples.png"] = grid
    caption = (f"{metric.upper()} against {BUDGETS[lead][1]} for every arm: 95% intervals as error bars, the noise "
               f"floor as a grey band, dotted verticals where fine-tuning starts, a star where an arm reaches "
               f"{data.reference}'s final {metric.upper()}.")
    sections = [reach_table(data, metric, budgets, reach)] if reach else []
    return Report(title, summary_table(data, metric, lead, reach), notes, sections, details, detail_lines, figures,
                  list(FOOTER) + _bootstrap_line(data, metric), caption)


def write_report(results_dir: str | Path, metric: str = "fid", budgets: list[str] | None = None,
                 console=None, show: bool = True) -> list[Path]:
    """Aggregate and report `results_dir`: one experiment folder, or a folder of experiments (a sweep), where
    each experiment gets its own report and the folder a combined one pooling seeds. Returns the HTML paths."""
    results_dir = Path(results_dir)
    for budget in budgets or []:
        if budget not in BUDGETS:
            raise HarnessError(f"unknown budget '{budget}'; use one of {', '.join(BUDGETS)}")
    experiments = find_experiments(results_dir)
    written = []
    for exp_dir in experiments:
        write_records(exp_dir)
        report = build_report(load_data([exp_dir]), f"{exp_dir.name}: {metric.upper()} against training cost",
                              metric, budgets)
        written.append(write_files(report, exp_dir))
        if show and len(experiments) == 1:
            print_report(report, console, exp_dir)
    if len(experiments) > 1:
        data = load_data(experiments)
        write_table(data.records.drop(columns=["member", "group"]), results_dir)
        report = build_report(data, f"{results_dir.name}: {len(experiments)} experiments, seeds pooled", metric,
                              budgets)
        written.append(write_files(report, results_dir))
        if show:
            print_report(report, console, results_dir)
    return written
