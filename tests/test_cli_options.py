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


@dataclasses.dataclass
class Typed:
    steps: tuple[int, ...] = dataclasses.field(default=(50, 150), metadata={"help": "Steps."})
    splits: Optional[tuple[str, ...]] = None
    size: int = 8
    colour: str = "rgb"


def test_config_options_take_every_field_with_its_type_and_give_the_values_back() -> None:
    from cli_support import config_options, config_values

    app, seen = typer.Typer(), []

    @app.command()
    @shared_options(**config_options(Typed, colour=("bgr", (bool, typer.Option(False, "--bgr")))))
    def cmd(common: Optional[dict] = None) -> None:
        seen.append(config_values(Typed, common or {}))

    assert CliRunner().invoke(app, []).exit_code == 0
    assert seen[-1] == {"steps": (50, 150), "splits": None, "size": 8}  # the replaced field is the command's
    result = CliRunner().invoke(app, ["--steps", "7,9", "--splits", "train, test", "--size", "4", "--bgr"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == {"steps": (7, 9), "splits": ("train", "test"), "size": 4}
    assert CliRunner().invoke(app, ["--size", "x"]).exit_code == 2  # typed: an int option refuses text
    bad = CliRunner().invoke(app, ["--steps", "a"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--steps takes comma-separated integers" in bad.output
