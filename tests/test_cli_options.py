"""The CLI's option helpers: defaults and help from a config dataclass, options shared between commands."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import pytest
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


FIT_CASES = [
    {},
    {"fusion": "none", "blocks": (4,), "steps": (50, 250), "dim": 16, "head_channels": (8, 4), "norm": "batch"},
    {"fusion": "concat", "shared_block": False, "pos_enc": True, "augment": False, "lr_drop_epoch": None,
     "text_dropout": 0.5, "dropout_classifier": "own", "view_text": "rewrite", "lr": 0.001, "batch_size": 2,
     "dice_on_logits": True, "attend_padding": True, "seed": 3, "train_count": 4, "val_every": 2,
     "precision": "bf16", "memory_budget_gb": 0.5, "subset_seed": 2, "epochs": 7},
    {"model": "plain-unet", "width": 16, "depth": 3, "augment": False, "lr_drop_epoch": None, "epochs": 2},
    {"text_gate": True, "shared_block": False},
]


@pytest.mark.parametrize("case", range(len(FIT_CASES)))
def test_a_runs_command_parses_back_to_its_config(case: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's command (train.export.fit_command, from the declarations) parsed by the CLI (options from the
    same declarations) gives the run's config back: no hand-kept table can drift."""
    import shlex

    import pipeline
    from train.config import FitConfig
    from train.export import fit_command

    cfg = FitConfig.flat(cache="s.zarr", out="run", **FIT_CASES[case])
    command = fit_command(cfg.to_json(), "s.zarr", "run")
    assert "Python API" not in command
    got: list[FitConfig] = []
    monkeypatch.setattr(pipeline, "_fit_and_report", got.append)
    res = CliRunner().invoke(pipeline.app, shlex.split(command)[1:])
    assert res.exit_code == 0, res.output
    assert got[0].to_json() == cfg.to_json()


def test_every_train_option_is_declared_once() -> None:
    from train.config import COMMAND_OPTIONS, SWITCHES, option_home

    for command, names in COMMAND_OPTIONS.items():
        assert len(set(names)) == len(names), command
        for name in names:
            assert name in SWITCHES or option_home(name)  # a field of FitConfig or a model's arguments


def test_a_switch_and_its_own_option_exclude_each_other() -> None:
    import pipeline

    res = CliRunner().invoke(pipeline.app, ["fit", "--cache", "s", "--out", "o", "--no-text", "--fusion", "concat"])
    assert res.exit_code == 1 and "--no-text and --fusion concat exclude each other" in res.stderr, res.output
