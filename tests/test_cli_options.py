"""The CLI's option helpers: defaults and help from a config dataclass, options shared between commands."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import typer
from typer.testing import CliRunner

from cli_support import friendly, option, shared_options


@dataclasses.dataclass
class Toy:
    a: int = dataclasses.field(default=3, metadata={"help": "The a."})
    b: tuple[int, ...] = (1, 2)
    c: Optional[str] = None


def _app() -> tuple[typer.Typer, list[Any]]:
    app, seen = typer.Typer(), []

    @app.command()
    @friendly
    @shared_options(b=(str, option(Toy, "b")), c=(Optional[str], option(Toy, "c", help="The c.")))
    def cmd(a: int = option(Toy, "a"), common: Optional[dict] = None) -> None:
        seen.append((a, common))

    return app, seen


def test_defaults_and_help_come_from_the_dataclass() -> None:
    app, seen = _app()
    result = CliRunner().invoke(app, [])
    assert result.exit_code == 0, result.output
    assert seen == [(3, {"b": "1,2", "c": None})]  # a tuple default reads as it is typed
    text = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "The a." in text and "The c." in text and "--b" in text


def test_shared_options_reach_the_command_as_one_dict() -> None:
    app, seen = _app()
    result = CliRunner().invoke(app, ["--a", "5", "--c", "x", "--b", "7"])
    assert result.exit_code == 0, result.output
    assert seen == [(5, {"b": "7", "c": "x"})]
