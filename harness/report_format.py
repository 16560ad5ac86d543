"""Number formatting shared by the report's tables, lines and figures."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd


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


def _digits(x: float) -> str:
    return ".4f" if abs(x) < 1 else ".2f"


def fmt_value(mean: float, std: float = math.nan, n: int = 1) -> str:
    if pd.isna(mean):
        return "—"
    digits = _digits(mean)
    if n > 1:
        return f"{mean:{digits}} ± {std:{digits}} (n={n})"
    return f"{mean:{digits}}"


def fmt_spread(mean: float, spread: float, n: int) -> str:
    """'22.00 ± 2.00 (n=3)' over seeds; '20.00 ± 0.60' for one run with its evaluation's std; '20.00' without."""
    if pd.isna(mean):
        return "—"
    if n > 1:
        return fmt_value(mean, spread, n)
    if not pd.isna(spread):
        return f"{mean:{_digits(mean)}} ± {spread:{_digits(mean)}}"
    return fmt_value(mean)


def fmt_signed(x: float, scale: float | None = None) -> str:
    if pd.isna(x):
        return "—"
    digits = _digits(scale if scale is not None else x)
    return f"{x:+{digits}}"


def fmt_interval(low: float, high: float, scale: float | None = None) -> str:
    """'[-12.12, -7.88]' (signed, in the value's digits)."""
    if pd.isna(low) or pd.isna(high):
        return "[no interval]"
    return f"[{fmt_signed(low, scale)}, {fmt_signed(high, scale)}]"


def fmt_multiple(x: float) -> str:
    """How many times the floor: 2.5 -> '2.5×', 530 -> '530×'."""
    return "—" if pd.isna(x) else (f"{x:.2g}×" if x < 100 else f"{x:,.0f}×")


def fmt_percent(x: float) -> str:
    """A cost ratio: 0.561 -> '56%', 2.3 -> '230%', inf -> 'not reached'."""
    if pd.isna(x):
        return "—"
    if math.isinf(x):
        return "not reached"
    return f"{x * 100:.3g}%"


@dataclass
class Table:
    """A table in plain strings, rendered to rich, markdown and HTML alike."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    note: str = ""


@dataclass
class Report:
    """What every rendering shows, in this order: the lead figure and summary table (the first screen), notes,
    the open sections (cost to reach), then the details (per-budget tables and their one-line conclusions, the
    final evaluations, the other figures), and the footer stating the statistics."""

    title: str
    summary: Table
    notes: list[str]
    sections: list[Table]
    details: list[Table]
    detail_lines: list[str]
    figures: dict[str, bytes]  # file name -> PNG; the first is the lead figure
    footer: list[str]
    lead_caption: str = ""
