"""Nothing stale is reported as current: a finished run is not refitted over by accident, an overwrite leaves no
old evaluation, an evaluation counts only for the weights it scored, and older ``head.pt`` runs still load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from common.errors import OptionError
from train.runs import rundir
from train.evaluate import evaluate
from train.fit import FitConfig, fit
from train.runs.loading import load_run

from helpers import error_line, quiet


@pytest.fixture(scope="module")
def evaluated_run(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "run"
    fit(tiny_fit(store_path, run), console=quiet())
    evaluate(run, split="test", overlays=False, console=quiet())
    evaluate(run, split="test", text="none", overlays=False, console=quiet())
    return run


def tiny_fit(store: Path, out: Path, **kw) -> FitConfig:
    return FitConfig.flat(**{"cache": store, "out": out, "epochs": 1, "dim": 16, "head_channels": (8, 4), **kw})


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def test_a_refit_over_a_finished_run_is_refused(evaluated_run: Path, store_path: Path, tmp_path: Path) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(OptionError, match="holds a finished run: pass overwrite=True") as e:
        fit(tiny_fit(store_path, run, epochs=2), console=quiet())
    assert e.value.options[:2] == ("overwrite", "resume")
    line = error_line(["fit", "--cache", str(store_path), "--out", str(run), "--epochs", "2", "--dim", "16"])
    assert "--overwrite" in line and str(run) in line and "overwrite=True" not in line
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # untouched


def test_an_overwrite_removes_every_evaluation_first(evaluated_run: Path, store_path: Path, tmp_path: Path) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    assert sorted(d.name for d in run.glob("eval-*")) == ["eval-test", "eval-test-text-none"]
    fit(tiny_fit(store_path, run, epochs=2, overwrite=True), console=quiet())
    assert not list(run.glob("eval-*")) and rundir.fit_finished(run)
    assert rundir.read_json(run / rundir.METRICS)["epochs"] == 2
    assert "overwrite" not in rundir.read_json(run / rundir.CONFIG)["fit"]  # how it ran, not what it is
    with pytest.raises(OptionError, match="exclude each other"):
        tiny_fit(store_path, run, resume=True, overwrite=True)


def test_a_resume_of_a_finished_run_reads_no_feature(evaluated_run: Path, store_path: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    import train.fit

    monkeypatch.setattr(train.fit, "open_split", lambda *a, **k: pytest.fail("the store's rows were read"))
    assert fit(tiny_fit(store_path, run, resume=True), console=quiet()) == rundir.read_json(run / rundir.METRICS)


def test_an_evaluation_counts_only_for_the_weights_it_scored(evaluated_run: Path, tmp_path: Path) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    summary = rundir.read_json(rundir.eval_dir(run, "test") / rundir.SUMMARY)
    assert summary["weights_sha256"] == rundir.weights_sha256(run) and len(summary["weights_sha256"]) == 64
    assert rundir.evaluated(run, "test") and rundir.evaluated(run, "test", "none")
    assert rundir.evaluated_splits(run) == ["test"]
    state = rundir.load_weights(run)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1  # a swapped head: other weights in the folder
    rundir.save_weights(run, state)
    assert not rundir.evaluated(run, "test") and not rundir.evaluated(run, "test", "none")
    assert rundir.evaluated_splits(run) == []
    # an older summary, without the hash, cannot say what it scored
    older = copy_run(evaluated_run, tmp_path / "older")
    path = rundir.eval_dir(older, "test") / rundir.SUMMARY
    path.write_text(json.dumps({k: v for k, v in rundir.read_json(path).items() if k != "weights_sha256"}))
    assert not rundir.evaluated(older, "test")
    assert rundir.main(["evaluated", str(older), "test"]) == 1 and rundir.main(["evaluated", str(run), "test"]) == 1
    assert rundir.main(["evaluated", str(evaluated_run), "test"]) == 0


def test_an_older_head_pt_run_still_loads(evaluated_run: Path, tmp_path: Path) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    state = rundir.load_weights(run)
    (run / rundir.WEIGHTS).unlink()
    torch.save(state, run / rundir.LEGACY_WEIGHTS)  # the layout before safetensors
    assert rundir.weights_file(run).name == "head.pt"
    _, model, _ = load_run(run)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    summary = evaluate(run, split="test", overlays=False, console=quiet())
    assert rundir.evaluated(run, "test") and summary["weights_sha256"] == rundir.weights_sha256(run)
    rundir.save_weights(run, state)  # written again: safetensors, and one set of weights
    assert sorted(p.name for p in run.glob("*.pt")) == [] and (run / rundir.WEIGHTS).is_file()
