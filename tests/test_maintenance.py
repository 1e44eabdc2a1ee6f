"""`pipeline cache verify / rm / gc`: corruption is found and named, only stores are ever deleted."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from helpers import arrays, assert_same, tiny_store
from typer.testing import CliRunner

from cache import DamagedDataError, FeatureStore, StoreError, checksum, gc_candidates, remove_stores, verify_store
from pipeline import app


@pytest.fixture()
def store(tiny_unet: Path, tmp_path: Path) -> Path:
    return tiny_store(tiny_unet, tmp_path / "cache")


def test_a_fresh_store_verifies_with_every_checksum_recorded(store: Path) -> None:
    report = verify_store(store)
    fs = FeatureStore.open(store)
    n_rows = sum(len(fs.ids(s)) for s in fs.splits())
    assert report.ok and report.rows_checked == n_rows and report.unrecorded == 0
    assert report.arrays_checked == n_rows * (5 + len(fs.pairs()))  # image, both masks, tokens, token mask
    row = fs.read("train/feat/t50/b4", 0)
    assert int(fs.read("train/crc/t50_b4", 0)) == checksum(row)
    result = CliRunner().invoke(app, ["cache", "verify", str(store)])
    assert result.exit_code == 0 and result.stdout.startswith("OK ")


def test_verify_names_altered_missing_and_nonfinite_data(store: Path) -> None:
    fs = FeatureStore.open(store)
    ids = fs.ids("train")
    root = zarr.open_group(store, mode="r+")
    feats = root["train/feat/t50/b4"]
    changed = feats[1].copy()
    changed.flat[0] += 1  # a silently altered value: only the checksum can tell
    feats[1] = changed
    bad = feats[2].copy()
    bad.flat[3] = np.inf
    feats[2] = bad
    (store / "train" / "feat" / "t250" / "b8" / "c" / "3").rename(store / "moved-away")  # a lost chunk folder
    image = root["train/image"]
    image[0] = 255 - image[0]
    report = verify_store(store)
    assert not report.ok and len(report.problems) == 4, report.problems
    text = "\n".join(report.problems)
    assert f"train/{ids[1]} t50 b4: checksum" in text
    assert f"train/{ids[2]} t50 b4: 1 NaN/Inf" in text
    assert f"train/{ids[3]} t250 b8:" in text and "NaN/Inf" in text
    assert f"train/{ids[0]} image: checksum" in text
    result = CliRunner().invoke(app, ["cache", "verify", str(store)])
    assert result.exit_code == 1 and "4 problem(s)" in result.output and "error:" not in result.output


def test_rm_refuses_what_is_not_a_store_and_dry_run_deletes_nothing(store: Path, tmp_path: Path) -> None:
    other = tmp_path / "precious"
    other.mkdir()
    with pytest.raises(StoreError, match="precious"):
        remove_stores([store, other])
    assert store.is_dir() and other.is_dir()  # refused as a whole: nothing deleted
    assert remove_stores([store], dry_run=True)[0][1] > 0 and store.is_dir()
    result = CliRunner().invoke(app, ["cache", "rm", str(store)])
    assert result.exit_code == 0 and "removed 1 store(s)" in result.stdout and not store.exists()


def test_gc_by_age_and_by_count_keeps_the_recent_and_ignores_non_stores(tiny_unet: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = tiny_store(tiny_unet, cache, counts={"train": 2, "val": 1, "test": 1})
    b = tiny_store(tiny_unet, cache, counts={"train": 3, "val": 1, "test": 1})
    c = tiny_store(tiny_unet, cache, counts={"train": 4, "val": 1, "test": 1})
    (cache / "notes.zarr").mkdir()  # not a store: never touched
    now = time.time()
    for path, days in ((a, 30), (b, 10), (c, 0)):
        for f in [path, *path.rglob("*")]:
            os.utime(f, (now - days * 86400, now - days * 86400))
    assert [p for p, _ in gc_candidates(cache, older_than_days=20)] == [a]
    assert [p for p, _ in gc_candidates(cache, keep=1)] == [a, b]
    assert [p for p, _ in gc_candidates(cache, older_than_days=5, keep=2)] == [a]
    with pytest.raises(ValueError, match="older_than_days="):
        gc_candidates(cache)
    dry = CliRunner().invoke(app, ["cache", "gc", "--cache-dir", str(cache), "--keep", "1", "--dry-run"])
    assert dry.exit_code == 0 and "would remove 2 store(s)" in dry.stdout and a.exists() and b.exists()
    done = CliRunner().invoke(app, ["cache", "gc", "--cache-dir", str(cache), "--keep", "1"])
    assert done.exit_code == 0 and not a.exists() and not b.exists() and c.exists() and (cache / "notes.zarr").exists()


def _damage(store: Path) -> list[str]:
    """Damage after the fact, in train rows 0-3 (three kinds; an image too); returns the ids hit."""
    ids = FeatureStore.open(store).ids("train")
    root = zarr.open_group(store, mode="r+")
    feats = root["train/feat/t50/b4"]
    changed = feats[1].copy()
    changed.flat[5] += 1  # a silently altered value
    feats[1] = changed
    mask = root["train/mask"]
    mask[0] = 1 - mask[0]
    chunk = next(p for p in (store / "train" / "feat" / "t250" / "b8" / "c" / "2").rglob("*") if p.is_file())
    chunk.write_bytes(chunk.read_bytes()[:20])  # a chunk that no longer decodes
    image = root["train/image"]
    image[3] = 255 - image[3]  # the plain U-Net's input
    return ids[:4]


@pytest.mark.parametrize("budget", [4 << 30, 0], ids=["in-memory", "streamed"])
def test_fit_data_refuses_a_damaged_row_naming_it(store: Path, budget: int) -> None:
    from train.data.readers import SplitFeatures, SplitImages

    ids = _damage(store)
    fs = FeatureStore.open(store)
    with pytest.raises(DamagedDataError, match=rf"train/{ids[0]} mask: checksum .*cache verify --repair"):
        SplitFeatures(fs, "train", [4], [50], memory_budget=budget)
    with pytest.raises(DamagedDataError, match=rf"train/{ids[1]} t50 b4: checksum"):
        SplitFeatures(fs, "train", [4], [50], indices=[1, 3], memory_budget=budget)
    with pytest.raises(DamagedDataError, match=rf"train/{ids[2]} t250 b8: unreadable"):
        SplitFeatures(fs, "train", [8], [250], indices=[2, 3], memory_budget=budget)
    assert len(SplitFeatures(fs, "train", [4, 8], [50, 250], indices=[3], memory_budget=budget)) == 1
    with pytest.raises(DamagedDataError, match=rf"train/{ids[3]} image: checksum"):
        SplitImages(fs, "train", indices=[3], memory_budget=budget)


def test_verify_repair_then_extract_restores_the_store_exactly(tiny_unet: Path, store: Path,
                                                               tmp_path: Path) -> None:
    pristine = arrays(store)
    ids = _damage(store)
    report = verify_store(store)
    assert len(report.problems) == 4 and any(f"train/{ids[2]} t250 b8: unreadable" in p for p in report.problems)
    result = CliRunner().invoke(app, ["cache", "verify", "--repair", str(store)])
    assert result.exit_code == 1 and "repaired: 4 damaged row(s)" in result.output
    assert "pipeline extract --dataset synthetic" in result.output
    fs = FeatureStore.open(store)
    assert not fs.done("train")[0] and not fs.done("train", 50, 4)[1] and not fs.done("train", 250, 8)[2]
    assert not fs.done("train")[3] and fs.done("train")[1:3].all() and fs.done("train", 50, 4)[[0, 2, 3]].all()
    assert verify_store(store).ok  # what is still marked done is sound
    assert tiny_store(tiny_unet, tmp_path / "cache") == store  # the same extraction: rewrites the damaged rows
    assert_same(arrays(store), pristine)
    assert verify_store(store).ok
