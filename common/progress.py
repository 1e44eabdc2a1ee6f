"""The one progress display of every stage: a rich bar in a terminal, a plain line every ``interval`` s in a
log file (batch jobs, CI)."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

__all__ = ["LogProgress", "stage_progress"]


class LogProgress:
    """The subset of :class:`rich.progress.Progress` the stages use, printing plain lines (batch jobs, CI)."""

    def __init__(self, console: Console, stage: str, unit: str, interval: float = 30.0):
        self.console, self.stage, self.unit, self.interval = console, stage, unit, interval
        self.tasks: dict[int, dict[str, Any]] = {}
        self._last = time.monotonic()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        for task in self.tasks:
            self._print(task)

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> TaskID:
        task = len(self.tasks)
        self.tasks[task] = {"description": description, "total": total, "completed": completed,
                            "start": time.monotonic()}
        return TaskID(task)

    def advance(self, task: TaskID, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: TaskID, *, advance: float | None = None, completed: float | None = None,
               description: str | None = None, **_: Any) -> None:
        t = self.tasks[task]
        if completed is not None:
            t["completed"] = completed
        if advance:
            t["completed"] += advance
        if description is not None:
            t["description"] = description
        if time.monotonic() - self._last >= self.interval:
            self._print(task)

    def _print(self, task: int) -> None:
        t = self.tasks[task]
        elapsed = time.monotonic() - t["start"]
        total = f"/{t['total']:g}" if t["total"] else ""
        self.console.print(f"{self.stage} {t['description']} {t['completed']:g}{total} {self.unit} "
                           f"({elapsed:.0f} s)", highlight=False, markup=False)
        self._last = time.monotonic()


def stage_progress(console: Console, stage: str, unit: str, description: str = "{task.description}",
                   **kwargs: Any) -> Progress | LogProgress:
    """A progress display for ``stage`` counting ``unit``: a bar in a terminal, periodic lines otherwise."""
    if not console.is_terminal:
        return LogProgress(console, stage, unit)
    return Progress(TextColumn(f"[bold]{stage}[/] {description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(), console=console, **kwargs)
