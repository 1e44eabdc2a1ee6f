"""Kills, Ctrl-C and a full disk, on a small copy of the real MoNuSeg data: whatever happens, the store
re-run to the end equals an uninterrupted run's, file for file, and a fit folder is complete or marked so.

The 20 seeded SIGKILL trials of ``extract`` are opt-in (``-m slow``); CI runs 3 of them.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import zarr.storage._local as zarr_local

from cache.lock import lock_path
from cache.maintenance import verify_store
from train.runs.rundir import INCOMPLETE, fit_finished, has_checkpoint
from tests.reliability.conftest import (cli, child, digest, done_rows, extract_args, finish, mini_monuseg, stores,
                                        wait_for)

COUNTS = {"train": 6, "val": 2, "test": 2}  # 10 images x (base + 4 pairs) = 50 committed rows


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(mini MoNuSeg folder, the store of one uninterrupted extract of it)."""
    base = tmp_path_factory.mktemp("kills")
    root = mini_monuseg(base / "monuseg", COUNTS)
    res = cli(extract_args(root, base / "reference"))
    assert res.code == 0, res.stderr
    return root, stores(base / "reference")[0]


def assert_like_reference(store: Path, ref: Path) -> None:
    assert digest(store) == digest(ref)
    assert verify_store(store).ok
    assert lock_path(store).read_text() == ""  # the last writer finished cleanly


def kill_trial(root: Path, ref: Path, cache: Path, rng: np.random.Generator) -> dict:
    """Start an extract, SIGKILL it once ``target`` rows are committed (plus a few ms), re-run it to the end."""
    total = done_rows(ref)
    target, jitter = int(rng.integers(0, total)), float(rng.uniform(0, 0.03))
    store = cache / ref.name
    proc = child(extract_args(root, cache))
    wait_for(lambda: proc.poll() is not None or (store.is_dir() and done_rows(store) >= target))
    time.sleep(jitter)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()
    at_kill = done_rows(store) if store.is_dir() else 0
    res = finish(child(extract_args(root, cache)))
    assert res.code == 0, res.stderr
    assert_like_reference(store, ref)
    return {"target": target, "killed": killed, "rows_at_kill": at_kill, "rows": total}


def run_trials(root: Path, ref: Path, tmp_path: Path, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    trials = [kill_trial(root, ref, tmp_path / f"trial-{i}", rng) for i in range(n)]
    (tmp_path / "trials.json").write_text(json.dumps(trials, indent=1))
    mid_run = [t for t in trials if t["killed"] and 0 < t["rows_at_kill"] < t["rows"]]
    assert mid_run, f"no kill landed mid-run: {trials}"
    return trials


def test_extract_killed_three_times_resumes_to_the_same_store(reference: tuple[Path, Path], tmp_path: Path) -> None:
    run_trials(*reference, tmp_path, n=3, seed=0)


@pytest.mark.slow
def test_extract_killed_at_20_random_points(reference: tuple[Path, Path], tmp_path: Path) -> None:
    trials = run_trials(*reference, tmp_path, n=20, seed=2026)
    print(json.dumps(trials))


def interruptible() -> None:
    """In the child before exec: Ctrl-C's default action, as in a terminal (a suite started in the background
    by a shell inherits SIGINT ignored, and so would the child), and a low priority, so the poller runs — not the
    lowest: beside other work on the machine a nice-19 child can starve for minutes."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.nice(10)


def test_ctrl_c_keeps_what_was_committed(reference: tuple[Path, Path], tmp_path: Path) -> None:
    root, ref = reference
    for attempt in range(3):  # on a loaded machine the child may finish before it is stopped: try again
        cache = tmp_path / f"cache-{attempt}"
        store = cache / ref.name
        proc = child(extract_args(root, cache), preexec_fn=interruptible)
        assert wait_for(lambda: proc.poll() is not None or (store.is_dir() and done_rows(store) >= 5), timeout=600)
        proc.send_signal(signal.SIGSTOP)  # freeze it where it is, so that Ctrl-C lands mid-run
        if proc.poll() is None and done_rows(store) < done_rows(ref):
            break
        proc.send_signal(signal.SIGCONT)
        finish(proc)
    else:
        pytest.fail("the extract finished each of 3 times before it could be stopped mid-run")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    res = finish(proc)
    assert res.code == 130, res.stderr
    assert "interrupted" in res.stderr and "run the same command to resume" in res.stderr
    assert "Traceback" not in res.stderr
    assert 0 < done_rows(store) < done_rows(ref)
    assert verify_store(store).ok and not list(store.rglob("*.partial"))
    assert finish(child(extract_args(root, cache))).code == 0
    assert_like_reference(store, ref)


@pytest.mark.parametrize("when", ["creating", "writing"])
def test_disk_full(when: str, reference: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Simulated: zarr's file writes fail with ENOSPC from the 20th file (while the store's arrays are being
    created) or from the 100th chunk (while images are being written). The one-line error names the file
    or the store and the image; the rows committed before stay valid; a re-run, disk freed, completes the
    same store."""
    root, ref = reference
    real_put, calls = zarr_local._put, [0]

    def put(path, value, exclusive=False):
        calls[0] += when == "creating" or "/c/" in str(path)
        if calls[0] > (20 if when == "creating" else 100):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_put(path, value, exclusive)

    monkeypatch.setattr(zarr_local, "_put", put)
    res = cli(extract_args(root, tmp_path / "cache"))
    monkeypatch.undo()
    assert res.code == 1
    line = res.error_line()
    assert "No space left on device" in line and ref.name in line
    store = tmp_path / "cache" / ref.name
    if when == "writing":
        assert "re-run to resume" in line
        assert 0 < done_rows(store) < done_rows(ref) and verify_store(store).ok
    assert cli(extract_args(root, tmp_path / "cache")).code == 0
    assert_like_reference(store, ref)


def test_fit_killed_leaves_a_folder_marked_incomplete(reference: tuple[Path, Path], tmp_path: Path) -> None:
    _, ref = reference
    run = tmp_path / "run"
    args = ["fit", "--cache", str(ref), "--out", str(run), "--epochs", "400", "--dim", "16", "--train-count", "2"]
    proc = child(args)
    assert wait_for(lambda: proc.poll() is not None or has_checkpoint(run))
    time.sleep(0.5)
    assert proc.poll() is None, "the fit ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert (run / INCOMPLETE).exists() and not fit_finished(run)
    res = cli(["evaluate", str(run)])
    assert res.code == 1 and "incomplete" in res.error_line()
    refit = ["fit", "--cache", str(ref), "--out", str(run), "--epochs", "3", "--dim", "16", "--train-count", "2"]
    res = cli(refit)  # its checkpoint is not overwritten unasked
    assert res.code == 1 and "--resume" in res.error_line()
    res = cli([*refit, "--resume"])  # nor continued with other settings
    assert res.code == 1 and "epochs: 400 there, 3 now" in res.error_line()
    shutil.rmtree(run)
    res = cli(refit)
    assert res.code == 0, res.stderr
    assert fit_finished(run) and not (run / INCOMPLETE).exists() and not has_checkpoint(run)
