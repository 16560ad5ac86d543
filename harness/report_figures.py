"""The report's figures: metric against cost for every arm, and the sample grids (matplotlib, Agg, PNG bytes).

`curve_figure` computes what a curve figure shows as plain data (tests read it; `render_curves` only draws it):
- one series per (arm, stage): the seeds' mean per evaluation with a 95% interval as error bars (several seeds:
  t interval of the mean; one run: the evaluation's bootstrap interval, else ± z std; none recorded: no bar).
  A masked stage (pretraining) is drawn dashed with hollow markers, an unmasked one solid; a line continues
  across a stage boundary;
- the pretraining / fine-tuning boundary of each arm (its parent stages' final cost) as a dotted vertical line;
- the noise floor (the metric between two disjoint real sets at the evaluations' counts) as a grey band from
  the lowest to the highest floor of the plotted evaluations (a line when they agree), with the
  FLOOR_FACTOR x floor line above which an arm is "not yet converged";
- the reference's final value (the cost-to-reach target) as a thin horizontal line, and a star where each other
  arm first reaches it (harness.cost_to_reach).
"""
from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, field

import pandas as pd

from harness.cost_to_reach import Curve, first_reach
from harness.report_data import BUDGETS, Data, evals_of
from harness.report_stats import FLOOR_FACTOR, LOWER_IS_BETTER, run_std, t_value, z_value
from harness.run_folder import SAMPLES_DIR

_STEP_PNG = re.compile(r"^step_(\d+)\.png$")


@dataclass
class Series:
    group: str
    stage: str
    stage_index: int
    masked: bool
    x: list[float]
    y: list[float]
    low: list[float]  # 95% interval bounds (NaN: none)
    high: list[float]
    n: list[int]


@dataclass
class CurveFigure:
    metric: str
    budget: str
    series: list[Series] = field(default_factory=list)
    boundaries: list[tuple[str, float]] = field(default_factory=list)  # (arm, cost where its next stage starts)
    floor: tuple[float, float] | None = None  # lowest and highest noise floor of the plotted evaluations
    floor_label: str = ""
    target: float | None = None  # the reference's final value
    target_label: str = ""
    reached: list[tuple[str, float]] = field(default_factory=list)  # (arm, cost at which it reaches the target)


def _interval(at: pd.DataFrame) -> tuple[float, float]:
    n = len(at)
    if n > 1:
        half = t_value(n - 1) * at.value.std() / math.sqrt(n)
        return at.value.mean() - half, at.value.mean() + half
    row = at.iloc[0]
    if not (pd.isna(row.ci_low) or pd.isna(row.ci_high)):
        return float(row.ci_low), float(row.ci_high)
    std = run_std(row.value_std, row.ci_low, row.ci_high, row.metric)
    return float(row.value) - z_value() * std, float(row.value) + z_value() * std


def curve_figure(data: Data, metric: str, budget: str) -> CurveFigure:
    column, _ = BUDGETS[budget]
    evals = evals_of(data, metric).dropna(subset=[column])
    fig = CurveFigure(metric, budget)
    for group in data.groups():
        points = evals[evals.group == group]
        for index, stage in points.groupby("stage_index", sort=True):
            rows = []
            for step, at in stage.groupby("step", sort=True):
                low, high = _interval(at)
                rows.append((at[column].mean(), at.value.mean(), low, high, len(at)))
            rows.sort()
            fig.series.append(Series(group, str(stage.stage.iloc[0]), int(index), bool((stage["mask"] != "none").any()),
                                     *(list(col) for col in zip(*rows))))
            if index > 0:  # the cost carried in from the parent stages
                base = column if column == "total_steps" else f"stage_{column}"
                local = stage.step.astype(float) if column == "total_steps" else stage[base]
                fig.boundaries.append((group, float((stage[column] - local).mean())))
    floors = evals.floor.dropna()
    if len(floors):
        fig.floor = (float(floors.min()), float(floors.max()))
        sizes = sorted({(int(a), int(b)) for a, b in zip(evals.floor_n_a, evals.floor_n_b)
                        if not (pd.isna(a) or pd.isna(b))})
        counts = ", ".join(f"{a} vs {b}" for a, b in sizes)
        reduced = any(str(n) for n in evals.floor_note.dropna())
        fig.floor_label = (f"noise floor (real vs real{', ' + counts if counts else ''}"
                           f"{'; reduced split' if reduced else ''})")
    _add_target(data, evals, fig, column, metric)
    return fig


def _add_target(data: Data, evals: pd.DataFrame, fig: CurveFigure, column: str, metric: str) -> None:
    refs = data.reference_groups()
    if len(refs) != 1:  # several reference arms (a sweep over a setting they share): one line would mislead
        return
    ref = refs[0]
    ref_series = [s for s in fig.series if s.group == ref]
    if not ref_series or not ref_series[-1].y:
        return
    fig.target = ref_series[-1].y[-1]
    fig.target_label = f"{ref} {'final' if data.is_done(ref) else 'latest'} {metric.upper()}"
    for group in data.groups():
        if group == ref or data.reference_of(group) != ref:
            continue
        series = [s for s in fig.series if s.group == group]
        curve = Curve.of([x for s in series for x in s.x], [y for s in series for y in s.y])
        reach = first_reach(curve, fig.target, metric in LOWER_IS_BETTER)
        if reach.reached:
            fig.reached.append((group, reach.cost))


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on compute nodes; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def render_curves(figure: CurveFigure, lead: bool = False) -> bytes:
    plt = _pyplot()
    _, label = BUDGETS[figure.budget]
    m = figure.metric.upper()
    fig, ax = plt.subplots(figsize=(8.6, 4.6) if lead else (6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = list(dict.fromkeys(s.group for s in figure.series))
    colour = {g: colours[i % len(colours)] for i, g in enumerate(order)}
    previous: dict[str, tuple[float, float]] = {}
    for s in figure.series:
        xs, ys = list(s.x), list(s.y)
        if s.group in previous:  # continue the arm's line across the stage boundary
            xs, ys = [previous[s.group][0]] + xs, [previous[s.group][1]] + ys
        ax.plot(xs, ys, linestyle="--" if s.masked else "-", color=colour[s.group], marker="o",
                markerfacecolor="white" if s.masked else colour[s.group],
                label=f"{s.group}: {s.stage}" + (" (masked)" if s.masked else ""))
        err = [[max(y - lo, 0) if not math.isnan(lo) else 0 for y, lo in zip(s.y, s.low)],
               [max(hi - y, 0) if not math.isnan(hi) else 0 for y, hi in zip(s.y, s.high)]]
        if any(any(e) for e in err):
            ax.errorbar(s.x, s.y, yerr=err, fmt="none", ecolor=colour[s.group], capsize=3, linewidth=1)
        previous[s.group] = (s.x[-1], s.y[-1])
    for i, (group, x) in enumerate(figure.boundaries):
        ax.axvline(x, color=colour.get(group, "grey"), linestyle=":", linewidth=1.2)
        ax.annotate(f"{group}: fine-tuning starts", (x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(3, -12 - 11 * i), textcoords="offset points", fontsize=7, color=colour.get(group, "grey"))
    if figure.floor is not None:
        low, high = figure.floor
        if high > low:
            ax.axhspan(low, high, color="grey", alpha=0.25, label=figure.floor_label)
        else:
            ax.axhline(low, color="grey", linewidth=2, alpha=0.6, label=figure.floor_label)
        if figure.metric in ("fid", "kid") and high > 0:
            ax.axhline(FLOOR_FACTOR * high, color="grey", linestyle=":", linewidth=1,
                       label=f"{FLOOR_FACTOR:g}× floor (above: not yet converged)")
    if figure.target is not None:
        ax.axhline(figure.target, color="black", linewidth=0.6, alpha=0.5, label=f"target: {figure.target_label}")
        for group, x in figure.reached:
            ax.plot([x], [figure.target], marker="*", markersize=13, color=colour.get(group, "black"),
                    markeredgecolor="black", linestyle="none",
                    label=f"{group} reaches {figure.target_label}")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    xs = [x for s in figure.series for x in s.x if x > 0]
    if xs and max(xs) / min(xs) > 20:  # pretraining is cheap: a log axis keeps its points apart
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
    ys = [y for s in figure.series for y in s.y] + ([figure.floor[0]] if figure.floor else [])
    if ys and min(ys) > 0 and max(ys) / min(ys) > 10:  # a masked stage's FID can be 10x the final one
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(f"{v:g}")[0] in "2358" else ""))
    ax.set_xlabel(f"{label} (cumulative along the arm; fine-tuning includes its pretraining)")
    ax.set_ylabel(m + (" (95% intervals)" if lead else ""))
    ax.set_title(f"{m} vs {label}")
    ax.grid(alpha=0.3, which="both")
    if figure.series:
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.text(0.5, 0.5, f"no {figure.metric} evaluations yet", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def cost_curves(data: Data, metric: str, budget: str, lead: bool = False) -> bytes:
    return render_curves(curve_figure(data, metric, budget), lead)


def latest_grid(stage_dir) -> tuple[int, object] | None:
    """(step, path) of the newest samples/step_*.png of a run folder, or None."""
    found = [(int(m.group(1)), p) for p in (stage_dir / SAMPLES_DIR).glob("step_*.png")
             if (m := _STEP_PNG.match(p.name))]
    return max(found, key=lambda f: f[0]) if found else None


def sample_grids(data: Data) -> bytes | None:
    """The latest sample grid of every stage (first seed of each arm), side by side; None if there are none."""
    from PIL import Image

    panels = []
    for group in data.groups():
        rows = data.records[data.records.group == group]
        member = rows.member.iloc[0]
        for stage_id, stage in rows[rows.member == member].groupby("stage_id", sort=False):
            found = latest_grid(data.stage_dirs[(member, stage_id)])
            if found is not None:
                panels.append((f"{group}\n{stage.stage.iloc[0]} @ step {found[0]}", found[1]))
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
    for ax, (title, path) in zip(axes[0], panels):
        with Image.open(path) as image:
            ax.imshow(image.convert("RGB"))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    return _png(fig)
