"""Tests for cache/: key hashing and the feature store, in both formats (zarr folder, HDF5 file)."""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import zarr

from cache import (
    FORMAT_VERSION,
    FeatureStore,
    SplitLayout,
    StoreError,
    canonical_json,
    default_cache_dir,
    key_hash,
    list_stores,
    make_key,
    sha256_file,
    sha256_files,
    store_path,
)

SIZE, L, D = 16, 5, 4


def _key(**changes) -> dict:
    fields = {
        "dataset": {"name": "synthetic", "seed": 0, "files": {"a.png": "00ff"}},
        "preprocessing": {"size": SIZE, "resize": "bilinear", "color_order": "rgb"},
        "unet": {"weights_sha256": "abc", "flags": {"num_channels": 256}},
        "noise_seed": 40,
        "text": {"spec": "minilm", "weights_sha256": "def", "max_length": L},
        "dtype": "float16",
    }
    fields.update(changes)
    return make_key(**fields)


def _layout() -> dict[str, SplitLayout]:
    return {
        "train": SplitLayout(ids=["a", "b", "c"], texts=["text a", "text b", "text c"], views=2),
        "test": SplitLayout(ids=["x", "y"], texts=["text x", "text y"], views=1),
    }


def _new(path: Path, key: dict | None = None, layout: dict | None = None) -> FeatureStore:
    return FeatureStore.create(path, key or _key(), size=SIZE, splits=layout or _layout(),
                               token_len=L, token_dim=D)


def _base_row(rng: np.random.Generator, views: int) -> dict[str, np.ndarray]:
    return {
        "image": rng.integers(0, 256, (views, 3, SIZE, SIZE), dtype=np.uint8),
        "mask": rng.integers(0, 2, (views, SIZE, SIZE), dtype=np.uint8),
        "tokens": rng.normal(size=(L, D)).astype(np.float32),
        "token_mask": np.array([1, 1, 1, 0, 0], dtype=bool),
    }


def _snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(params=["zarr", "h5"])
def fmt(request: pytest.FixtureRequest) -> str:
    """Each store test runs on both formats."""
    return request.param


@pytest.fixture
def store(tmp_path: Path, fmt: str) -> FeatureStore:
    return _new(tmp_path / f"s.{fmt}")


# ---------------------------------------------------------------- key


def test_key_hash_is_stable_and_canonical():
    key = _key()
    assert key["format_version"] == FORMAT_VERSION
    text = canonical_json(key)
    assert text.startswith('{"compute_dtype":"float32","dataset":{"files":{"a.png":"00ff"},"name":"synthetic",'
                           '"seed":0},"dtype":"float16"')
    assert " " not in text.replace("text a", "")
    assert key_hash(key) == hashlib.sha256(text.encode()).hexdigest()
    reordered = dict(reversed(list(key.items())))
    assert key_hash(reordered) == key_hash(key)
    # tuples normalise to lists, so a key read back from JSON compares equal
    assert _key(preprocessing={"size": (16, 16)}) == _key(preprocessing={"size": [16, 16]})


@pytest.mark.parametrize("field, value", [
    ("dataset", {"name": "synthetic", "seed": 0, "files": {"a.png": "00fe"}}),
    ("preprocessing", {"size": SIZE, "resize": "bilinear", "color_order": "bgr"}),
    ("unet", {"weights_sha256": "abd", "flags": {"num_channels": 256}}),
    ("noise_seed", 41),
    ("text", {"spec": "minilm", "weights_sha256": "def", "max_length": L + 1}),
    ("dtype", "float32"),
    ("compute_dtype", "bfloat16"),
])
def test_key_hash_sensitive_to_every_field(field, value):
    assert key_hash(_key(**{field: value})) != key_hash(_key())


def test_key_format_version_is_in_the_hash():
    key = _key()
    other = dict(key, format_version=FORMAT_VERSION + 1)
    assert key_hash(other) != key_hash(key)


def test_make_key_rejects_non_json_values():
    with pytest.raises(TypeError, match="dataset"):
        _key(dataset={"root": Path("/x")})
    with pytest.raises(TypeError, match="unet"):
        _key(unet={"scale": float("nan")})
    with pytest.raises(TypeError, match="noise_seed"):
        _key(noise_seed="40")


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    data = os.urandom(10_000)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    other = tmp_path / "g.bin"
    other.write_bytes(b"tail")
    assert sha256_files([path, other]) == hashlib.sha256(data + b"tail").hexdigest()
    path.write_bytes(b"changed!")  # memo is keyed on size and mtime: a rewrite is seen
    assert sha256_file(path) == hashlib.sha256(b"changed!").hexdigest()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TEXTDIFF_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("TEXTDIFF_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "textdiff"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "textdiff"


def test_store_path(tmp_path):
    key = _key()
    assert store_path(tmp_path, "monuseg", key) == tmp_path / f"monuseg-{key_hash(key)[:12]}.zarr"
    with pytest.raises(ValueError, match="name"):
        store_path(tmp_path, "../x", key)


# ---------------------------------------------------------------- create / open


def test_create_open_round_trip(tmp_path, fmt):
    path = tmp_path / "cache" / f"s.{fmt}"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no zarr warnings for users
        created = _new(path)
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "temp build dir left behind"
    assert created.format == fmt and (path.is_dir() if fmt == "zarr" else path.is_file())
    created.close()
    store = FeatureStore.open(path)
    assert store.key == _key() and store.key_hash == key_hash(_key())
    assert store.splits() == ["train", "test"]
    assert store.layout("train") == _layout()["train"]
    assert store.ids("test") == ["x", "y"] and store.texts("test") == ["text x", "text y"]
    assert store.pairs() == []
    assert not store.done("train").any()
    attrs = store.attrs
    for name in ("key", "key_hash", "format_version", "size", "textdiff_version",
                 "token_len", "token_dim"):
        assert name in attrs
    assert (attrs["size"], attrs["token_len"], attrs["token_dim"]) == (SIZE, L, D)
    assert created.path == path
    restored = pickle.loads(pickle.dumps(store))
    assert restored.path == path and restored.key == store.key


def test_same_key_reopens(store):
    again = _new(store.path)
    assert again.key_hash == store.key_hash


def test_same_key_different_layout_refused(store):
    layout = _layout()
    layout["test"] = SplitLayout(ids=["x", "z"], texts=["text x", "text y"], views=1)
    with pytest.raises(StoreError, match="ids differ"):
        _new(store.path, layout=layout)


def test_different_key_refused(store):
    other = _key(noise_seed=1)
    with pytest.raises(StoreError) as err:
        _new(store.path, key=other)
    msg = str(err.value)
    assert store.key_hash[:12] in msg and key_hash(other)[:12] in msg and "differs in: noise_seed" in msg


def test_create_race_uses_the_winner(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"s.{fmt}"
    build = FeatureStore._build

    def build_then_lose(tmp, *args):
        build(tmp, *args)
        build(path, *args)  # another process renames its store into place first

    monkeypatch.setattr(FeatureStore, "_build", staticmethod(build_then_lose))
    store = _new(path)
    assert store.key_hash == key_hash(_key())
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_create_race_with_other_key_refused(tmp_path, monkeypatch, fmt):
    path = tmp_path / f"s.{fmt}"
    build = FeatureStore._build

    def build_then_lose(tmp, key, *args):
        build(tmp, key, *args)
        build(path, _key(dtype="float32"), *args)

    monkeypatch.setattr(FeatureStore, "_build", staticmethod(build_then_lose))
    with pytest.raises(StoreError, match="key hash"):
        _new(path)


def test_open_refuses_foreign_and_old_stores(tmp_path):
    store = _new(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="no feature store there"):
        FeatureStore.open(tmp_path / "missing.zarr")
    (tmp_path / "empty.zarr").mkdir()
    with pytest.raises(StoreError, match="not a zarr"):
        FeatureStore.open(tmp_path / "empty.zarr")
    zarr.open_group(tmp_path / "plain.zarr", mode="w", attributes={"x": 1})
    with pytest.raises(StoreError, match="not a textdiff"):
        FeatureStore.open(tmp_path / "plain.zarr")
    zarr.open_group(store.path, mode="r+").attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(StoreError, match="format_version"):
        FeatureStore.open(store.path)


def test_a_format_1_store_is_read_but_never_added_to(tmp_path):
    """Format 1 encoded texts in batches: its tokens stay readable (fits, evaluations), but nothing of a later
    format is written into it, so no store holds tokens of both encodings."""
    store = _new(tmp_path / "s.zarr")
    zarr.open_group(store.path, mode="r+").attrs["format_version"] = 1
    assert FeatureStore.open(store.path).attrs["format_version"] == 1
    with pytest.raises(StoreError, match="format_version 1 but this textdiff adds to format_version 3 only"):
        FeatureStore.open(store.path, mode="r+")


def test_read_only_refuses_writes(store):
    reader = FeatureStore.open(store.path)
    with pytest.raises(StoreError, match="read-only"):
        reader.writer.ensure_pair(50, 6, 8, (4, 4))


# ---------------------------------------------------------------- pairs and writes


def test_ensure_pair_idempotent_and_incremental(store):
    rng = np.random.default_rng(0)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    assert store.pairs() == [(50, 6)]
    store.writer.write_base("train", 0, **_base_row(rng, 2))
    store.writer.write_features("train", 0, 50, 6, rng.normal(size=(2, 8, 4, 4)))
    before = _snapshot(store.path)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    assert _snapshot(store.path) == before
    store.writer.ensure_pair(150, 12, 16, (8, 8))
    after = _snapshot(store.path)
    assert {name: after[name] for name in before} == before, "adding a pair rewrote existing files"
    assert FeatureStore.open(store.path).pairs() == [(50, 6), (150, 12)]
    with pytest.raises(StoreError, match="t50/b6"):
        store.writer.ensure_pair(50, 6, 16, (4, 4))
    with pytest.raises(StoreError, match="channels"):
        store.writer.ensure_pair(250, 6, 0, (4, 4))


def test_writes_set_done_and_read_back(store):
    rng = np.random.default_rng(1)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    row = _base_row(rng, 2)
    feats = rng.normal(size=(2, 8, 4, 4)).astype(np.float32)
    store.writer.write_base("train", 1, **row)
    store.writer.write_features("train", 1, 50, 6, feats)

    reader = FeatureStore.open(store.path)
    assert reader.done("train").tolist() == [False, True, False]
    assert reader.done("train", 50, 6).tolist() == [False, True, False]
    if store.format == "zarr":
        raw = zarr.open_array(store.path / "train" / "done" / "t50_b6", mode="r")[:]
        assert np.array_equal(raw, reader.done("train", 50, 6))  # the listing agrees with zarr
    assert reader.complete_indices("train").tolist() == [1]

    got = reader.features("train", 50, 6)
    assert isinstance(got, da.Array) and got.dtype == np.float16 and got.shape == (3, 2, 8, 4, 4)
    assert np.array_equal(got[1].compute(), feats.astype(np.float16))
    assert np.isnan(got[0].compute()).all()  # a row never written reads as NaN
    assert np.array_equal(reader.images("train")[1].compute(), row["image"])
    assert np.array_equal(reader.masks("train")[1].compute(), row["mask"])
    assert np.array_equal(reader.tokens("train")[1].compute(), row["tokens"].astype(np.float16))
    assert reader.token_mask("train")[1].tolist() == row["token_mask"].tolist()


def test_write_validation(store):
    rng = np.random.default_rng(2)
    row = _base_row(rng, 2)
    with pytest.raises(StoreError, match="row 3 out of range"):
        store.writer.write_base("train", 3, **row)
    with pytest.raises(StoreError, match="uint8"):
        store.writer.write_base("train", 0, **dict(row, image=row["image"].astype(np.float32)))
    with pytest.raises(StoreError, match="shape"):
        store.writer.write_base("test", 0, **row)  # test has 1 view
    with pytest.raises(StoreError, match="0 and 1"):
        store.writer.write_base("train", 0, **dict(row, mask=row["mask"] * 255))
    with pytest.raises(StoreError, match="ensure_pair"):
        store.writer.write_features("train", 0, 50, 6, np.zeros((2, 8, 4, 4)))
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    with pytest.raises(StoreError, match="not finite"):
        store.writer.write_features("train", 0, 50, 6, np.full((2, 8, 4, 4), 1e6))
    with pytest.raises(StoreError, match="no split"):
        store.done("val")
    assert not store.done("train").any() and not store.done("train", 50, 6).any()


def _view_layout() -> dict[str, SplitLayout]:
    """train: 2 views, each with its own text; test: 1 view."""
    return {"train": SplitLayout(ids=["a", "b"], texts=["upper a", "b"], views=2,
                                 view_texts=[["upper a", "lower a"], ["b", "b"]]),
            "test": SplitLayout(ids=["x"], texts=["x"], views=1)}


def test_view_texts_round_trip_verify_and_export(tmp_path, fmt):
    from cache import export_store, verify_store

    store = _new(tmp_path / f"v.{fmt}", layout=_view_layout())
    rng = np.random.default_rng(7)
    views = {"view_tokens": rng.normal(size=(2, L, D)).astype(np.float32),
             "view_token_mask": np.array([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=bool)}
    with pytest.raises(StoreError, match="needs view_tokens and view_token_mask"):
        store.writer.write_base("train", 0, **_base_row(rng, 2))
    with pytest.raises(StoreError, match="keeps no text per view"):
        store.writer.write_base("test", 0, **_base_row(rng, 1), **views)
    with pytest.raises(StoreError, match=r"view_tokens for split 'train' has shape \(1, 5, 4\)"):
        store.writer.write_base("train", 0, **_base_row(rng, 2), **dict(views, view_tokens=views["view_tokens"][:1]))
    for i in range(2):
        store.writer.write_base("train", i, **_base_row(rng, 2), **views)
    store.writer.write_base("test", 0, **_base_row(rng, 1))
    store.close()

    reader = FeatureStore.open(tmp_path / f"v.{fmt}")
    assert reader.view_texts("train") == [["upper a", "lower a"], ["b", "b"]] and reader.view_texts("test") is None
    assert np.array_equal(reader.view_tokens("train")[1].compute(), views["view_tokens"].astype(np.float16))
    assert np.array_equal(reader.view_token_mask("train")[0], views["view_token_mask"])
    assert reader.info()["arrays"]["train/view_tokens"]["shape"] == [2, 2, L, D]
    assert "test/view_tokens" not in reader.info()["arrays"]
    report = verify_store(reader.path)
    assert report.ok and report.arrays_checked == 2 * 7 + 5 and report.unrecorded == 0
    other = "zarr" if fmt == "h5" else "h5"
    copy = FeatureStore.open(export_store(reader.path, other))
    assert copy.view_texts("train") == reader.view_texts("train") and copy.done("train").all()
    assert np.array_equal(copy.view_tokens("train").compute(), reader.view_tokens("train").compute())
    copy.close()
    reader.close()
    with pytest.raises(StoreError, match="view texts differ"):
        _new(tmp_path / f"v.{fmt}", layout={**_view_layout(), "train": SplitLayout(
            ids=["a", "b"], texts=["upper a", "b"], views=2, view_texts=[["upper a", "a"], ["b", "b"]])})
    with pytest.raises(StoreError, match="needs 2 view texts for each of its 2 rows"):
        _new(tmp_path / "w.zarr", layout={"train": SplitLayout(["a", "b"], ["a", "b"], 2, [["a"], ["b", "b"]])})


def test_info_counts(store):
    rng = np.random.default_rng(3)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    store.writer.ensure_pair(150, 6, 8, (4, 4))
    for i in range(3):
        store.writer.write_base("train", i, **_base_row(rng, 2))
    store.writer.write_features("train", 0, 50, 6, rng.normal(size=(2, 8, 4, 4)))
    store.writer.write_features("train", 0, 150, 6, rng.normal(size=(2, 8, 4, 4)))
    store.writer.write_features("train", 2, 50, 6, rng.normal(size=(2, 8, 4, 4)))
    info = FeatureStore.open(store.path).info()
    assert info["key_hash"] == store.key_hash and info["size"] == SIZE
    assert info["splits"]["train"] == {"total": 3, "views": 2, "base_done": 3,
                                       "done": {"t50_b6": 2, "t150_b6": 1}, "complete": 1}
    assert info["splits"]["test"]["complete"] == 0 and info["splits"]["test"]["total"] == 2
    feat = info["arrays"]["train/feat/t50/b6"]
    assert feat == {"shape": [3, 2, 8, 4, 4], "dtype": "float16", "chunks": [1, 1, 8, 4, 4]}
    assert info["arrays"]["test/done/base"] == {"shape": [2], "dtype": "bool", "chunks": [1]}
    rows = list_stores(store.path.parent)
    assert len(rows) == 1 and rows[0]["dataset"] == "synthetic"
    assert (rows[0]["images_done"], rows[0]["images_total"]) == (1, 5)
    assert rows[0]["pairs"] == ["t50_b6", "t150_b6"]


def test_simulated_crash_leaves_row_not_done(store, monkeypatch):
    rng = np.random.default_rng(4)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    store.writer.write_base("train", 0, **_base_row(rng, 2))
    feats = rng.normal(size=(2, 8, 4, 4))
    real_array = FeatureStore._array

    def killed_before_flag(self, rel):
        if "/done/" in rel:
            raise KeyboardInterrupt("killed")
        return real_array(self, rel)

    monkeypatch.setattr(FeatureStore, "_array", killed_before_flag)
    writer = FeatureStore.open(store.path, "r+")
    with pytest.raises(KeyboardInterrupt):
        writer.writer.write_features("train", 0, 50, 6, feats)
    monkeypatch.undo()

    reader = FeatureStore.open(store.path)
    assert reader.done("train").tolist() == [True, False, False]
    assert not reader.done("train", 50, 6).any()  # data on disk, flag not set
    assert reader.complete_indices("train").size == 0
    assert reader.info()["splits"]["train"]["complete"] == 0
    # resuming rewrites the row
    store.writer.write_features("train", 0, 50, 6, feats)
    assert reader.complete_indices("train").tolist() == [0]
    if store.format == "zarr":  # a stray zarr temp file is ignored by the flag reader and the pair listing
        (store.path / "train" / "done" / "t50_b6" / "c").mkdir(parents=True, exist_ok=True)
        (store.path / "train" / "done" / "t50_b6" / "c" / "1.1234abcd.partial").write_bytes(b"\x01")
        (store.path / "train" / "feat" / "zarr.1234abcd.partial").write_bytes(b"{}")
        assert reader.done("train", 50, 6).tolist() == [True, False, False] and reader.pairs() == [(50, 6)]


def _filled(path: Path, seed: int = 0, image_offset: int = 0, rounding: float = 0.0) -> FeatureStore:
    """A store whose every row is written (features of one pair), from ``seed``; ``rounding``: the share of
    feature values moved one float16 step up (another CPU's rounding)."""
    store, rng = _new(path), np.random.default_rng(seed)
    store.writer.ensure_pair(50, 6, 8, (4, 4))
    for split, lay in _layout().items():
        for i in range(len(lay.ids)):
            row = _base_row(rng, lay.views)
            row["image"] = (row["image"] + image_offset).astype(np.uint8)
            store.writer.write_base(split, i, **row)
            feats = rng.normal(size=(lay.views, 8, 4, 4)).astype(np.float16)
            moved = np.random.default_rng(99).random(feats.shape) < rounding
            feats[moved] = np.nextafter(feats[moved], np.float16(np.inf))
            store.writer.write_features(split, i, 50, 6, feats)
    return store


def test_content_sketch_tells_rounding_from_other_content(tmp_path):
    from cache.integrity import content_digest, content_sketch, sketches_agree

    a = content_sketch(_filled(tmp_path / "a.zarr"))
    rounded = _filled(tmp_path / "r.zarr", rounding=0.01)
    assert content_digest(rounded) != content_digest(_filled(tmp_path / "a2.zarr"))  # other bits...
    assert sketches_agree(a, content_sketch(rounded)) == []  # ...the same content up to rounding
    assert "train/image" in sketches_agree(a, content_sketch(_filled(tmp_path / "c.zarr", image_offset=1)))
    other = sketches_agree(a, content_sketch(_filled(tmp_path / "s.zarr", seed=1)))
    assert "train/t50 b6" in other and "test/t50 b6" in other
    assert "test/mask" in a and sketches_agree(a, {k: v for k, v in a.items() if k != "test/mask"}) == ["test/mask"]


def test_content_digest_names_the_bytes_of_the_rows(tmp_path):
    from cache.integrity import content_digest

    a, b = _filled(tmp_path / "a.zarr"), _filled(tmp_path / "b.h5")
    assert content_digest(a) == content_digest(b) and len(content_digest(a)) == 64  # same rows, either backend
    assert content_digest(_filled(tmp_path / "c.zarr", image_offset=1)) != content_digest(a)
    assert content_digest(a, pairs=[]) != content_digest(a)  # the base arrays alone
    partial = _new(tmp_path / "d.zarr")
    partial.writer.write_base("test", 0, **_base_row(np.random.default_rng(0), 1))
    with pytest.raises(ValueError, match="rows without a recorded checksum"):
        content_digest(partial)
