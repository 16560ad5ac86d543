"""A `Report` rendered three ways with the same content in the same order: the terminal (rich), report.md and a
self-contained report.html (figures inline as base64 PNG, no external resource, so it opens offline from one
file). Lead figure and summary table first; the per-budget tables and other figures in a collapsible
<details> section (markdown too: GitHub and most viewers fold it); the footer states the statistics used.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from harness.fileio import atomic_write_bytes, atomic_write_text
from harness.report_format import Report, Table

DETAILS_SUMMARY = "Details: per-budget tables, final evaluations, more figures"


def _lead(report: Report) -> str | None:
    return next(iter(report.figures), None)


def _md_table(table: Table, level: str = "##") -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    out = [f"{level} {table.title}", ""] + ([table.note, ""] if table.note else [])
    out.append("| " + " | ".join(cell(c) for c in table.columns) + " |")
    out.append("|" + "---|" * len(table.columns))
    out += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return out + [""]


def to_markdown(report: Report) -> str:
    lead = _lead(report)
    out = [f"# {report.title}", ""]
    if lead:
        out += [f"![{report.lead_caption or lead}](figures/{lead})", ""]
    out += _md_table(report.summary)
    out += [f"- {line}" for line in report.notes] + ([""] if report.notes else [])
    for table in report.sections:
        out += _md_table(table)
    out += ["<details>", f"<summary>{DETAILS_SUMMARY}</summary>", ""]
    out += [f"- {line}" for line in report.detail_lines] + ([""] if report.detail_lines else [])
    for table in report.details:
        out += _md_table(table, "###")
    out += [f"![{name}](figures/{name})" for name in list(report.figures)[1:]]
    out += ["", "</details>", "", "---", "", "**Statistics.**", ""] + [f"- {line}" for line in report.footer]
    return "\n".join(out) + "\n"


def _html_table(table: Table, tag: str = "h2", table_id: str = "") -> list[str]:
    esc = html.escape
    ident = f" id='{table_id}'" if table_id else ""
    parts = [f"<{tag}>{esc(table.title)}</{tag}>"] + ([f"<p class='note'>{esc(table.note)}</p>"] if table.note else [])
    parts.append(f"<table{ident}><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in table.rows]
    return parts + ["</table>"]


def _img(name: str, png: bytes, ident: str = "", caption: str = "") -> str:
    esc = html.escape
    data = base64.b64encode(png).decode()
    attr = f' id="{ident}"' if ident else ""
    return (f'<figure><img{attr} alt="{esc(name)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{esc(caption or name)}</figcaption></figure>")


def to_html(report: Report) -> str:
    """One self-contained page (module docstring)."""
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(report.title)}</title><style>"
             "body{font-family:sans-serif;margin:1.2em 2em;max-width:1250px}h1{font-size:1.4em;margin:.2em 0}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right;font-size:.9em}th{background:#eee}td:nth-child(-n+2){text-align:left}"
             "td:last-child{text-align:left}.note{color:#555;font-size:.85em}img{max-width:100%}"
             "figure{margin:.3em 0}figcaption{color:#555;font-size:.85em}details{margin:1em 0}"
             "summary{cursor:pointer;font-weight:bold}footer{color:#444;font-size:.85em;border-top:1px solid #ccc;"
             "margin-top:1.5em}</style></head><body>",
             f"<h1>{esc(report.title)}</h1>"]
    lead = _lead(report)
    if lead:
        parts.append(_img(lead, report.figures[lead], "lead-figure", report.lead_caption))
    parts += _html_table(report.summary, table_id="summary")
    if report.notes:
        parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in report.notes) + "</ul>")
    for table in report.sections:
        parts += _html_table(table)
    parts.append(f"<details id='details'><summary>{esc(DETAILS_SUMMARY)}</summary>")
    if report.detail_lines:
        parts.append("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in report.detail_lines) + "</ul>")
    for table in report.details:
        parts += _html_table(table, "h3")
    parts += [_img(name, png) for name, png in list(report.figures.items())[1:]]
    parts.append("</details>")
    parts.append("<footer><p><b>Statistics.</b></p><ul>" + "".join(f"<li>{esc(line)}</li>" for line in report.footer)
                 + "</ul></footer>")
    return "\n".join(parts) + "\n</body></html>\n"


def _rich_table(table: Table):
    from rich.markup import escape
    from rich.table import Table as RichTable

    rich_table = RichTable(title=escape(table.title), caption=escape(table.note))
    for col in table.columns:
        rich_table.add_column(escape(col), overflow="fold")
    for row in table.rows:
        rich_table.add_row(*(escape(c) for c in row))
    return rich_table


def print_report(report: Report, console=None, folder: Path | None = None) -> None:
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # a log file has no width limit; do not squash the columns
    console.rule(escape(report.title))
    lead = _lead(report)
    if lead:
        where = folder / "figures" / lead if folder else Path("figures") / lead
        console.print(f"Figure: {escape(report.lead_caption or lead)}: {where}", highlight=False, soft_wrap=True)
    console.print(_rich_table(report.summary))
    for line in report.notes:
        console.print(f"• {escape(line)}", highlight=False)
    for table in report.sections:
        console.print(_rich_table(table))
    console.rule(DETAILS_SUMMARY)
    for line in report.detail_lines:
        console.print(f"• {escape(line)}", highlight=False)
    for table in report.details:
        console.print(_rich_table(table))
    console.rule("Statistics")
    for line in report.footer:
        console.print(f"• {escape(line)}", highlight=False)


def write_files(report: Report, folder: Path) -> Path:
    """report.md, report.html and figures/*.png in `folder`; returns the path of report.html."""
    for name, png in report.figures.items():
        atomic_write_bytes(folder / "figures" / name, png)
    atomic_write_text(folder / "report.md", to_markdown(report))
    atomic_write_text(folder / "report.html", to_html(report))
    return folder / "report.html"
