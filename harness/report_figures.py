"""The report's figures (matplotlib, Agg backend, PNG bytes): metric vs cost curves and the sample grids.

Curves: one colour per arm; a masked stage (pretraining) is drawn dashed with hollow markers, an unmasked one
solid, and a dotted vertical line marks where an arm's next stage starts (its parent's final cost). Seeds of one
arm are pooled per (stage, step): the mean, with the std as error bars.
"""
from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.report import Data

_STEP_PNG = re.compile(r"^step_(\d+)\.png$")


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


def cost_curves(data: "Data", metric: str, budget: str) -> bytes:
    from harness.report import BUDGETS

    plt = _pyplot()
    column, label = BUDGETS[budget]
    records = data.records
    evals = records[(records.metric == metric)].dropna(subset=["value", column])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, group in enumerate(dict.fromkeys(records.group)):
        colour = colours[i % len(colours)]
        points = evals[evals.group == group]
        previous = None  # last point of the previous stage, so that the line continues across the boundary
        for index, stage in points.groupby("stage_index", sort=True):
            pooled = stage.groupby("step").agg(x=(column, "mean"), y=("value", "mean"), err=("value", "std"),
                                               n=("value", "size"), base=(f"stage_{column}", "mean"))
            if column == "total_steps":
                pooled["base"] = pooled.index
            masked = (stage["mask"] != "none").any()
            xs, ys = list(pooled.x), list(pooled.y)
            if previous is not None:
                xs, ys = [previous[0]] + xs, [previous[1]] + ys
            name = f"{group}: {stage.stage.iloc[0]}" + (" (masked)" if masked else "")
            ax.plot(xs, ys, linestyle="--" if masked else "-", color=colour, marker="o",
                    markerfacecolor="white" if masked else colour, label=name)
            if (pooled.n > 1).any():
                ax.errorbar(pooled.x, pooled.y, yerr=pooled.err.fillna(0), fmt="none", ecolor=colour, capsize=3)
            if index > 0:
                boundary = (pooled.x - pooled.base).mean()  # the cost carried in from the parent stages
                ax.axvline(boundary, color=colour, linestyle=":", linewidth=1)
            previous = (xs[-1], ys[-1])
    ax.set_xlabel(f"{label} (cumulative along the arm)")
    ax.set_ylabel(metric.upper())
    ax.set_title(f"{metric.upper()} vs {label}")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, f"no {metric} evaluations yet", ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def latest_grid(stage_dir) -> tuple[int, object] | None:
    """(step, path) of the newest samples/step_*.png of a run folder, or None."""
    found = [(int(m.group(1)), p) for p in (stage_dir / "samples").glob("step_*.png")
             if (m := _STEP_PNG.match(p.name))]
    return max(found, key=lambda f: f[0]) if found else None


def sample_grids(data: "Data") -> bytes | None:
    """The latest sample grid of every stage (first seed of each arm), side by side; None if there are none."""
    from PIL import Image

    panels = []
    for group in dict.fromkeys(data.records.group):
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
