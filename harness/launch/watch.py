"""Showing launched stages: a live rich table on a terminal, one line per state change otherwise (CI logs)."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from harness.launch.state import QueueEntry, StageState, stage_state

_STYLE = {"done": "green", "running": "cyan", "queued": "yellow", "requeued": "magenta", "failed": "bold red",
          "pending": "dim", "blocked": "yellow", "unknown": "dim"}


@dataclass
class Row:
    experiment: str
    stage: str  # e.g. "two_stage/pretrain" or just the stage name
    stage_id: str
    state: StageState
    steps: int | None = None


def status_table(rows: list[Row], title: str = "") -> Any:
    from rich.table import Table

    table = Table(title=title or None, title_justify="left")
    for column in ("experiment", "stage", "id", "job", "state", "step", "loss", "detail"):
        table.add_column(column, no_wrap=column not in ("detail",),
                         justify="right" if column in ("step", "loss") else "left")
    for row in rows:
        s = row.state
        step = "" if s.step is None else f"{s.step}" + (f"/{row.steps}" if row.steps else "")
        loss = "" if s.loss is None else f"{s.loss:.4f}"
        table.add_row(row.experiment, row.stage, row.stage_id[:8], s.job_id or "",
                      f"[{_STYLE.get(s.state, '')}]{s.state}[/]", step, loss, s.detail)
    return table


class Watcher:
    """Polls the stage folders (and the queue the caller passes) while a launch waits for its jobs."""

    def __init__(self, jobs: list[Any], live: bool | None = None) -> None:
        self.jobs = jobs
        self.live = None
        self.last: dict[str, str] = {}
        if live if live is not None else sys.stderr.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=1, transient=False)
            self.live.start()

    def update(self, queue: dict[str, QueueEntry] | None = None) -> dict[str, StageState]:
        states = {job.stage_id: stage_state(job.stage_dir, queue) for job in self.jobs}
        if self.live is not None:
            rows = [Row(job.experiment, job.name, job.stage_id, states[job.stage_id]) for job in self.jobs]
            self.live.update(status_table(rows))
        else:
            for job in self.jobs:
                state = states[job.stage_id]
                if self.last.get(job.stage_id) != state.state:
                    self.last[job.stage_id] = state.state
                    job_id = f" job {state.job_id}" if state.job_id else ""
                    print(f"[harness] {job.experiment}/{job.name} ({job.stage_id[:8]}){job_id}: {state.state}"
                          + (f" ({state.detail})" if state.detail and state.state != "done" else ""),
                          file=sys.stderr, flush=True)
        return states

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
