"""Stage two's bad files and options (docs/reliability.md, "Stage two: bad files and options"): a damaged or
malformed file of a run or model folder, a table without its columns, an option out of range or not finite.
Each case, through the CLI: exit 1, one ``error:`` line naming the file (its path) and what to do, or the flag as
the CLI spells it, no traceback, and every file of the folder as it was (bytes and mtime; nothing added).

One tiny store, fit, evaluation, export, unfinished fit and sweep cell are made once per module; each case
breaks one file of a copy."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import pipeline
import train.fit as fit_mod
from common.errors import OptionError
from cache.store import FeatureStore
from train.config import FitConfig

from helpers import error_line, tiny_store

HEAD = ["--epochs", "1", "--dim", "16", "--head-channels", "8,4"]
REFIT = "fit the run again with --overwrite"


class Stop(Exception):
    """Stops a fit right after an epoch's checkpoint (an unfinished run)."""


def ok(args: list[object]) -> None:
    res = CliRunner().invoke(pipeline.app, [str(a) for a in args])
    assert res.exit_code == 0, res.output


@dataclass(frozen=True)
class Made:
    """What the cases copy and run against."""

    root: Path
    store: Path
    run: Path          # fitted (1 epoch), evaluated on test
    legacy: Path       # the run with head.pt (torch.save) instead of model.safetensors
    unfinished: Path   # a 2-epoch fit stopped after epoch 1: INCOMPLETE, checkpoint.pt
    model: Path        # the run exported
    sweep: Path        # a sweep folder whose first cell (runs/b4-text) is fitted and evaluated
    image: Path        # a PNG of the store's first test image
    images: Path       # a folder holding it


@pytest.fixture(scope="module")
def made(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("bad-run-files")
    store = tiny_store(tiny_unet, root / "cache")
    run, legacy, unfinished, model = root / "run", root / "legacy", root / "unfinished", root / "model"
    ok(["fit", "--cache", store, "--out", run, *HEAD])
    ok(["evaluate", run, "--no-overlays"])
    ok(["export", run, "--out", model])
    shutil.copytree(run, legacy)
    torch.save(load_file(legacy / "model.safetensors"), legacy / "head.pt")
    (legacy / "model.safetensors").unlink()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(fit_mod, "pause_after", lambda epoch: (_ for _ in ()).throw(Stop()))
        with pytest.raises(Stop):
            fit_mod.fit(FitConfig.flat(cache=store, out=unfinished, epochs=2, dim=16, head_channels=(8, 4)))
    cell = root / "sweep" / "runs" / "b4-text"  # the sweep's first cell, as the sweep would fit it
    ok(["fit", "--cache", store, "--out", cell, "--blocks", "4", "--steps", "50,250", *HEAD])
    ok(["evaluate", cell, "--no-overlays"])
    images = root / "images"
    images.mkdir()
    from PIL import Image

    pixels = np.asarray(FeatureStore.open(store).images("test")[0, 0].compute()).transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(images / "a.png")
    return Made(root, store, run, legacy, unfinished, model, root / "sweep", images / "a.png", images)


def snapshot(folder: Path) -> dict[str, tuple[str, int] | str]:
    """Every file under ``folder`` (sha256 and mtime) and every folder, by relative path."""
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                                              if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


# ------------------------------------------------------------------ ways to break a file


def truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def empty(p: Path) -> None:
    p.write_bytes(b"")


def garbage(p: Path) -> None:
    p.write_bytes(np.random.default_rng(0).bytes(4096))


def remove(p: Path) -> None:
    p.unlink()


def foreign_names(p: Path) -> None:
    save_file({"x": torch.zeros(3)}, str(p))


def foreign_shapes(p: Path) -> None:
    save_file({k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in load_file(str(p)).items()}, str(p))


def not_json(p: Path) -> None:
    p.write_text('{"head": ')


def json_list(p: Path) -> None:
    p.write_text("[1, 2]")


def without(entry: str) -> Callable[[Path], None]:
    def drop(p: Path) -> None:
        p.write_text(json.dumps({k: v for k, v in json.loads(p.read_text()).items() if k != entry}))
    return drop


def head_argument(p: Path) -> None:
    config = json.loads(p.read_text())
    config["head"]["colour"] = "red"
    p.write_text(json.dumps(config))


def pickled(obj: object) -> Callable[[Path], None]:
    return lambda p: torch.save(obj, p)


def text(content: str) -> Callable[[Path], None]:
    return lambda p: p.write_text(content)


# ------------------------------------------------------------------ commands (d: the broken copy)

Command = Callable[[Path, Made, Path], list[object]]


def evaluate(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["evaluate", d, "--no-overlays"]


def export(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["export", d, "--out", tmp / "exported"]


def predict(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["predict", d, "--image", m.image, "--out", tmp / "mask.png"]


def resume(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["fit", "--cache", m.store, "--out", d, "--epochs", "2", "--dim", "16", "--head-channels", "8,4",
            "--resume"]


def resume_finished(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["fit", "--cache", m.store, "--out", d, *HEAD, "--resume"]


def sweep(d: Path, m: Made, tmp: Path) -> list[object]:
    return ["sweep", "--cache", m.store, "--out", d, *HEAD]


def texts_table(content: str | bytes) -> Command:
    def command(d: Path, m: Made, tmp: Path) -> list[object]:
        table = tmp / "texts.csv"
        table.write_bytes(content if isinstance(content, bytes) else content.encode())
        return ["predict", m.run, "--images", m.images, "--texts", table, "--out", d / "masks"]
    return command


def images_table(d: Path, m: Made, tmp: Path) -> list[object]:
    (tmp / "list.csv").write_text("file\na.png\n")
    return ["predict", m.run, "--images", tmp / "list.csv", "--out", d / "masks"]


@dataclass(frozen=True)
class Case:
    """One row of the table: break ``file`` of a copy of ``folder`` with ``damage``, run ``command``; the error
    line holds each of ``says`` ("{d}": the copy)."""

    folder: str
    file: str
    damage: Callable[[Path], None] | None
    command: Command
    says: tuple[str, ...]


W, C, K = "model.safetensors", "config.json", "checkpoint.pt"
CASES = {
    "weights-truncated-evaluate": Case("run", W, truncate, evaluate, ("{d}/" + W, "damaged", REFIT)),
    "weights-truncated-export": Case("run", W, truncate, export, ("{d}/" + W, "damaged", REFIT)),
    "weights-truncated-predict": Case("run", W, truncate, predict, ("{d}/" + W, "damaged", REFIT)),
    "weights-empty": Case("run", W, empty, evaluate, ("{d}/" + W, "empty (0 bytes)", REFIT)),
    "weights-random-bytes": Case("run", W, garbage, evaluate, ("{d}/" + W, "SafetensorError", REFIT)),
    "weights-missing": Case("run", W, remove, evaluate, ("{d}/" + W + ": not found", REFIT)),
    "weights-other-names": Case("run", W, foreign_names, export,
                                ("{d}/" + W, "not those of the model", "unexpected keys (1): x", REFIT)),
    "weights-other-shapes": Case("run", W, foreign_shapes, evaluate,
                                 ("{d}/" + W, "mis-shaped keys", "vs model", REFIT)),
    "head.pt-truncated": Case("legacy", "head.pt", truncate, evaluate, ("{d}/head.pt", "damaged", REFIT)),
    "head.pt-random-bytes": Case("legacy", "head.pt", garbage, evaluate, ("{d}/head.pt", "damaged", REFIT)),
    "config-missing": Case("run", C, remove, evaluate, ("{d}/" + C + " not found", REFIT)),
    "config-not-json-evaluate": Case("run", C, not_json, evaluate, ("{d}/" + C, "not valid JSON", REFIT)),
    "config-not-json-export": Case("run", C, not_json, export, ("{d}/" + C, "not valid JSON", REFIT)),
    "config-not-json-resume": Case("run", C, not_json, resume_finished, ("{d}/" + C, "not valid JSON", REFIT)),
    "config-a-list": Case("run", C, json_list, predict, ("{d}/" + C, "holds a list", REFIT)),
    "config-no-head": Case("run", C, without("head"), export, ("{d}/" + C, "has no 'head' entry", REFIT)),
    "config-no-blocks": Case("run", C, without("blocks"), evaluate, ("{d}/" + C, "has no 'blocks' entry", REFIT)),
    "config-head-unknown-argument": Case("run", C, head_argument, evaluate, ("{d}/" + C, "'colour'", REFIT)),
    "cache-key-missing": Case("run", "cache_key.json", remove, evaluate, ("{d}/cache_key.json: not found", REFIT)),
    "cache-key-not-json": Case("run", "cache_key.json", not_json, evaluate,
                               ("{d}/cache_key.json", "not valid JSON", REFIT)),
    "metrics-not-json-export": Case("run", "metrics.json", not_json, export,
                                    ("{d}/metrics.json", "not valid JSON", REFIT)),
    "metrics-a-list-resume": Case("run", "metrics.json", json_list, resume_finished,
                                  ("{d}/metrics.json", "holds a list", REFIT)),
    "metrics-no-best-epoch-sweep": Case("sweep", "runs/b4-text/metrics.json", without("best_epoch"), sweep,
                                        ("{d}/runs/b4-text/metrics.json", "has no 'best_epoch' entry", REFIT)),
    "summary-no-dice-export": Case("run", "eval-test/summary.json", without("dice"), export,
                                   ("{d}/eval-test/summary.json", "has no 'dice' entry", "evaluate the run again")),
    "summary-not-json-export": Case("run", "eval-test/summary.json", not_json, export,
                                    ("{d}/eval-test/summary.json", "not valid JSON",
                                     "evaluate the run again (`pipeline evaluate {d} --split test`)")),
    "checkpoint-truncated": Case("unfinished", K, truncate, resume,
                                 ("{d}/" + K, "damaged", "remove it", "--overwrite instead of --resume")),
    "checkpoint-random-bytes": Case("unfinished", K, garbage, resume, ("{d}/" + K, "damaged", "remove it")),
    "checkpoint-empty": Case("unfinished", K, empty, resume, ("{d}/" + K, "empty (0 bytes)", "remove it")),
    "checkpoint-not-a-mapping": Case("unfinished", K, pickled([1, 2]), resume, ("{d}/" + K, "holds a list")),
    "checkpoint-entries-missing": Case("unfinished", K, pickled({"epoch": 1}), resume,
                                       ("{d}/" + K, "has no 'model', 'optim'", "remove it")),
    "model-weights-truncated": Case("model", W, truncate, predict,
                                    ("{d}/" + W, "damaged", "export the run again (`pipeline export RUN --out {d}`)")),
    "model-weights-random-bytes": Case("model", W, garbage, predict, ("{d}/" + W, "export the run again")),
    "model-weights-other-names": Case("model", W, foreign_names, predict,
                                      ("{d}/" + W, "missing keys", "export the run again")),
    "model-weights-missing": Case("model", W, remove, predict, ("{d}/" + W + ": not found", "export the run again")),
    "model-config-missing": Case("model", C, remove, predict, ("{d}/" + C + ": not found", "export the run again")),
    "model-config-not-json": Case("model", C, not_json, predict, ("{d}/" + C, "not valid JSON", "export the run again")),
    "model-config-no-head": Case("model", C, without("head"), predict,
                                 ("{d}/" + C, "has no 'head' entry", "export the run again")),
    "sweep-cell-config-not-json": Case("sweep", "runs/b4-text/" + C, not_json, sweep,
                                       ("{d}/runs/b4-text/" + C, "not valid JSON", REFIT)),
    "sweep-cell-metrics-a-list": Case("sweep", "runs/b4-text/metrics.json", json_list, sweep,
                                      ("{d}/runs/b4-text/metrics.json", "holds a list", REFIT)),
    "sweep-cell-summary-empty": Case("sweep", "runs/b4-text/eval-test/summary.json", empty, sweep,
                                     ("{d}/runs/b4-text/eval-test/summary.json", "empty", "evaluate the run again")),
    "sweep-cell-weights-truncated": Case("sweep", "runs/b4-text/" + W, truncate, sweep,
                                         ("{d}/runs/b4-text/" + W, "damaged", REFIT)),
    "sweep-cell-cache-key-not-json": Case("sweep", "runs/b4-text/cache_key.json", not_json, sweep,
                                          ("{d}/runs/b4-text/cache_key.json", "not valid JSON", REFIT)),
    "texts-table-no-image-column": Case("out", "", None, texts_table("name,text\na.png,cells\n"),
                                        ("texts.csv: no image column", "first row must name the columns: image, text")),
    "texts-table-no-text-column": Case("out", "", None, texts_table("image,words\na.png,cells\n"),
                                       ("texts.csv: no text/description/caption column", "first row must name")),
    "texts-table-not-utf8": Case("out", "", None, texts_table(b"image,text\n\xff\xfe\xfa,x\n"),
                                 ("texts.csv: cannot read text table", "save it as a UTF-8 .csv or an .xlsx")),
    "images-table-no-image-column": Case("out", "", None, images_table,
                                         ("list.csv: no image column", "first row must name the columns: image")),
}


def _copy(made: Made, case: Case, tmp: Path) -> Path:
    """A copy of the case's folder, its file broken ("out": an empty folder, for the commands that write one)."""
    d = tmp / case.folder
    if case.folder == "out":
        d.mkdir()
        return d
    shutil.copytree(getattr(made, case.folder), d)
    if case.damage is not None:
        case.damage(d / case.file)
    return d


@pytest.mark.parametrize("name", CASES)
def test_bad_file(made: Made, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    d = _copy(made, case, tmp_path)
    before = snapshot(d)
    args = [str(a) for a in case.command(d, made, tmp_path)]
    line = error_line(args)
    for part in case.says:
        assert part.format(d=d) in line, line
    assert snapshot(d) == before
    assert not (tmp_path / "exported").exists() and not (tmp_path / "mask.png").exists()


# ------------------------------------------------------------------ options


OPTIONS = {  # (command, extra flags, the error line's start)
    "lr-0": ("fit", ["--lr", "0"], "--lr must be > 0, got 0.0"),
    "lr-negative": ("fit", ["--lr", "-1"], "--lr must be > 0, got -1.0"),
    "lr-nan": ("fit", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    "lr-inf": ("baseline", ["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    "epochs-0": ("fit", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    "batch-size-0": ("baseline", ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    "text-dropout-nan": ("fit", ["--text-dropout", "nan"], "--text-dropout must be a finite number in [0, 1), got nan"),
    "memory-budget-negative": ("fit", ["--memory-budget-gb", "-1"], "--memory-budget-gb must be >= 0, got -1.0"),
    "memory-budget-nan": ("fit", ["--memory-budget-gb", "nan"], "--memory-budget-gb must be a finite number >= 0"),
    "dim-0": ("fit", ["--dim", "0"], "--dim must be >= 1, got 0"),
    "dim-6-pos-enc": ("fit", ["--dim", "6", "--pos-enc"], "--dim must be divisible by 4 with --pos-enc"),
    "head-channels-0": ("fit", ["--head-channels", "8,0"], "--head-channels must be >= 1 each, got [8, 0]"),
    "train-count-0": ("fit", ["--train-count", "0"], "--train-count must be >= 1, got 0"),
    "val-every-0": ("baseline", ["--val-every", "0"], "--val-every must be >= 1, got 0"),
    "lr-drop-epoch-negative": ("fit", ["--lr-drop-epoch", "-1"], "--lr-drop-epoch must be >= 0, got -1"),
    "seed-negative": ("fit", ["--seed", "-1"], "--seed must be >= 0, got -1"),
    "subset-seed-negative": ("baseline", ["--subset-seed", "-1"], "--subset-seed must be >= 0, got -1"),
    "norm-unknown": ("fit", ["--norm", "layer"], "--norm must be one of ['image', 'batch'], got 'layer'"),
    "precision-unknown": ("fit", ["--precision", "fp8"], "--precision must be one of ['fp32', 'bf16', 'fp16']"),
    "width-0": ("baseline", ["--width", "0"], "--width must be >= 1, got 0"),
    "depth-0": ("baseline", ["--depth", "0"], "--depth must be >= 1, got 0"),
    "depth-too-deep": ("baseline", ["--depth", "6"], "--depth 6 needs an image size divisible by 2^6 = 64"),
}


@pytest.mark.parametrize("name", OPTIONS)
def test_bad_fit_option(made: Made, tmp_path: Path, name: str) -> None:
    """Refused before anything is read or written: a finished run fitted again with ``--overwrite`` keeps
    every file (its evaluation too)."""
    command, extra, start = OPTIONS[name]
    run = tmp_path / "run"
    shutil.copytree(made.run, run)
    before = snapshot(run)
    flags = ["--width", "4", "--depth", "2"] if command == "baseline" else HEAD[2:]
    line = error_line([command, "--cache", str(made.store), "--out", str(run), "--epochs", "1", *flags, *extra,
                       "--overwrite"])
    assert line.startswith(f"error: {start}"), line
    assert snapshot(run) == before


SWEEP_OPTIONS = {
    "sweep-epochs-0": (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    "sweep-dim-0": (["--dim", "0"], "--dim must be >= 1, got 0"),
    "sweep-memory-budget-nan": (["--memory-budget-gb", "nan"], "--memory-budget-gb must be a finite number >= 0"),
}


@pytest.mark.parametrize("name", SWEEP_OPTIONS)
def test_bad_sweep_option(made: Made, tmp_path: Path, name: str) -> None:
    extra, start = SWEEP_OPTIONS[name]
    out = tmp_path / "sweep"
    line = error_line(["sweep", "--cache", str(made.store), "--out", str(out), *HEAD, *extra])
    assert line.startswith(f"error: {start}"), line
    assert not out.exists()


def test_bad_evaluate_options_leave_the_evaluation(made: Made, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(made.run, run)
    before = snapshot(run)
    assert error_line(["evaluate", str(run), "--precision", "fp8"]).startswith(
        "error: --precision must be one of ['fp32', 'bf16', 'fp16'], got 'fp8'")
    assert error_line(["evaluate", str(run), "--text", "shuffled", "--text-seed", "-1"]) == \
        "error: --text-seed must be >= 0, got -1"
    assert snapshot(run) == before


def test_bad_predict_precision_writes_nothing(made: Made, tmp_path: Path) -> None:
    out = tmp_path / "masks"
    line = error_line(["predict", str(made.run), "--images", str(made.images), "--out", str(out), "--precision", "fp8"])
    assert line.startswith("error: --precision must be one of"), line
    assert not out.exists()


@pytest.mark.parametrize("value", [0.0, 1.0, float("nan")])
def test_val_fraction_python_only(value: float) -> None:
    """``val_fraction`` has no flag: the Python API refuses it by its keyword."""
    with pytest.raises(OptionError, match=r"^val_fraction must (lie|be a finite number) in \(0, 1\)") as info:
        FitConfig(cache=Path("s"), out=Path("o"), val_fraction=value)
    assert info.value.option == "val_fraction"


def test_precision_names_are_the_devices() -> None:
    from common.devices import PRECISIONS
    from train.config import PRECISION_NAMES

    assert tuple(PRECISIONS) == PRECISION_NAMES
