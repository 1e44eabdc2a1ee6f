"""Finding a dataset's stores, what a store lacks, its extract command, and the one row checker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from cache import (FeatureStore, SplitLayout, base_arrays, check_rows, first_damaged, make_key, matching_stores,
                   pair_array)
from extract.command import extract_command

SIZE, L, D = 8, 3, 2


def _store(path: Path, seed: int, views: int, data_root: Path, size: int = SIZE) -> FeatureStore:
    key = make_key(dataset={"name": "synthetic", "seed": seed}, preprocessing={"size": size},
                   unet={"weights_sha256": "abc"}, noise_seed=0, text={"spec": "minilm"}, dtype="float16")
    splits = {"train": SplitLayout(["a", "b"], ["ta", "tb"], views), "test": SplitLayout(["x"], ["tx"], 1)}
    made = {"dataset": "synthetic", "data_root": str(data_root.resolve()), "unet": "fixture", "size": size,
            "seed": seed, "augment": "d4" if views > 1 else "none", "color_order": "bgr"}
    return FeatureStore.create(path, key, size=size, splits=splits, token_len=L, token_dim=D,
                               extra_attrs={"extract": made})


def _fill(store: FeatureStore, step: int = 50, block: int = 4) -> None:
    rng = np.random.default_rng(0)
    store.writer.ensure_pair(step, block, 2, (4, 4))
    for split in store.splits():
        v = store.layout(split).views
        for i in range(len(store.ids(split))):
            store.writer.write_base(split, i, rng.integers(0, 256, (v, 3, store.size, store.size), dtype=np.uint8),
                             np.zeros((v, store.size, store.size), np.uint8), rng.normal(size=(L, D)),
                             np.ones(L, bool))
            store.writer.write_features(split, i, step, block, rng.normal(size=(v, 2, 4, 4)))


def test_matching_stores_describes_each_readable_store_of_the_dataset(tmp_path: Path) -> None:
    cache, root = tmp_path / "cache", tmp_path / "data"
    full = _store(cache / "synthetic-1.zarr", 1, 8, root)
    _fill(full)
    _store(cache / "synthetic-2.zarr", 2, 1, root)                     # nothing written yet
    _store(cache / "synthetic-3.zarr", 3, 1, tmp_path / "elsewhere")  # another data root
    _store(cache / "synthetic-4.zarr", 4, 1, root, size=16)           # another size
    (cache / "junk.zarr").mkdir()                                      # not a store: skipped
    found = matching_stores(cache, "synthetic", root, SIZE)
    assert [e.path.name for e in found] == ["synthetic-1.zarr", "synthetic-2.zarr"]
    assert [(e.views, e.complete, e.size, e.dataset) for e in found] == [(8, True, SIZE, "synthetic"),
                                                                        (1, False, SIZE, "synthetic")]
    assert found[0].data_root == str(root.resolve()) and found[0].modified > 0
    assert len(matching_stores(cache, "synthetic")) == 4 and matching_stores(cache, "monuseg") == []


def test_missing_pairs_and_the_extract_command(tmp_path: Path) -> None:
    store = _store(tmp_path / "c" / "s.zarr", 1, 1, tmp_path)
    _fill(store)
    assert store.missing([4], [50]) == []
    assert store.missing([4, 8], [50, 150]) == [(50, 8), (150, 4), (150, 8)]
    command = extract_command(store, [4, 8], [50, 150])
    assert command.startswith("pipeline extract --dataset synthetic --data-root ")
    assert "--augment" not in command and "--bgr" in command
    assert command.endswith(f"--steps 50,150 --blocks 4,8 --cache-dir {tmp_path / 'c'}")
    assert extract_command(store).endswith(f"--steps 50 --blocks 4 --cache-dir {tmp_path / 'c'}")


def test_the_row_checker_names_each_damaged_row(tmp_path: Path) -> None:
    store = _store(tmp_path / "s.zarr", 1, 1, tmp_path)
    _fill(store)
    arrays = [*base_arrays(store, "train"), pair_array(store, "train", 50, 4)]
    checks = list(check_rows(store, "train", arrays, [0, 1]))
    assert len(checks) == 2 * 6 and not any(c.problem for c in checks) and all(c.recorded for c in checks)
    assert first_damaged(store, "train", arrays, [0, 1]) is None
    feats = zarr.open_group(store.path, mode="r+")["train/feat/t50/b4"]
    changed = feats[1].copy()
    changed.flat[0] += 1
    feats[1] = changed
    damaged = first_damaged(store, "train", arrays, [0, 1])
    assert damaged is not None and damaged.where == "train/b t50 b4" and damaged.problem.startswith("checksum")
    assert damaged.array.pair == (50, 4) and damaged.row == 1
    loaded = base_arrays(store, "train", ["mask"], {"mask": np.ones((1, 1, SIZE, SIZE), np.uint8)})
    assert first_damaged(store, "train", loaded, [0]).where == "train/a mask"  # checked as loaded, not read
