"""Progress in a log file: plain periodic lines instead of a bar that renders only at the end."""

from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from common.progress import LogProgress, stage_progress


def test_log_progress_prints_lines_without_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, width=120)
    progress = stage_progress(console, "extract", "images")
    assert isinstance(progress, LogProgress)
    progress.interval = 0.0
    with progress:
        task = progress.add_task("monuseg", total=4)
        progress.advance(task, 1)
        progress.update(task, advance=2, description="monuseg → store")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("extract monuseg 1/4 images (")
    assert lines[-1].startswith("extract monuseg → store 3/4 images (")


def test_a_terminal_gets_a_rich_bar() -> None:
    console = Console(file=io.StringIO(), force_terminal=True)
    assert isinstance(stage_progress(console, "fit", "epochs"), Progress)
