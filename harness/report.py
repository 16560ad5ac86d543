"""Comparison reports: which arm reaches the lower FID at equal training cost, and by how much.

For each budget (total steps, images seen, training FLOPs, device-hours) the report lists budget *levels* and,
for every arm, the evaluation nearest at or below each level (so an arm is never credited with cost it has not
paid), its FID/KID and the relative FID change against the reference arm ('scratch', else the first arm) of
the same sweep point: negative = lower FID than the reference at no more cost. Levels are the reference arm's
evaluation points plus every arm's final (or, while unfinished, latest) evaluation. Arms with the same name and
configuration but different seeds (sweep points) are pooled: mean, sample std and count. Output: a rich table
on the terminal, report.md, and a self-contained report.html (figures embedded as base64 PNG), with the figures
also saved under figures/.
"""
from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Collection
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
    summary keys (short names for labels), then every setting of the stage's full config (plan.json's `config`;
    plans written before it had one compare on the summary alone) that the summary does not already hold."""
    flat: dict[str, object] = {}
    for sid in plan["arms"][arm]:
        stage = plan["stages"][sid]
        for key, value in stage.items():
            if key not in ("id", "parent", "arms", "dir", "seed", "config"):
                flat[f"{stage['name']}.{key}"] = json.dumps(value, sort_keys=True)
        for key, value in (stage.get("config") or {}).items():
            # steps, lr, model, data are there verbatim; the summary's `mask` is only a name (its ratio is the
            # actual one), so two masks of another requested ratio must be compared on the config
            if stage.get(key) != value:
                for flat_key, item in _flatten(value, f"{stage['name']}.{key}").items():
                    flat[flat_key] = json.dumps(item, sort_keys=True)
    return flat


def _label_rank(key: str) -> int:
    """Where `stage.setting[.field]` comes in a label: what a sweep usually varies first."""
    setting = key.split(".")[1]
    return _LABEL_PRIORITY.index(setting) if setting in _LABEL_PRIORITY else len(_LABEL_PRIORITY)


def _with_setting(label: str, setting: str) -> str:
    """'two_stage' -> 'two_stage [x]', 'two_stage [a=1]' -> 'two_stage [a=1, x]'."""
    return f"{label[:-1]}, {setting}]" if label.endswith("]") else f"{label} [{setting}]"


def _split_same_seeds(labels: dict[tuple[str, str], str], plans: dict[str, dict]) -> dict[tuple[str, str], str]:
    """A label over two different stage chains with the same seeds is not seeds of one arm, whatever the
    signatures show (e.g. plans written before `config`, which cannot tell such runs apart): name each member."""
    chains: dict[str, dict[tuple, set[tuple[str, ...]]]] = {}
    for (member, arm), label in labels.items():
        ids = tuple(plans[member]["arms"][arm])
        seeds = tuple(plans[member]["stages"][sid].get("seed") for sid in ids)
        chains.setdefault(label, {}).setdefault(seeds, set()).add(ids)  # identical ids: one run, not two
    clashing = {label for label, by_seeds in chains.items() if any(len(ids) > 1 for ids in by_seeds.values())}
    names = [Path(m).name for m in dict.fromkeys(m for m, _ in labels)]
    unique = len(set(names)) == len(names)  # else nested sweeps: the folder name alone could merge them again
    return {(member, arm): _with_setting(label, f"experiment={Path(member).name if unique else member}")
            if label in clashing else label for (member, arm), label in labels.items()}


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
        differing.sort(key=_label_rank)  # stable: then the stage order of the arm
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
    return _split_same_seeds(labels, plans)


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
    reference: str  # the arm every other is compared with ('scratch', else the first arm)
    status: dict[str, list[str]]  # group -> status of each member
    stage_dirs: dict[tuple[str, str], Path]  # (member, stage_id) -> run folder
    # group -> the external checkpoints (Stage.init_checkpoint) its stages start from: work the records cannot cost
    external: dict[str, list[str]] = field(default_factory=dict)
    # group -> the reference arm's groups at its sweep points (a reference group: itself); one = comparable
    references: dict[str, list[str]] = field(default_factory=dict)

    def reference_of(self, group: str) -> str | None:
        """The reference group `group` is compared with, or None: no sweep point of it has the reference arm,
        or its sweep points have different ones (any choice would compare with another configuration)."""
        candidates = self.references.get(group, [])
        return candidates[0] if len(candidates) == 1 else None

    def reference_groups(self) -> list[str]:
        return [g for g, refs in self.references.items() if refs == [g]]

    def is_done(self, group: str) -> bool:
        return all(s == "done" for s in self.status[group])

    def end_label(self, group: str) -> str:
        """How a group's last evaluation is named: 'final' only once every run of it is done."""
        return f"{group} final" if self.is_done(group) else f"{group} latest"


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
    reference = "scratch" if (records.arm == "scratch").any() else str(records.arm.iloc[0])
    status = {g: [_arm_status(d) for _, d in records[records.group == g].groupby("member", sort=False)]
              for g in groups}
    external: dict[str, list[str]] = {}
    for (member, arm), group in labels.items():
        for sid in plans[member]["arms"][arm]:
            path = (plans[member]["stages"][sid].get("config") or {}).get("init_checkpoint")
            if path and group in groups and path not in external.setdefault(group, []):
                external[group].append(path)
    return Data(records, reference, status, stage_dirs, {g: paths for g, paths in external.items() if paths},
                _references(labels, reference, groups))


def _references(labels: dict[tuple[str, str], str], reference: str, groups: list[str]) -> dict[str, list[str]]:
    """group -> the labels of the reference arm in the members (sweep points) holding it. Matching by member
    compares each variant with the scratch run of its own sweep point, e.g. batch 20 with batch 20; a scratch
    shared by several points (a mask sweep) carries one label there, so they all find it."""
    found: dict[str, list[str]] = {g: [] for g in groups}
    for (member, arm), group in labels.items():
        ref = group if arm == reference else labels.get((member, reference))
        if group in found and ref in groups and ref not in found[group]:
            found[group].append(ref)
    return found


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


def budget_levels(evals: pd.DataFrame, references: Collection[str], column: str,
                  unfinished: Collection[str] = ()) -> list[tuple[float, list[str]]]:
    """(level, where it comes from): the reference groups' evaluation points, then every arm's final one ('latest'
    for the `unfinished` groups: it is not their full budget). Seeds of an arm spend a little more or less device
    time for the same steps: a level is the costliest seed's figure, so that every seed's own evaluation at that
    point lies within it (with the mean, a seed above it would be read at its previous evaluation, or not at
    all)."""
    levels: dict[float, list[str]] = {}
    for reference in references:
        ref = evals[evals.group == reference].groupby(["stage_index", "step"])[column].max()
        for (_, step), x in ref.dropna().items():
            levels.setdefault(float(x), []).append(f"{reference} eval")
    for group, points in evals.groupby("group", sort=False):
        x = pd.Series([row[column] for row in last_evals(points)], dtype=float).max()
        if not pd.isna(x):
            levels.setdefault(float(x), []).append(f"{group} {'latest' if group in unfinished else 'final'}")
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
                       f"'{data.reference}' of the same sweep point at the same level (negative = lower "
                       f"{metric.upper()}; 'no match': no such '{data.reference}', see the summary).")
    unfinished = [g for g in groups if not data.is_done(g)]
    conclusions = []
    for level, sources in budget_levels(evals, data.reference_groups(), column, unfinished):
        cells = {g: pooled_cell(data, evals, g, column, level, other) for g in groups}
        for g, c in cells.items():
            state = "" if not c.marks else f" ({c.marks})"
            row = [fmt_budget(budget, level), ", ".join(sources), g + state, c.where or "—",
                   fmt_budget(budget, c.budget), fmt_value(c.mean, c.std, c.n)]
            row += [fmt_value(c.second)] if other else []
            table.rows.append(row + [_versus(data, g, {k: v.mean for k, v in cells.items()})])
        for g in groups:
            line = _conclusion(data, cells, g, sources, f"Equal {label}", fmt_budget(budget, level), metric)
            conclusions += [line] if line else []
    return table, list(dict.fromkeys(conclusions))


def _versus(data: Data, group: str, means: dict[str, float]) -> str:
    """The 'vs scratch' cell: '—' for a reference itself, 'no match' where no scratch run is comparable."""
    ref = data.reference_of(group)
    if ref == group:
        return "—"
    return "no match" if ref is None else fmt_relative(means[group], means[ref])


def _conclusion(data: Data, cells: dict[str, Cell], group: str, sources: list[str], equal: str, level: str,
                metric: str) -> str | None:
    """The headline comparison of `group` with its reference at a level that is either one's whole budget (or
    latest evaluation, while unfinished), with the unfinished runs of both named."""
    ref = data.reference_of(group)
    if ref is None or ref == group:
        return None
    c, r = cells[group], cells[ref]
    ends = [name for name in sorted({ref, group}) if data.end_label(name) in sources]
    if not ends or pd.isna(c.mean) or pd.isna(r.mean):
        return None
    done = [n for n in ends if data.is_done(n)]
    so_far = [n for n in ends if not data.is_done(n)]
    whose = " = ".join(([" = ".join(done) + "'s full budget"] if done else [])
                       + ([" = ".join(so_far) + "'s latest evaluation"] if so_far else []))
    marks = "; ".join(f"{name} {cell.marks}" for name, cell in ((group, c), (ref, r)) if cell.marks)
    better = group if c.mean < r.mean else ref
    return (f"{equal}, {whose} ({level}): {group} {metric.upper()} {fmt_value(c.mean)} vs {ref} "
            f"{fmt_value(r.mean)} -> {fmt_relative(c.mean, r.mean)} ({better} lower)"
            + (f" [{marks}]." if marks else "."))


def final_table(data: Data, metric: str) -> Table:
    evals = _evals(data, metric)
    groups = list(dict.fromkeys(data.records.group))
    table = Table(f"Final {metric.upper()} per arm", ["arm", "status", "evaluation", "total steps", "images",
                                                       "FLOPs", "device-hours", metric.upper(), f"vs {data.reference}"],
                  note=f"The last evaluation of each arm, with its cumulative cost (pretraining included); the change "
                       f"is relative to the last evaluation of '{data.reference}' of the same sweep point.")
    finals = {g: last_evals(evals[evals.group == g]) for g in groups}
    means = {g: sum(float(r.value) for r in last) / len(last) if last else math.nan for g, last in finals.items()}
    for g in groups:
        status = "/".join(sorted(set(data.status[g])))
        last = finals[g]
        if not last:
            table.rows.append([g, status] + ["—"] * 6 + ["—" if data.reference_of(g) else "no match"])
            continue
        frame = pd.DataFrame(last)
        mean = frame.value.mean()
        table.rows.append([
            g, status, "/".join(sorted({f"{r.stage}@{int(r.step)}" for r in last})),
            fmt_budget("steps", frame.total_steps.astype(float).mean()), fmt_budget("images", frame.images_seen.mean()),
            fmt_budget("flops", frame.train_flops.mean()), fmt_budget("hours", frame.device_hours.mean()),
            fmt_value(mean, frame.value.std() if len(frame) > 1 else math.nan, len(frame)),
            _versus(data, g, means)])
    return table


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


def build_report(data: Data, title: str, metric: str = "fid", budgets: list[str] | None = None) -> Report:
    if not (data.records.metric == metric).any():
        known = sorted(set(data.records.metric.dropna()))
        summary = [f"No '{metric}' evaluations yet (metrics found: {', '.join(known) or 'none'})."]
    else:
        summary = []
    for group, paths in data.external.items():  # e.g. fine-tuning a released MaskDM checkpoint
        summary.append(f"Arm '{group}' starts from an external checkpoint ({', '.join(paths)}): what training it "
                       "cost is not in its budgets, so matched-budget comparisons flatter this arm.")
    summary += _unmatched_lines(data)
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
