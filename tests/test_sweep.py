"""sweep (Fig. 3): one fit per single block and per single step, with and without text; resumable."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import train.evaluate
import train.fit
from helpers import quiet, tiny_store
from train.runs import rundir
from train.sweep import CSV_COLUMNS, sweep, sweep_plan

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASE = {"dim": 16, "head_channels": (8, 4)}
NAMES = ["b4-text", "b4-notext", "b8-text", "b8-notext", "t50-text", "t50-notext", "t250-text", "t250-notext"]


console = quiet


@pytest.fixture(scope="module")
def store_path(tiny_unet, tmp_path_factory) -> Path:
    return tiny_store(tiny_unet, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def swept(store_path, tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("sweep")
    return out, sweep(store_path, out, epochs=1, base=BASE, console=console())


def rows_of(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def forbid(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("a finished run was redone")

    monkeypatch.setattr(train.fit, "fit", fail)
    monkeypatch.setattr(train.evaluate, "evaluate", fail)


def test_plan_covers_blocks_then_steps_with_and_without_text():
    plan = sweep_plan((4, 8), (50, 250))
    assert [p.name for p in plan] == NAMES
    assert [(p.blocks, p.steps) for p in plan[::2]] == [((4,), (50, 250)), ((8,), (50, 250)),
                                                        ((4, 8), (50,)), ((4, 8), (250,))]
    assert [(p.block, p.step) for p in plan[::2]] == [(4, None), (8, None), (None, 50), (None, 250)]


def test_grid_plan_adds_every_pair_after_the_marginals():
    plan = sweep_plan((4, 8), (50, 250), grid=True)
    assert [p.name for p in plan[:8]] == NAMES
    assert [p.name for p in plan[8:]] == [f"b{b}-t{s}-{t}" for b in (4, 8) for s in (50, 250)
                                          for t in ("text", "notext")]
    assert all(p.kind == "pair" and p.blocks == (p.block,) and p.steps == (p.step,) for p in plan[8:])
    assert [p.with_text for p in plan[8:10]] == [True, False] and [p.text for p in plan[8:10]] == ["yes", "no"]


def test_sweep_writes_eight_rows_and_a_heatmap(swept):
    out, csv_path = swept
    assert csv_path == out / "sweep.csv"
    rows = rows_of(csv_path)
    assert len(rows) == 8 and list(rows[0]) == list(CSV_COLUMNS)
    assert [(r["kind"], r["block"], r["step"], r["text"]) for r in rows] == [
        (k, *bs, t) for k, cells in (("block", (("4", ""), ("8", ""))), ("step", (("", "50"), ("", "250"))))
        for bs in cells for t in ("yes", "no")]
    assert [r["run"] for r in rows] == [f"runs/{n}" for n in NAMES]
    png = out / "sweep.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


def test_each_run_has_its_selection_and_its_numbers(swept):
    out, csv_path = swept
    for row in rows_of(csv_path):
        run = out / row["run"]
        config = json.loads((run / "config.json").read_text())
        if row["kind"] == "block":
            assert config["blocks"] == [int(row["block"])] and config["steps"] == [50, 250]
        else:
            assert config["blocks"] == [4, 8] and config["steps"] == [int(row["step"])]
        assert config["fit"]["fusion"] == ("cross-attn" if row["text"] == "yes" else "none")
        assert config["head"]["fusion"] == config["fit"]["fusion"]
        assert config["fit"]["epochs"] == 1 and config["fit"]["dim"] == 16 and config["fit"]["head_channels"] == [8, 4]
        summary = json.loads((run / "eval-test" / "summary.json").read_text())
        metrics = json.loads((run / "metrics.json").read_text())
        assert float(row["test_dice"]) == pytest.approx(summary["dice"], abs=1e-6)
        assert float(row["test_iou"]) == pytest.approx(summary["iou"], abs=1e-6)
        assert float(row["val_dice"]) == pytest.approx(metrics["best_val_dice"], abs=1e-6)
        assert summary["n_images"] == 3 and not (run / "eval-test" / "overlays").exists()


def test_second_call_reuses_every_run(swept, store_path, monkeypatch):
    out, csv_path = swept
    before = csv_path.read_text()
    forbid(monkeypatch)
    con = console()
    assert sweep(store_path, out, epochs=1, base=BASE, console=con) == csv_path
    log = con.file.getvalue()
    assert log.count("reusing the finished run") == 8
    assert csv_path.read_text() == before


def test_partial_runs_are_completed(swept, store_path, monkeypatch):
    out, csv_path = swept
    before = {r["run"]: r for r in rows_of(csv_path)}
    # one run lost its evaluation, another's fit never finished
    (out / "runs" / "b8-notext" / "eval-test" / "summary.json").unlink()
    (out / "runs" / "t250-text" / "INCOMPLETE").write_text("")
    calls = {"fit": [], "evaluate": []}
    real_fit, real_evaluate = train.fit.fit, train.evaluate.evaluate

    def fit(cfg, console=None):
        calls["fit"].append(Path(cfg.out).name)
        return real_fit(cfg, console=console)

    def evaluate(run, **kwargs):
        calls["evaluate"].append(Path(run).name)
        return real_evaluate(run, **kwargs)

    monkeypatch.setattr(train.fit, "fit", fit)
    monkeypatch.setattr(train.evaluate, "evaluate", evaluate)
    sweep(store_path, out, epochs=1, base=BASE, console=console())
    assert calls == {"fit": ["t250-text"], "evaluate": ["b8-notext", "t250-text"]}
    after = {r["run"]: r for r in rows_of(csv_path)}
    assert after["runs/b8-notext"] == before["runs/b8-notext"]  # same head, same test set, same numbers
    assert after["runs/t250-text"] == before["runs/t250-text"]  # CPU fits are deterministic
    assert not (out / "runs" / "t250-text" / "INCOMPLETE").exists()


def test_changed_settings_are_refused_not_reused(swept, store_path, monkeypatch):
    out, _ = swept
    forbid(monkeypatch)
    with pytest.raises(ValueError, match="other settings.*dim"):
        sweep(store_path, out, epochs=1, base={**BASE, "dim": 8}, console=console())
    with pytest.raises(ValueError, match="other settings.*epochs"):
        sweep(store_path, out, epochs=2, base=BASE, console=console())


def test_base_cannot_set_what_the_sweep_sets(store_path, tmp_path):
    with pytest.raises(ValueError, match="fusion"):
        sweep(store_path, tmp_path, epochs=1, base={"fusion": "concat"}, console=console())
    with pytest.raises(ValueError, match="nonsense"):
        sweep(store_path, tmp_path, epochs=1, base={"nonsense": 1}, console=console())
    with pytest.raises(ValueError, match="epochs"):
        sweep(store_path, tmp_path, epochs=0, base=BASE, console=console())


def test_grid_reuses_the_marginals_and_adds_the_pairs(swept, store_path, tmp_path):
    out, csv_path = swept
    grid_out = tmp_path / "grid"
    shutil.copytree(out, grid_out)
    con = console()
    path = sweep(store_path, grid_out, epochs=1, base=BASE, console=con, grid=True)
    assert con.file.getvalue().count("reusing the finished run") == 8
    rows = rows_of(path)
    assert rows[:8] == rows_of(csv_path)
    pairs = rows[8:]
    assert [(r["kind"], r["block"], r["step"], r["text"]) for r in pairs] == [
        ("pair", b, s, t) for b in ("4", "8") for s in ("50", "250") for t in ("yes", "no")]
    for row in pairs:
        config = json.loads((grid_out / row["run"] / "config.json").read_text())
        assert config["blocks"] == [int(row["block"])] and config["steps"] == [int(row["step"])]
        assert config["fit"]["fusion"] == ("cross-attn" if row["text"] == "yes" else "none")
    with Image.open(grid_out / "grid.png") as im:
        assert im.format == "PNG" and im.size[0] > im.size[1]  # 2 block rows × 4 (step, text) columns
    assert not (out / "grid.png").exists()


def test_a_sweep_on_a_local_cluster_equals_the_serial_one(swept, store_path, tmp_path):
    """``scheduler="local:2"``: one fit per dask task in two worker processes, each writing its own run
    folder; at the same thread count the CSV holds the serial sweep's numbers exactly."""
    out, serial = swept
    con = console()
    parallel = sweep(store_path, tmp_path / "sweep", epochs=1, base=BASE, console=con, scheduler="local:2")
    assert rows_of(parallel) == rows_of(serial)
    assert "fit (blocks" in con.file.getvalue()
    assert all((tmp_path / "sweep" / r["run"] / rundir.WEIGHTS).is_file() for r in rows_of(parallel))


def test_a_bad_scheduler_is_refused_before_any_fit(store_path, tmp_path, monkeypatch):
    forbid(monkeypatch)
    with pytest.raises(Exception, match="scheduler 'nowhere': expected local:N"):
        sweep(store_path, tmp_path / "s", epochs=1, base=BASE, console=console(), scheduler="nowhere")
    assert not (tmp_path / "s").exists()


def test_unfinished_fit_is_continued_with_resume_else_redone(swept, store_path, monkeypatch):
    from train.runs import rundir
    from train.config import FitConfig

    out, csv_path = swept
    before = rows_of(csv_path)
    run = out / "runs" / "t250-text"

    def interrupt() -> None:  # t250-text killed after its checkpoint
        def stop(epoch: int) -> None:
            raise KeyboardInterrupt
        with monkeypatch.context() as m:
            m.setattr(train.fit, "pause_after", stop)
            with pytest.raises(KeyboardInterrupt):
                train.fit.fit(FitConfig.flat(**BASE, cache=store_path, out=run, blocks=(4, 8), steps=(250,),
                                             epochs=1, overwrite=True), console=console())
        assert rundir.has_checkpoint(run) and (run / "INCOMPLETE").exists()

    for base, said in (({**BASE, "resume": True}, "continuing the unfinished fit"), (BASE, "t250-text: fit (")):
        interrupt()
        con = console()
        sweep(store_path, out, epochs=1, base=base, console=con)
        assert said in con.file.getvalue()
        assert rows_of(csv_path) == before and rundir.fit_finished(run) and not rundir.has_checkpoint(run)
