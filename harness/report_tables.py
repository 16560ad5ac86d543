"""The report's tables and one-line conclusions, in plain strings: the summary table that leads the report, the
matched-budget tables and the final evaluations that follow in its details.

A matched-budget cell is each arm's evaluation nearest at or below the budget level (an arm is never credited
with cost it has not paid), pooled over the arm's seeds; every comparison with the reference arm carries the
interval of the difference and the verdict of harness.report_stats (a winner only when the interval clears
zero, else 'within noise'), and every arm its distance to the noise floor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from harness.report_data import BUDGETS, Data, budget_levels, evals_of, last_evals, select_at
from harness.report_format import (
    Table,
    fmt_budget,
    fmt_interval,
    fmt_multiple,
    fmt_relative,
    fmt_signed,
    fmt_spread,
    fmt_value,
)
from harness.report_reach import ReachRow, fmt_ratio, fmt_reach
from harness.report_stats import (
    FLOOR_FACTOR,
    LOWER_IS_BETTER,
    Difference,
    Sample,
    compare,
    converged,
    floor_multiple,
    run_std,
)


@dataclass
class Cell:
    """One arm at one budget level, pooled over its seeds."""

    sample: Sample
    budget: float  # the (mean) budget actually spent at the chosen evaluations
    where: str  # 'stage@step' of the chosen evaluation(s)
    second: float  # the second metric (KID beside FID) at the same evaluations
    marks: str  # 'running' / 'failed' when the arm is unfinished and could still change the cell

    @property
    def mean(self) -> float:
        return self.sample.mean

    @property
    def std(self) -> float:
        return self.sample.spread

    @property
    def n(self) -> int:
        return self.sample.n

    def value_text(self) -> str:
        return fmt_spread(self.mean, self.std, self.n)


def sample_of(rows: list[pd.Series]) -> Sample:
    return Sample(tuple(float(r.value) for r in rows), tuple(None if pd.isna(r.seed) else int(r.seed) for r in rows),
                  tuple(run_std(r.value_std, r.ci_low, r.ci_high, r.metric) for r in rows),
                  tuple(float(r.floor) for r in rows))


def pooled_cell(data: Data, evals: pd.DataFrame, group: str, column: str, level: float, other: str | None) -> Cell:
    picked = []
    for member, points in evals[evals.group == group].groupby("member", sort=False):
        row = select_at(points, column, level)
        if row is not None:
            picked.append(row)
    marks = ", ".join(sorted({s for s in data.status[group] if s != "done"}))
    if not picked:
        return Cell(Sample(()), math.nan, "", math.nan, marks)
    seconds = [_other_metric(data, r, other) for r in picked]
    where = sorted({f"{r.stage}@{int(r.step)}" for r in picked})
    return Cell(sample_of(picked), float(pd.Series([r[column] for r in picked]).mean()), "/".join(where),
                float(pd.Series(seconds).mean()), marks)


def _other_metric(data: Data, row: pd.Series, metric: str | None) -> float:
    if metric is None:
        return math.nan
    r = data.records
    hit = r[(r.member == row.member) & (r.stage_id == row.stage_id) & (r.step == row.step) & (r.metric == metric)]
    return float(hit.value.iloc[0]) if len(hit) else math.nan


def floor_text(sample: Sample, metric: str) -> str:
    """'2.5×, not converged', '1.7×', or '—' where no floor was computed."""
    multiple = floor_multiple(sample.mean, sample.floor)
    if math.isnan(multiple):
        return "—"
    state = converged(sample.mean, sample.floor, metric)
    return fmt_multiple(multiple) + (", not converged" if state is False else "")


def difference_text(diff: Difference, scale: float) -> str:
    """'-10.00 [-12.12, -7.88] (-33.3%)'."""
    if math.isnan(diff.estimate):
        return "—"
    relative = f"{diff.relative * 100:+.1f}%" if not math.isnan(diff.relative) else "—"
    return f"{fmt_signed(diff.estimate, scale)} {fmt_interval(diff.low, diff.high, scale)} ({relative})"


def verdict_text(diff: Difference, group: str, reference: str, metric: str) -> str:
    """'two_stage better (lower FID)', 'within noise', 'untested (no spread recorded ...)'."""
    winner = diff.winner(group, reference, metric)
    if winner is not None:
        return f"{winner} better ({'lower' if metric in LOWER_IS_BETTER else 'higher'} {metric.upper()})"
    if diff.verdict == "untested":
        return f"untested ({diff.note or 'no interval'})"
    return diff.verdict + (f" ({diff.note})" if diff.note else "")


def _versus(data: Data, group: str, cells: dict[str, Cell], metric: str) -> tuple[str, str, Difference | None]:
    """The 'vs reference' and 'verdict' cells: '—' for a reference itself, 'no match' where none is comparable."""
    ref = data.reference_of(group)
    if ref == group:
        return "—", "reference", None
    if ref is None:
        return "no match", "", None
    diff = compare(cells[group].sample, cells[ref].sample)
    return difference_text(diff, cells[ref].mean), verdict_text(diff, group, ref, metric), diff


# ---------------------------------------------------------------------------------------------------- matched budgets

def matched_table(data: Data, metric: str, budget: str) -> tuple[Table, list[str]]:
    """The matched-budget table of one budget, and its one-line conclusions."""
    column, label = BUDGETS[budget]
    evals = evals_of(data, metric)
    other = next((m for m in ("kid", "fid") if m != metric and (data.records.metric == m).any()), None)
    groups = data.groups()
    m = metric.upper()
    cols = ["budget level", "level from", "arm", "evaluation used", f"{label} spent", m]
    cols += [other.upper()] if other else []
    table = Table(f"{m} at equal {label}", cols + ["× floor", f"vs {data.reference} [95% CI]", "verdict"],
                  note=f"Each arm's evaluation nearest at or below the budget level, pooled over seeds; the "
                       f"difference is against '{data.reference}' of the same sweep point at the same level, with "
                       f"its 95% interval (negative = lower {m}); the verdict names a winner only when the interval "
                       f"excludes zero. '× floor': {m} over the noise floor (above {FLOOR_FACTOR:g}×: not yet "
                       f"converged). 'no match': no such '{data.reference}', see the notes.")
    unfinished = [g for g in groups if not data.is_done(g)]
    conclusions = []
    for level, sources in budget_levels(evals, data.reference_groups(), column, unfinished):
        cells = {g: pooled_cell(data, evals, g, column, level, other) for g in groups}
        for g, c in cells.items():
            state = "" if not c.marks else f" ({c.marks})"
            versus, verdict, _ = _versus(data, g, cells, metric)
            row = [fmt_budget(budget, level), ", ".join(sources), g + state, c.where or "—",
                   fmt_budget(budget, c.budget), c.value_text()]
            row += [fmt_value(c.second)] if other else []
            table.rows.append(row + [floor_text(c.sample, metric), versus, verdict if c.n else "—"])
        for g in groups:
            line = _conclusion(data, cells, g, sources, f"Equal {label}", fmt_budget(budget, level), metric)
            conclusions += [line] if line else []
    return table, list(dict.fromkeys(conclusions))


def _conclusion(data: Data, cells: dict[str, Cell], group: str, sources: list[str], equal: str, level: str,
                metric: str) -> str | None:
    """The comparison of `group` with its reference at a level that is either one's whole budget (or latest
    evaluation, while unfinished): the difference with its interval and the verdict it supports, the unfinished
    and unconverged runs named."""
    ref = data.reference_of(group)
    if ref is None or ref == group:
        return None
    c, r = cells[group], cells[ref]
    ends = [name for name in sorted({ref, group}) if data.end_label(name) in sources]
    if not ends or math.isnan(c.mean) or math.isnan(r.mean):
        return None
    done = [n for n in ends if data.is_done(n)]
    so_far = [n for n in ends if not data.is_done(n)]
    whose = " = ".join(([" = ".join(done) + "'s full budget"] if done else [])
                       + ([" = ".join(so_far) + "'s latest evaluation"] if so_far else []))
    diff = compare(c.sample, r.sample)
    marks = [f"{name} {cell.marks}" for name, cell in ((group, c), (ref, r)) if cell.marks]
    marks += [f"{name} not yet converged ({fmt_multiple(floor_multiple(cell.mean, cell.sample.floor))} floor)"
              for name, cell in ((group, c), (ref, r)) if converged(cell.mean, cell.sample.floor, metric) is False]
    m = metric.upper()
    return (f"{equal}, {whose} ({level}): {group} {m} {c.value_text()} vs {ref} {r.value_text()}: "
            f"{difference_text(diff, r.mean)} -> {verdict_text(diff, group, ref, metric)}"
            + (f" [{'; '.join(marks)}]." if marks else "."))


# ---------------------------------------------------------------------------------------------------- final / summary

def _finals(data: Data, evals: pd.DataFrame) -> dict[str, list[pd.Series]]:
    return {g: last_evals(evals[evals.group == g]) for g in data.groups()}


def final_table(data: Data, metric: str) -> Table:
    evals = evals_of(data, metric)
    table = Table(f"Final {metric.upper()} per arm", ["arm", "status", "evaluation", "total steps", "images",
                                                       "FLOPs", "device-hours", metric.upper(), "× floor",
                                                       f"vs {data.reference}"],
                  note=f"The last evaluation of each arm, with its cumulative cost (pretraining included); the change "
                       f"is relative to the last evaluation of '{data.reference}' of the same sweep point.")
    finals = _finals(data, evals)
    means = {g: sample_of(last).mean for g, last in finals.items()}
    for g in data.groups():
        status = "/".join(sorted(set(data.status[g])))
        last = finals[g]
        ref = data.reference_of(g)
        versus = "—" if ref == g else "no match" if ref is None else fmt_relative(means[g], means[ref])
        if not last:
            table.rows.append([g, status] + ["—"] * 7 + [versus if ref != g else "—"])
            continue
        frame = pd.DataFrame(last)
        sample = sample_of(last)
        table.rows.append([
            g, status, "/".join(sorted({f"{r.stage}@{int(r.step)}" for r in last})),
            fmt_budget("steps", frame.total_steps.astype(float).mean()), fmt_budget("images", frame.images_seen.mean()),
            fmt_budget("flops", frame.train_flops.mean()), fmt_budget("hours", frame.device_hours.mean()),
            fmt_spread(sample.mean, sample.spread, sample.n), floor_text(sample, metric), versus])
    return table


def summary_table(data: Data, metric: str, lead: str, reach: list[ReachRow]) -> Table:
    """The lead table: per arm its final quality with spread, distance to the floor, what it spent, the cost at
    which it reached the reference's final value, and the verdict at the reference's full budget."""
    column, label = BUDGETS[lead]
    evals = evals_of(data, metric)
    m = metric.upper()
    table = Table("Summary", ["arm", "status", f"final {m}", "× floor", f"{label}", f"reaches {data.reference}'s "
                              f"final {m} at", f"verdict at {data.reference}'s budget"],
                  note=f"Final {m}: mean ± std over seeds (n), or ± the evaluation's bootstrap std for one run. "
                       f"'Reaches': the {label} at which the arm first gets to the reference's final {m}, and that "
                       f"as a share of the reference's cost [95% interval]. Verdict: each arm's evaluation at or "
                       f"below the reference's full budget against the reference's final one, difference [95% "
                       f"interval]; a winner only when the interval excludes zero.")
    finals = _finals(data, evals)
    final_reach = {(r.group, r.reference): r for r in reach if r.final}
    for g in data.groups():
        status = "/".join(sorted(set(data.status[g])))
        last = finals[g]
        if not last:
            table.rows.append([g, status, "—", "—", "—", "—", "no evaluation yet"])
            continue
        sample = sample_of(last)
        spent = pd.Series([r[column] for r in last], dtype=float).mean()
        ref = data.reference_of(g)
        not_converged = converged(sample.mean, sample.floor, metric) is False
        if ref is None:
            reached, verdict = "no match", "not compared (see notes)"
        else:
            row = final_reach.get((g, ref))
            reached = "—" if row is None else _reach_cell(lead, row)
            verdict = "reference" if ref == g else _budget_verdict(data, evals, g, ref, column, metric)
        if not_converged:
            verdict += "; not yet converged"
        table.rows.append([g, status, fmt_spread(sample.mean, sample.spread, sample.n), floor_text(sample, metric),
                           fmt_budget(lead, spent), reached, verdict])
    return table


def _reach_cell(budget: str, row: ReachRow) -> str:
    reach, ratio = row.costs[budget], row.ratios[budget]
    if row.group == row.reference:
        return fmt_reach(budget, reach) + " (itself)"
    if not reach.reached:
        return fmt_ratio(ratio)
    return f"{fmt_reach(budget, reach)} = {fmt_ratio(ratio)}"


def _budget_verdict(data: Data, evals: pd.DataFrame, group: str, ref: str, column: str, metric: str) -> str:
    """Both arms at the reference's full (or latest) budget: the costliest seed's last evaluation."""
    level = pd.Series([r[column] for r in last_evals(evals[evals.group == ref])], dtype=float).max()
    if math.isnan(level):
        return "—"
    arm, base = (pooled_cell(data, evals, g, column, level, None) for g in (group, ref))
    if not arm.n:
        return f"no evaluation within {ref}'s budget"
    diff = compare(arm.sample, base.sample)
    return f"{verdict_text(diff, group, ref, metric)}: {difference_text(diff, base.mean)}"
