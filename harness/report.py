"""Comparison reports: which arm reaches the lower FID at equal training cost, and by how much.

For each budget (total steps, images seen, training FLOPs, device-hours) the report lists budget *levels* and,
for every arm, the evaluation nearest at or below each level (so an arm is never credited with cost it has not
paid), its FID/KID and the relative FID change against the reference arm ('scratch', else the first arm):
negative = lower FID than the reference at no more cost. Levels are the reference arm's evaluation points plus
every arm's final evaluation. Arms with the same name and configuration but different seeds (sweep points) are
pooled: mean, sample std and count. Output: a rich table on the terminal, report.md, and a self-contained
report.html (figures embedded as base64 PNG), with the figures also saved under figures/.
"""
from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.fileio import atomic_write_bytes, atomic_write_text
from harness.results import collect, find_experiments, load_plan, write_records, write_table

# budget name -> (records column, label)
BUDGETS = {"steps": ("total_steps", "total steps"), "images": ("images_seen", "images seen"),
           "flops": ("train_flops", "training FLOPs"), "hours": ("device_hours", "device-hours")}
PLOTTED = ("hours", "flops", "images")
_LABEL_PRIORITY = ("mask_ratio", "mask", "steps", "batch_size", "lr", "model", "data")
_REL_TOL = 1e-9  # budgets equal up to float noise count as "at or below"


@dataclass
class Table:
    """A table in plain strings, rendered to rich, markdown and HTML alike."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    title: str
    summary: list[str]
    tables: list[Table]
    figures: dict[str, bytes]  # file name -> PNG


# ---------------------------------------------------------------------------------------------------- formatting

def _si(x: float) -> str:
    if x is None or pd.isna(x):
        return "—"
    for factor, suffix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g}{suffix}"
    return f"{x:.3g}"


def fmt_budget(budget: str, x: float) -> str:
    if x is None or pd.isna(x):
        return "—"
    if budget == "steps":
        return f"{int(round(x)):,}"
    if budget == "hours":
        return f"{x:.3g} h"
    return _si(x)


def fmt_relative(value: float, reference: float) -> str:
    """'-46.0%' style change of `value` against `reference`."""
    if pd.isna(value) or pd.isna(reference) or reference == 0:
        return "—"
    return f"{(value - reference) / reference * 100:+.1f}%"


def fmt_value(mean: float, std: float = math.nan, n: int = 1) -> str:
    if pd.isna(mean):
        return "—"
    digits = ".4f" if abs(mean) < 1 else ".2f"
    if n > 1:
        return f"{mean:{digits}} ± {std:{digits}} (n={n})"
    return f"{mean:{digits}}"


# ---------------------------------------------------------------------------------------------------- the data

def _flatten(value: object, prefix: str) -> dict[str, object]:
    """{'a': {'b': 1}} -> {'prefix.a.b': 1}; lists and plain values are leaves."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}.{key}"))
    return out


def _arm_signature(plan: dict, arm: str) -> dict[str, object]:
    """The arm's stage chain as flat `stage.key -> value`, seeds and ids left out (what seeds share): the plan's
    summary keys (short names for labels), then every other setting of the stage's full config (plan.json's
    `config`; plans written before it had one compare on the summary alone)."""
    flat: dict[str, object] = {}
    for sid in plan["arms"][arm]:
        stage = plan["stages"][sid]
        for key, value in stage.items():
            if key not in ("id", "parent", "arms", "dir", "seed", "config"):
                flat[f"{stage['name']}.{key}"] = json.dumps(value, sort_keys=True)
        for key, value in _flatten(stage.get("config") or {}, stage["name"]).items():
            if key.split(".")[1] not in stage:  # steps, lr, mask, model, data ... are there under short names
                flat[key] = json.dumps(value, sort_keys=True)
    return flat


def _group_labels(plans: dict[str, dict]) -> dict[tuple[str, str], str]:
    """(member, arm) -> arm label; equal labels are seeds of one arm. Same-named arms that differ in config get
    the differing settings appended, e.g. 'two_stage [pretrain.mask_ratio=0.5]'."""
    signatures = {(m, arm): _arm_signature(plan, arm) for m, plan in plans.items() for arm in plan["arms"]}
    labels = {}
    for (member, arm), sig in signatures.items():
        same_name = [s for (m, a), s in signatures.items() if a == arm]
        differing = [k for k in sig if len({s.get(k) for s in same_name}) > 1]
        if not differing:
            labels[(member, arm)] = arm
            continue
        # what a sweep usually varies first, then the stage order of the arm
        differing.sort(key=lambda k: _LABEL_PRIORITY.index(k.rsplit(".", 1)[1])
                       if k.rsplit(".", 1)[1] in _LABEL_PRIORITY else len(_LABEL_PRIORITY))
        shown = ", ".join(f"{k}={json.loads(sig[k])}" for k in differing[:2])
        labels[(member, arm)] = f"{arm} [{shown}{', ...' if len(differing) > 2 else ''}]"
    # a shortened label must not merge two different configurations: spell those out in full
    by_label: dict[str, set[str]] = {}
    for key, label in labels.items():
        by_label.setdefault(label, set()).add(json.dumps(signatures[key], sort_keys=True))
    for (member, arm), label in labels.items():
        if len(by_label[label]) > 1:
            sig = signatures[(member, arm)]
            labels[(member, arm)] = f"{arm} [" + ", ".join(f"{k}={json.loads(v)}" for k, v in sig.items()) + "]"
    return labels


def _arm_status(stages: pd.DataFrame) -> str:
    statuses = set(stages.status)
    if statuses == {"done"}:
        return "done"
    for status in ("failed", "running"):
        if status in statuses:
            return status
    return "running" if "done" in statuses else "pending"


@dataclass
class Data:
    """Everything a report is made of: the records of its experiment(s) with a `group` label per arm."""

    records: pd.DataFrame  # with columns member, group
    reference: str  # the group every other is compared with
    status: dict[str, list[str]]  # group -> status of each member
    stage_dirs: dict[tuple[str, str], Path]  # (member, stage_id) -> run folder
    # group -> the external checkpoints (Stage.init_checkpoint) its stages start from: work the records cannot cost
    external: dict[str, list[str]] = field(default_factory=dict)


def load_data(experiment_dirs: list[Path]) -> Data:
    frames, plans, stage_dirs = [], {}, {}
    for exp_dir in experiment_dirs:
        member = str(exp_dir)
        plans[member] = load_plan(exp_dir)
        frames.append(collect(exp_dir).assign(member=member))
        stage_dirs.update({(member, sid): exp_dir / s["dir"] for sid, s in plans[member]["stages"].items()})
    records = pd.concat(frames, ignore_index=True)
    labels = _group_labels(plans)
    records["group"] = [labels[(m, a)] for m, a in zip(records.member, records.arm)]
    # the same stages reached from two sweep points (identical ids, same seed) are one run, not two seeds
    seen, dropped = set(), set()
    for (group, member), rows in records.groupby(["group", "member"], sort=False):
        chain = (group, tuple(dict.fromkeys(rows.stage_id)))
        if chain in seen:
            dropped.add((group, member))
        seen.add(chain)
    keep = [(g, m) not in dropped for g, m in zip(records.group, records.member)]
    records = records[keep].reset_index(drop=True)
    groups = list(dict.fromkeys(records.group))
    reference = next((g for g in groups if g == "scratch" or g.startswith("scratch [")), groups[0])
    status = {g: [_arm_status(d) for _, d in records[records.group == g].groupby("member", sort=False)]
              for g in groups}
    external: dict[str, list[str]] = {}
    for (member, arm), group in labels.items():
        for sid in plans[member]["arms"][arm]:
            path = (plans[member]["stages"][sid].get("config") or {}).get("init_checkpoint")
            if path and group in groups and path not in external.setdefault(group, []):
                external[group].append(path)
    return Data(records, reference, status, stage_dirs, {g: paths for g, paths in external.items() if paths})


def _evals(data: Data, metric: str) -> pd.DataFrame:
    ev = data.records[data.records.metric == metric]
    return ev.dropna(subset=["value"])


def select_at(points: pd.DataFrame, column: str, level: float) -> pd.Series | None:
    """The evaluation nearest at or below `level` (the latest such one), or None."""
    below = points[points[column] <= level * (1 + _REL_TOL)]
    if below.empty:
        return None
    return below.sort_values([column, "total_steps"]).iloc[-1]


@dataclass
class Cell:
    """One arm at one budget level, pooled over its seeds."""

    mean: float
    std: float
    n: int
    budget: float  # the (mean) budget actually spent at the chosen evaluations
    where: str  # 'stage@step' of the chosen evaluation(s)
    second: float  # the second metric (KID beside FID) at the same evaluations
    marks: str  # 'running' / 'failed' when the arm is unfinished and could still change the cell


def pooled_cell(data: Data, evals: pd.DataFrame, group: str, column: str, level: float, other: str | None) -> Cell:
    picked = []
    for member, points in evals[evals.group == group].groupby("member", sort=False):
        row = select_at(points, column, level)
        if row is not None:
            picked.append(row)
    statuses = {s for s in data.status[group] if s != "done"}
    marks = ", ".join(sorted(statuses))
    if not picked:
        return Cell(math.nan, math.nan, 0, math.nan, "", math.nan, marks)
    values = pd.Series([float(r.value) for r in picked])
    seconds = [_other_metric(data, r, other) for r in picked]
    where = sorted({f"{r.stage}@{int(r.step)}" for r in picked})
    return Cell(values.mean(), values.std() if len(values) > 1 else math.nan, len(values),
                float(pd.Series([r[column] for r in picked]).mean()), "/".join(where),
                float(pd.Series(seconds).mean()), marks)


def _other_metric(data: Data, row: pd.Series, metric: str | None) -> float:
    if metric is None:
        return math.nan
    r = data.records
    hit = r[(r.member == row.member) & (r.stage_id == row.stage_id) & (r.step == row.step) & (r.metric == metric)]
    return float(hit.value.iloc[0]) if len(hit) else math.nan


def last_evals(points: pd.DataFrame) -> list[pd.Series]:
    """The latest evaluation (by cumulative steps) of each member among `points`."""
    return [p.sort_values("total_steps").iloc[-1] for _, p in points.groupby("member", sort=False)]


def budget_levels(evals: pd.DataFrame, reference: str, column: str) -> list[tuple[float, list[str]]]:
    """(level, where it comes from): the reference arm's evaluation points, then every arm's final one. Seeds of
    an arm spend a little more or less device time for the same steps: a level is the costliest seed's figure,
    so that every seed's own evaluation at that point lies within it (with the mean, a seed above it would be
    read at its previous evaluation, or not at all)."""
    levels: dict[float, list[str]] = {}
    ref = evals[evals.group == reference].groupby(["stage_index", "step"])[column].max()
    for (_, step), x in ref.dropna().items():
        levels.setdefault(float(x), []).append(f"{reference} eval")
    for group, points in evals.groupby("group", sort=False):
        x = pd.Series([row[column] for row in last_evals(points)], dtype=float).max()
        if not pd.isna(x):
            levels.setdefault(float(x), []).append(f"{group} final")
    merged: list[tuple[float, list[str]]] = []
    for x in sorted(levels):
        if merged and abs(x - merged[-1][0]) <= _REL_TOL * max(abs(x), 1.0):
            merged[-1][1].extend(levels[x])
        else:
            merged.append((x, levels[x]))
    return [(x, list(dict.fromkeys(sources))) for x, sources in merged]


# ---------------------------------------------------------------------------------------------------- tables

def matched_table(data: Data, metric: str, budget: str) -> tuple[Table, list[str]]:
    """The matched-budget table of one budget, and its one-line conclusions."""
    column, label = BUDGETS[budget]
    evals = _evals(data, metric)
    other = next((m for m in ("kid", "fid") if m != metric and (data.records.metric == m).any()), None)
    groups = list(dict.fromkeys(data.records.group))
    cols = ["budget level", "level from", "arm", "evaluation used", f"{label} spent", metric.upper()]
    cols += [other.upper()] if other else []
    table = Table(f"{metric.upper()} at equal {label}", cols + [f"vs {data.reference}"],
                  note=f"Each arm's evaluation nearest at or below the budget level; the change is relative to "
                       f"'{data.reference}' at the same level (negative = lower {metric.upper()}).")
    conclusions = []
    for level, sources in budget_levels(evals, data.reference, column):
        source = ", ".join(sources)
        cells = {g: pooled_cell(data, evals, g, column, level, other) for g in groups}
        ref = cells[data.reference]
        for g, c in cells.items():
            state = "" if not c.marks else f" ({c.marks})"
            row = [fmt_budget(budget, level), source, g + state, c.where or "—", fmt_budget(budget, c.budget),
                   fmt_value(c.mean, c.std, c.n)]
            row += [fmt_value(c.second)] if other else []
            table.rows.append(row + ["—" if g == data.reference else fmt_relative(c.mean, ref.mean)])
        for g, c in cells.items():
            # the headline comparisons: with the reference's whole budget, and with this arm's whole budget
            headline = {f"{data.reference} final", f"{g} final"} & set(sources)
            if g != data.reference and headline and not pd.isna(c.mean) and not pd.isna(ref.mean):
                whose = " = ".join(sorted(h.removesuffix(" final") for h in headline))
                better = g if c.mean < ref.mean else data.reference
                unfinished = f" [{g} {c.marks}]" if c.marks else ""
                conclusions.append(
                    f"Equal {label}, {whose}'s full budget ({fmt_budget(budget, level)}): {g} {metric.upper()} "
                    f"{fmt_value(c.mean)} vs {data.reference} {fmt_value(ref.mean)} -> "
                    f"{fmt_relative(c.mean, ref.mean)} ({better} lower){unfinished}.")
    return table, list(dict.fromkeys(conclusions))


def final_table(data: Data, metric: str) -> Table:
    evals = _evals(data, metric)
    groups = list(dict.fromkeys(data.records.group))
    table = Table(f"Final {metric.upper()} per arm", ["arm", "status", "evaluation", "total steps", "images",
                                                       "FLOPs", "device-hours", metric.upper(), f"vs {data.reference}"],
                  note="The last evaluation of each arm, with its cumulative cost (pretraining included).")
    finals = {g: last_evals(evals[evals.group == g]) for g in groups}
    ref_values = [float(r.value) for r in finals.get(data.reference, [])]
    ref_mean = sum(ref_values) / len(ref_values) if ref_values else math.nan
    for g in groups:
        status = "/".join(sorted(set(data.status[g])))
        last = finals[g]
        if not last:
            table.rows.append([g, status] + ["—"] * 7)
            continue
        frame = pd.DataFrame(last)
        mean = frame.value.mean()
        table.rows.append([
            g, status, "/".join(sorted({f"{r.stage}@{int(r.step)}" for r in last})),
            fmt_budget("steps", frame.total_steps.astype(float).mean()), fmt_budget("images", frame.images_seen.mean()),
            fmt_budget("flops", frame.train_flops.mean()), fmt_budget("hours", frame.device_hours.mean()),
            fmt_value(mean, frame.value.std() if len(frame) > 1 else math.nan, len(frame)),
            "—" if g == data.reference else fmt_relative(mean, ref_mean)])
    return table


def build_report(data: Data, title: str, metric: str = "fid", budgets: list[str] | None = None) -> Report:
    if not (data.records.metric == metric).any():
        known = sorted(set(data.records.metric.dropna()))
        summary = [f"No '{metric}' evaluations yet (metrics found: {', '.join(known) or 'none'})."]
    else:
        summary = []
    for group, paths in data.external.items():  # e.g. fine-tuning a released MaskDM checkpoint
        summary.append(f"Arm '{group}' starts from an external checkpoint ({', '.join(paths)}): what training it "
                       "cost is not in its budgets, so matched-budget comparisons flatter this arm.")
    tables = [final_table(data, metric)]
    for budget in budgets or list(BUDGETS):
        table, conclusions = matched_table(data, metric, budget)
        tables.append(table)
        summary += conclusions
    from harness.report_figures import cost_curves, sample_grids

    figures = {f"{metric}_vs_{b}.png": cost_curves(data, metric, b) for b in PLOTTED}
    grid = sample_grids(data)
    if grid is not None:
        figures["samples.png"] = grid
    return Report(title, summary, tables, figures)


# ---------------------------------------------------------------------------------------------------- rendering

def to_markdown(report: Report) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [f"# {report.title}", ""]
    out += [f"- {line}" for line in report.summary] + ([""] if report.summary else [])
    for table in report.tables:
        out += [f"## {table.title}", "", table.note, ""] if table.note else [f"## {table.title}", ""]
        out.append("| " + " | ".join(cell(c) for c in table.columns) + " |")
        out.append("|" + "---|" * len(table.columns))
        out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
        out.append("")
    out += ["## Figures", ""] + [f"![{name}](figures/{name})" for name in report.figures]
    return "\n".join(out) + "\n"


def to_html(report: Report) -> str:
    """One self-contained page: the tables and every figure inline as a base64 PNG."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title><style>"
             "body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}"
             "td:nth-child(-n+4){text-align:left}.note{color:#555}img{max-width:100%}</style></head><body>",
             f"<h1>{esc(report.title)}</h1>"]
    if report.summary:
        parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in report.summary) + "</ul>")
    for table in report.tables:
        parts.append(f"<h2>{esc(table.title)}</h2><p class='note'>{esc(table.note)}</p><table><tr>")
        parts.append("".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows]
        parts.append("</table>")
    parts.append("<h2>Figures</h2>")
    for name, png in report.figures.items():
        data = base64.b64encode(png).decode()
        parts.append(f'<figure><img alt="{esc(name)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{esc(name)}</figcaption></figure>")
    return "\n".join(parts) + "\n</body></html>\n"


def print_report(report: Report, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table as RichTable

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file has no width limit; do not squash the columns
    console.rule(report.title)
    for line in report.summary:
        console.print(f"• {escape(line)}", highlight=False)
    for table in report.tables:
        rich_table = RichTable(title=escape(table.title), caption=escape(table.note))
        for col in table.columns:
            rich_table.add_column(escape(col), overflow="fold")
        for row in table.rows:
            rich_table.add_row(*(escape(c) for c in row))
        console.print(rich_table)


def write_files(report: Report, folder: Path) -> Path:
    """report.md, report.html and figures/*.png in `folder`; returns the path of report.html."""
    for name, png in report.figures.items():
        atomic_write_bytes(folder / "figures" / name, png)
    atomic_write_text(folder / "report.md", to_markdown(report))
    atomic_write_text(folder / "report.html", to_html(report))
    return folder / "report.html"


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
        report = build_report(load_data([exp_dir]), f"{exp_dir.name}: {metric.upper()} at matched budgets",
                              metric, budgets)
        written.append(write_files(report, exp_dir))
        if show and len(experiments) == 1:
            print_report(report, console)
    if len(experiments) > 1:
        data = load_data(experiments)
        write_table(data.records.drop(columns=["member", "group"]), results_dir)
        report = build_report(data, f"{results_dir.name}: {len(experiments)} experiments, seeds pooled", metric,
                              budgets)
        written.append(write_files(report, results_dir))
        if show:
            print_report(report, console)
    return written


def make_report(experiment_dir: str | Path, metric: str = "fid", show: bool = True) -> dict[str, Path]:
    """What `harness run` calls at its end: report one experiment; returns the files written, by kind."""
    experiment_dir = Path(experiment_dir)
    [html_path] = write_report(experiment_dir, metric=metric, show=show)
    return {"html": html_path, "markdown": experiment_dir / "report.md",
            "records": experiment_dir / "records.csv", "figures": experiment_dir / "figures"}
