"""Cost to reach the reference arm's quality, from the records: the targets are the reference's evaluations (its
final one first, then the earlier ones), and for every arm compared with that reference the cost, in each
budget, at which its measured curve first reaches each target, with the ratio to the reference's own cost.
The curve arithmetic and intervals are harness.cost_to_reach; this module picks curves out of the records.

Curves run along the whole arm (a fine-tuned arm's pretraining evaluations included: the fine-tuning starts
from the pretrained model, so the curve is continuous there). With seeds:
- both arms with >= 2 seeds, >= 2 of them shared: one ratio per shared seed (that seed's reference run gives
  the target and the reference cost), then `ratio_from_pairs`;
- otherwise the seeds' mean curve, each point with the standard error of its mean (a single run: its bootstrap
  std), the interval from the shifted curve (`ratio_from_intervals`; z normal for single runs, else t with
  min(n) - 1 degrees of freedom).
The cost shown is the mean curve's; in the paired case the ratio is the geometric mean of the seeds' ratios.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from harness.cost_to_reach import Curve, Ratio, Reach, first_reach, ratio_from_intervals, ratio_from_pairs
from harness.report_data import BUDGETS, Data, evals_of
from harness.report_format import Table, fmt_budget, fmt_percent, fmt_value
from harness.report_stats import LOWER_IS_BETTER, run_std, t_value, z_value


@dataclass
class ReachRow:
    """One arm against one target: cost per budget on its mean curve, ratio per budget with its interval."""

    group: str
    reference: str
    target: float
    target_label: str
    final: bool  # the target is the reference's last evaluation
    costs: dict[str, Reach] = field(default_factory=dict)
    ratios: dict[str, Ratio] = field(default_factory=dict)


def _std_of(row: pd.Series) -> float:
    return run_std(row.value_std, row.ci_low, row.ci_high, row.metric)


def pooled_points(points: pd.DataFrame, column: str) -> pd.DataFrame:
    """One row per (stage_index, step) over the seeds: x (mean cost), y (mean value), n, and se (standard error
    of the mean over seeds; a single run: its evaluation's std). Sorted by cost."""
    rows = []
    for (index, step), at in points.groupby(["stage_index", "step"], sort=True):
        n = len(at)
        sem = at.value.std() / math.sqrt(n) if n > 1 else _std_of(at.iloc[0])
        rows.append({"stage_index": int(index), "step": int(step), "stage": at.stage.iloc[0],
                     "x": at[column].mean(), "y": at.value.mean(), "n": n, "se": sem,
                     "total_steps": at.total_steps.astype(float).mean()})
    frame = pd.DataFrame(rows, columns=["stage_index", "step", "stage", "x", "y", "n", "se", "total_steps"])
    return frame.sort_values(["total_steps"]).reset_index(drop=True)


def _curve(points: pd.DataFrame) -> Curve:
    return Curve.of(list(points.x), list(points.y), list(points["se"]))


def _member_seed(rows: pd.DataFrame) -> object:
    seeds = rows.sort_values("stage_index").seed.dropna()
    return int(seeds.iloc[-1]) if len(seeds) else None


def _members(evals: pd.DataFrame, group: str) -> dict[object, pd.DataFrame]:
    """seed -> that run's evaluations (runs without a seed, or repeating one, are left out of pairing)."""
    out: dict[object, pd.DataFrame] = {}
    for _, rows in evals[evals.group == group].groupby("member", sort=False):
        seed = _member_seed(rows)
        if seed is not None and seed not in out:
            out[seed] = rows
    return out


def _member_curve(rows: pd.DataFrame, column: str) -> Curve:
    return Curve.of(list(rows[column]), list(rows.value), [_std_of(r) for _, r in rows.iterrows()])


def _value_at(rows: pd.DataFrame, stage_index: int, step: int) -> float:
    hit = rows[(rows.stage_index == stage_index) & (rows.step == step)]
    return float(hit.value.iloc[0]) if len(hit) else math.nan


def reach_rows(data: Data, metric: str, budgets: list[str]) -> list[ReachRow]:
    """Every (target, arm) pair, targets from each reference group's curve: final first, then earlier ones."""
    evals = evals_of(data, metric)
    lower = metric in LOWER_IS_BETTER
    groups = list(dict.fromkeys(evals.group))
    cache: dict[tuple[str, str], pd.DataFrame] = {}

    def points_of(group: str, column: str) -> pd.DataFrame:
        if (group, column) not in cache:
            cache[(group, column)] = pooled_points(evals[evals.group == group], column)
        return cache[(group, column)]

    out: list[ReachRow] = []
    for ref in data.reference_groups():
        ref_points = points_of(ref, "total_steps")
        if ref_points.empty:
            continue
        compared = [ref] + [g for g in groups if g != ref and data.reference_of(g) == ref]
        last = len(ref_points) - 1
        end = "final" if data.is_done(ref) else "latest"
        for k in range(last, -1, -1):
            point = ref_points.iloc[k]
            label = f"{ref} {end}" if k == last else f"{ref} at {point.stage}@{int(point.step)}"
            for group in compared:
                row = ReachRow(group, ref, float(point.y), label, k == last)
                for budget in budgets:
                    row.costs[budget], row.ratios[budget] = _reach(evals, points_of, group, ref, point,
                                                                   BUDGETS[budget][0], lower)
                out.append(row)
    return out


def _reach(evals: pd.DataFrame, points_of, group: str, ref: str, point: pd.Series, column: str,
           lower: bool) -> tuple[Reach, Ratio]:
    target = float(point.y)
    group_points = points_of(group, column)
    curve = _curve(group_points)
    reach = first_reach(curve, target, lower)
    if group == ref:
        return reach, Ratio(1.0)
    ref_points = points_of(ref, column)
    ref_cost = first_reach(_curve(ref_points), target, lower).cost
    arms, refs = _members(evals, group), _members(evals, ref)
    targets = {s: _value_at(refs[s], int(point.stage_index), int(point.step)) for s in arms if s in refs}
    shared = [s for s, value in targets.items() if not math.isnan(value)]  # seeds whose scratch has this point
    if len(arms) > 1 and len(refs) > 1 and len(shared) >= 2:
        ratios = []
        for seed in shared:
            ref_s = first_reach(_member_curve(refs[seed], column), targets[seed], lower).cost
            arm_s = first_reach(_member_curve(arms[seed], column), targets[seed], lower).cost
            ratios.append(arm_s / ref_s if ref_s > 0 else math.nan)
        return reach, ratio_from_pairs(ratios, method=f"paired over {len(shared)} shared seeds")
    target_row = ref_points[(ref_points.stage_index == point.stage_index) & (ref_points.step == point.step)]
    target_std = float(target_row["se"].iloc[0]) if len(target_row) else math.nan
    counts = [int(n) for n in group_points.n] + [int(point.n)]
    several = [n for n in counts if n > 1]
    z = t_value(min(several) - 1) if several else z_value()
    method = f"shifted curve, t({min(several) - 1})" if several else "shifted curve, bootstrap stds"
    return reach, ratio_from_intervals(curve, ref_cost, target, target_std, z, lower, method)


def fmt_ratio(ratio: Ratio) -> str:
    """'56% [50%, 63%]', '≤20%', 'not reached (by 1 of 3 seeds)', 'not reached (but within noise of reaching it)'."""
    if math.isnan(ratio.ratio):
        note = ratio.note.removeprefix("not reached").strip(" ,")
        if not math.isnan(ratio.low):  # the point curve does not get there, the optimistic one does
            note = "but within noise of reaching it"
        return "not reached" + (f" ({note})" if note else "")
    text = ("≤" if ratio.at_or_before else "") + fmt_percent(ratio.ratio)
    if ratio.has_interval:
        low = ("≤" if ratio.low_at_or_before else "") + fmt_percent(ratio.low)
        return f"{text} [{low}, {fmt_percent(ratio.high)}]"
    return text + (" (no interval)" if "no interval" in ratio.note else "")


def fmt_reach(budget: str, reach: Reach) -> str:
    if not reach.reached:
        return "not reached"
    return ("≤" if reach.first else "") + fmt_budget(budget, reach.cost)


def reach_table(data: Data, metric: str, budgets: list[str], rows: list[ReachRow]) -> Table:
    labels = [BUDGETS[b][1] for b in budgets]
    table = Table(f"Cost to reach {data.reference}'s {metric.upper()}", ["target", "arm", *labels],
                  note=f"The cost (cumulative along the arm) at which each arm first reaches the target "
                       f"{metric.upper()}, interpolated in log(cost) between the two evaluations around it, and in "
                       f"brackets that cost as a share of the reference's own cost to reach it, with its 95% "
                       f"interval. '≤': already there at its first evaluation.")
    for row in rows:
        cells = []
        for budget in budgets:
            cost = fmt_reach(budget, row.costs[budget])
            if row.group == row.reference or not row.costs[budget].reached and math.isnan(row.ratios[budget].ratio):
                cells.append(cost if row.group == row.reference else fmt_ratio(row.ratios[budget]))
            else:
                cells.append(f"{cost} = {fmt_ratio(row.ratios[budget])}")
        table.rows.append([f"{fmt_value(row.target)} ({row.target_label})", row.group, *cells])
    return table
