"""Resumable fits: a fit interrupted after a seeded random epoch (an exception in this process, or a
SIGKILL of ``pipeline fit``) and resumed equals an uninterrupted fit; the resume rules."""

from __future__ import annotations

import csv
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train.fit as fit_mod
from common.errors import OptionError
from train.runs import rundir
from train.fit import FitConfig, fit
from train.runs.resume import PAUSE_ENV


REPO = Path(__file__).resolve().parents[1]
EPOCHS = 6


@pytest.fixture(scope="module")
def reference(store_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted fit of :func:`cfg` (lr drop inside the run; BatchNorm, so running statistics)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    fit(cfg(store_path, run))
    return run


def cfg(store: Path, out: Path, **kw) -> FitConfig:
    return FitConfig.flat(cache=store, out=out, epochs=EPOCHS, dim=16, head_channels=(8, 4), norm="batch",
                          lr=1e-3, lr_drop_epoch=3, **kw)


def flags(store: Path, out: Path) -> list[str]:
    """``pipeline fit`` with :func:`cfg`'s settings."""
    return ["fit", "--cache", str(store), "--out", str(out), "--epochs", str(EPOCHS), "--dim", "16",
            "--head-channels", "8,4", "--norm", "batch", "--lr", "1e-3", "--lr-drop-epoch", "3"]


def seeded_epoch(seed: int) -> int:
    """The epoch after which to interrupt: seeded, before the last."""
    return int(np.random.default_rng(seed).integers(1, EPOCHS))


def assert_same_run(run: Path, ref: Path) -> None:
    """The same weights, history.csv apart from seconds, metrics.json apart from seconds."""
    a, b = (rundir.load_weights(p) for p in (run, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def history(p: Path) -> list[dict[str, str]]:
        with (p / rundir.HISTORY).open(newline="") as f:
            return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in csv.DictReader(f)]

    def metrics(p: Path) -> dict:
        return {k: v for k, v in rundir.read_json(p / rundir.METRICS).items() if k != "seconds"}

    assert history(run) == history(ref) and len(history(run)) == EPOCHS
    assert metrics(run) == metrics(ref)
    assert rundir.fit_finished(run) and not rundir.has_checkpoint(run)


class Stop(Exception):
    pass


def interrupted(c: FitConfig, after: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``c`` until an exception right after epoch ``after``'s checkpoint."""
    def stop(epoch: int) -> None:
        if epoch == after:
            raise Stop
    with monkeypatch.context() as m:
        m.setattr(fit_mod, "pause_after", stop)
        with pytest.raises(Stop):
            fit(c)


@pytest.mark.parametrize("seed", [0, 1])
def test_interrupted_fit_resumes_to_the_same_run(store_path: Path, reference: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch, seed: int) -> None:
    run, after = tmp_path / "run", seeded_epoch(seed)
    interrupted(cfg(store_path, run), after, monkeypatch)
    assert (run / rundir.INCOMPLETE).exists() and rundir.load_checkpoint(run)["epoch"] == after
    fit(cfg(store_path, run, resume=True))
    assert_same_run(run, reference)


def test_streamed_resume_equals_in_memory(store_path: Path, reference: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    interrupted(cfg(store_path, run), 2, monkeypatch)
    fit(cfg(store_path, run, resume=True, memory_budget_gb=0.0))  # the budget is not a setting of the result
    assert_same_run(run, reference)


@pytest.mark.parametrize("classifier", ["shared", "own"])
def test_resume_with_text_dropout_is_bit_identical(store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   classifier: str) -> None:
    """The dropout draws are a function of (seed, epoch, sample): a resumed fit withholds the same texts (and,
    with a classifier of their own, keeps that classifier's best epoch so far). Another dropout probability is
    another setting: refused."""
    reference = tmp_path / "reference"
    fit(cfg(store_path, reference, text_dropout=0.5, dropout_classifier=classifier))
    run = tmp_path / "run"
    interrupted(cfg(store_path, run, text_dropout=0.5, dropout_classifier=classifier), seeded_epoch(3), monkeypatch)
    with pytest.raises(ValueError, match=r"other settings \(text_dropout: 0\.5 there, 0\.25 now"):
        fit(cfg(store_path, run, text_dropout=0.25, dropout_classifier=classifier, resume=True))
    fit(cfg(store_path, run, text_dropout=0.5, dropout_classifier=classifier, resume=True))
    assert_same_run(run, reference)


def test_resume_rules(store_path: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    interrupted(cfg(store_path, run), 2, monkeypatch)
    with pytest.raises(OptionError, match=r"resume=True") as e:
        fit(cfg(store_path, run))
    assert e.value.option == "resume"
    with pytest.raises(ValueError, match=r"other settings \(lr: 0\.001 there, 0\.01 now") as e:
        fit(dataclasses.replace(cfg(store_path, run), lr=1e-2, resume=True))
    assert rundir.load_checkpoint(run)["epoch"] == 2  # refusals leave the checkpoint as it was
    state = rundir.load_checkpoint(run)
    assert set(state) >= {"model", "optim", "schedule", "best", "torch_rng", "numpy_rng", "history", "fit",
                          "cache_key_hash"}
    assert state["best"]["epoch"] in (1, 2) and len(state["history"]) == 2
    assert any("running_mean" in k for k in state["model"])           # BatchNorm statistics
    n_train = len(rundir.read_json(run / rundir.CONFIG)["train_ids"])
    assert all(int(s["step"]) == 2 * n_train for s in state["optim"]["state"].values())  # Adam's step counts
    metrics = fit(cfg(store_path, run, resume=True))
    assert fit(cfg(store_path, run, resume=True)) == metrics          # finished: nothing to do
    assert_same_run(run, reference)


def test_resume_without_checkpoint_starts_afresh(store_path: Path, reference: Path, tmp_path: Path) -> None:
    fit(cfg(store_path, tmp_path / "run", resume=True))
    assert_same_run(tmp_path / "run", reference)


def test_cli_refusal_names_the_flag(store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import pipeline

    run = tmp_path / "run"
    interrupted(cfg(store_path, run), 1, monkeypatch)
    res = CliRunner().invoke(pipeline.app, flags(store_path, run))
    assert res.exit_code != 0 and "--resume" in res.stderr and "resume=True" not in res.stderr, res.stderr


def child(args: list[str], **env: str) -> subprocess.Popen:
    """``pipeline`` as a child process (to be killed), one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([sys.executable, str(REPO / "pipeline.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_fit_killed_at_a_seeded_epoch_resumes_to_the_same_run(store_path: Path, reference: Path,
                                                                tmp_path: Path) -> None:
    """SIGKILL ``pipeline fit`` once epoch k's checkpoint is written (k seeded; the fit waits there), then
    ``pipeline fit --resume``: the run equals the uninterrupted reference."""
    run, k = tmp_path / "run", seeded_epoch(2026)
    proc = child(flags(store_path, run), **{PAUSE_ENV: str(k)})
    try:
        import time
        end = time.monotonic() + 240
        while not (rundir.has_checkpoint(run) and rundir.load_checkpoint(run)["epoch"] == k):
            assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL and (run / rundir.INCOMPLETE).exists()
    assert not (run / rundir.METRICS).exists()
    res = child([*flags(store_path, run), "--resume"])
    out, err = res.communicate(timeout=240)
    assert res.returncode == 0, err
    assert f"resuming after epoch {k}" in err
    assert_same_run(run, reference)
