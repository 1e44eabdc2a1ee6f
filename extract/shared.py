"""Helpers shared by stage one, stage two and the CLI: dihedral views, value scaling, progress display.

``dihedral`` gives the 8 views (rotations × flip) that extraction stores and pretraining / the baseline
sample; ``to_unit_range`` scales uint8 pixels to the UNet's [-1, 1]; ``stage_progress`` is a rich bar in
a terminal and a plain line every ``interval`` s in a log file; ``option_field`` gives a config dataclass
field its option's help.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
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


def dihedral(a: np.ndarray, view: int) -> np.ndarray:
    """View ``view`` (0..7) of the dihedral group on the last two axes: rot90 × (view % 4), then flip if ≥ 4."""
    out = np.rot90(a, k=view % 4, axes=(-2, -1))
    return np.ascontiguousarray(out[..., ::-1] if view >= 4 else out)


def to_unit_range(img8: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1], the UNet's input scale."""
    return img8.astype(np.float32) / 127.5 - 1.0


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


def option_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its option's help (``metadata["help"]``): the config dataclasses are the one
    source of the CLI's defaults and help texts (``pipeline.option``)."""
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)
