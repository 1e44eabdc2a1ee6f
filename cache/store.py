"""The feature store: one zarr v3 directory (default) or one HDF5 file per cache key (``cache/backends.py``).

Its arrays are listed in ``cache/schema.py``. Every chunk holds one image, so (zarr) writers of different
images never touch the same file; zarr writes each chunk atomically (temp file + rename), and the done
flag is written after the data, so a killed writer leaves its row not-done. Done flags are never written
False: in zarr their chunk exists exactly when the flag is set (fill False, empty chunks not written),
which lets ``done`` read a whole flag array with one directory listing. Checksums are written between
the data and the flag (``cache/integrity.py``); ``verify_store`` recomputes them. An HDF5 store (a
``.h5`` path) holds the same arrays in one file, for one writer at a time.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from zarr.errors import ContainsGroupError

from cache.backends import (BACKENDS, Backend, Location, as_location, backend_for, basename, is_url,
                            remove_local)
from cache.checksums import DamagedDataError
from cache.key import FORMAT_VERSION, READABLE_FORMAT_VERSIONS, key_hash
from cache.schema import (MARKER, MASK_ARRAYS, TOKEN_ROWS_PER_DASK_CHUNK, VIEW_TEXT_ARRAYS, VIEW_TEXT_CRC,
                          SplitLayout, StoreError, base_specs, crc_rel, done_rel, feat_rel, layout_problems, numbered,
                          base_names, pair_name, root_attrs, split_attrs, split_layout, split_rels, validate_layout,
                          view_text_specs)
from cache.writes import StoreWriter

__all__ = ["FeatureStore", "StoreError", "format_of", "remove_leftovers"]


def format_of(path: Path | str) -> str:
    """The store format a path asks for by its suffix: h5 for .h5/.hdf5, else zarr."""
    return "h5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"


class FeatureStore:
    """A textdiff feature store on local disk (zarr folder or HDF5 file). Build with `create`, reopen with `open`;
    it reads; one opened with mode "r+" writes through :attr:`writer` (:class:`cache.writes.StoreWriter`)."""

    path: Location  # a Path, or a URL string
    key: dict

    def __init__(self, path: Location, backend: Backend, mode: str) -> None:
        self.path = path
        self.mode = mode
        self._backend = backend
        self._attrs = backend.attrs()
        self.key = self._attrs["key"]
        self._layouts: dict[str, SplitLayout] = {}

    @property
    def writer(self) -> StoreWriter:
        """The write methods (a store opened with mode "r+"; a read-only one refuses, naming itself). A new,
        small wrapper each time: the store holds no reference to it, so no cycle keeps an HDF5 file open
        after its last user lets go."""
        return StoreWriter(self)

    def _exists(self, rel: str) -> bool:
        return self._backend.exists(rel)

    def _array(self, rel: str) -> Any:
        if not self._exists(rel):
            raise StoreError(f"{self.path}: no array {rel!r}")
        return self._backend.array(rel)

    def _row(self, split: str, i: int) -> int:
        n = len(self.layout(split).ids)
        if not 0 <= int(i) < n:
            raise StoreError(f"{self.path}: row {i} out of range for split {split!r} ({n} images)")
        return int(i)

    @property
    def location(self) -> str:
        """Where the store is, absolute: a resolved path, or the URL."""
        return str(self.path) if is_url(self.path) else str(Path(self.path).resolve())

    @property
    def name(self) -> str:
        """The store's file or folder name (``monuseg-0123456789ab.zarr``)."""
        return basename(self.path)

    @property
    def format(self) -> str:
        """"zarr" or "h5"."""
        return self._backend.format

    def close(self) -> None:
        """Release file handles now (an HDF5 store is otherwise closed when the object goes)."""
        self._backend.close()

    def __reduce__(self):  # pickle as "reopen the same path" (dask workers)
        return (FeatureStore.open, (str(self.path), self.mode))

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, key_hash={self.key_hash[:12]!r}, mode={self.mode!r})"

    # ------------------------------------------------------------------ create / open
    @classmethod
    def create(cls, path: Path | str, key: dict, *, size: int, splits: dict[str, SplitLayout],
               token_len: int, token_dim: int, extra_attrs: dict | None = None) -> FeatureStore:
        """Create a new store atomically, or open the existing one at `path` if its key and layout match.

        The format follows the path: ``.h5``/``.hdf5`` an HDF5 file, anything else a zarr folder.
        ``extra_attrs`` (JSON-able) are recorded at creation only, e.g. how the arrays were computed.
        """
        path = as_location(path)
        validate_layout(path, splits, {"size": size, "token_len": token_len, "token_dim": token_dim})
        if is_url(path):
            return cls._create_at_url(str(path), key, size, splits, token_len, token_dim, extra_attrs or {})
        if path.exists():
            return cls._open_matching(path, key, size, splits, token_len, token_dim)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex}{path.suffix}"
        try:
            cls._build(tmp, key, size, splits, token_len, token_dim, extra_attrs or {})
            try:
                if path.exists():  # os.rename would replace a file (not a folder) silently
                    raise FileExistsError(path)
                os.rename(tmp, path)
            except OSError:
                if not path.exists():
                    raise
                # another process created it first: use theirs if it is the same store
                return cls._open_matching(path, key, size, splits, token_len, token_dim)
        finally:
            remove_local(tmp)
        return cls.open(path, "r+")

    @classmethod
    def _create_at_url(cls, url: str, key: dict, size: int, splits: dict[str, SplitLayout], token_len: int,
                       token_dim: int, extra_attrs: dict) -> FeatureStore:
        """Object stores have no atomic rename: build in place; a store already there is checked instead."""
        if format_of(url) != "zarr":
            raise StoreError(f"{url}: only zarr stores can live at a URL (HDF5 stores are local files)")
        if backend_for(url) is None:
            try:
                cls._build(url, key, size, splits, token_len, token_dim, extra_attrs)
            except (ContainsGroupError, FileExistsError):
                pass  # another process made it first: checked below
        return cls._open_matching(url, key, size, splits, token_len, token_dim)

    @staticmethod
    def _build(tmp: Location, key: dict, size: int, splits: dict[str, SplitLayout],
               token_len: int, token_dim: int, extra_attrs: dict) -> None:
        attrs = {**extra_attrs, **root_attrs(key, size, splits, token_len, token_dim)}
        store = BACKENDS[format_of(tmp)].build(tmp, attrs, {name: split_attrs(lay) for name, lay in splits.items()})
        try:
            for name, lay in splits.items():
                specs = base_specs(len(lay.ids), lay.views, size, token_len, token_dim)
                if lay.view_texts is not None:
                    specs.update(view_text_specs(len(lay.ids), lay.views, token_len, token_dim))
                for rel, spec in specs.items():
                    store.create(f"{name}/{rel}", spec)
        finally:
            store.close()

    @classmethod
    def _open_matching(cls, path: Location, key: dict, size: int, splits: dict[str, SplitLayout],
                       token_len: int, token_dim: int) -> FeatureStore:
        store = cls.open(path, "r+")
        wanted = key_hash(key)
        if store.key_hash != wanted:
            differ = sorted(k for k in set(store.key) | set(key) if store.key.get(k) != key.get(k))
            raise StoreError(f"{path} holds a store made with another configuration (it differs in: "
                             f"{', '.join(differ)}; key hash {store.key_hash[:12]}, requested {wanted[:12]}); "
                             f"use another cache folder or remove it")
        facts = {"size": size, "token_len": token_len, "token_dim": token_dim}
        problems = layout_problems(store._attrs, facts, {n: store.layout(n) for n in store.splits()}, splits)
        if problems:
            raise StoreError(f"{path}: same key but a different layout: " + "; ".join(problems))
        return store

    @classmethod
    def open(cls, path: Path | str, mode: str = "r") -> FeatureStore:
        """Open an existing store (a path, or an fsspec URL); mode "r" (read-only) or "r+" (read/write)."""
        path = as_location(path)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        kind = backend_for(path)
        if kind is None:
            raise StoreError(f"{path}: no feature store there (neither a zarr folder nor an HDF5 file)")
        try:
            backend = kind.open(path, read_only=mode == "r")
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise StoreError(f"{path}: not a zarr v3 group ({e})") from e
        except OSError as e:  # HDF5: locked by a writer, or damaged
            raise StoreError(f"{path}: cannot open the HDF5 store ({e}); another process may be writing it") from e
        attrs = backend.attrs()
        if attrs.get("textdiff") != MARKER or "key" not in attrs:
            backend.close()
            raise StoreError(f"{path}: a {kind.format} store but not a textdiff feature store")
        version = attrs.get("format_version")
        if version not in READABLE_FORMAT_VERSIONS or (mode == "r+" and version != FORMAT_VERSION):
            backend.close()
            does = "reads" if version not in READABLE_FORMAT_VERSIONS else "adds to"
            allowed = READABLE_FORMAT_VERSIONS if does == "reads" else (FORMAT_VERSION,)
            raise StoreError(f"{path}: store format_version {version} but this textdiff {does} format_version "
                             f"{' or '.join(map(str, allowed))} only; re-extract into a new store")
        if key_hash(attrs["key"]) != attrs.get("key_hash"):
            raise StoreError(f"{path}: stored key does not match its stored key_hash (edited?)")
        return cls(path, backend, mode)

    # ------------------------------------------------------------------ layout
    @property
    def key_hash(self) -> str:
        return self._attrs["key_hash"]

    @property
    def version(self) -> int:
        """The store's format version (what it holds: :data:`cache.key.FORMAT_VERSION`)."""
        return int(self._attrs["format_version"])

    @property
    def base_names(self) -> tuple[str, ...]:
        """Its base arrays, in the order of their recorded CRC-32s (before format 3: one mask)."""
        return base_names(self.version)

    @property
    def mask_resizes(self) -> tuple[str, ...]:
        """The mask resizings it holds (``extract.datasets.resize_mask``): both from format 3, else the one its
        key names."""
        if self.version >= 3:
            return tuple(MASK_ARRAYS)
        return (self.key.get("preprocessing", {}).get("mask_resize", "nearest"),)

    @property
    def size(self) -> int:
        return self._attrs["size"]

    @property
    def attrs(self) -> dict:
        """The root attributes (key, key_hash, format_version, size, created, ...)."""
        return dict(self._attrs)

    def splits(self) -> list[str]:
        return list(self._attrs["splits"])

    def layout(self, split: str) -> SplitLayout:
        lay = self._layouts.get(split)
        if lay is None:
            if split not in self._attrs["splits"]:
                raise StoreError(f"{self.path}: no split {split!r}; it has {self.splits()}")
            lay = split_layout(self._backend.attrs(split))
            self._layouts[split] = lay
        return lay

    def ids(self, split: str) -> list[str]:
        return list(self.layout(split).ids)

    def texts(self, split: str) -> list[str]:
        return list(self.layout(split).texts)

    def view_texts(self, split: str) -> list[list[str]] | None:
        """Each row's text for each of its views (``extract.textviews``); None where the views have none of their
        own (one view, or a store made before views kept their own text): every view has the row's text."""
        view_texts = self.layout(split).view_texts
        return None if view_texts is None else [list(t) for t in view_texts]

    def pairs(self) -> list[tuple[int, int]]:
        """(step, block) pairs whose feature and done arrays exist in every split."""
        common: set[tuple[int, int]] | None = None
        for split in self.splits():
            here = set()
            for step, tname in numbered(self._backend.children(f"{split}/feat"), "t"):
                for block, _ in numbered(self._backend.children(f"{split}/feat/{tname}"), "b"):
                    if self._exists(feat_rel(split, step, block)) and self._exists(done_rel(split, step, block)):
                        here.add((step, block))
            common = here if common is None else common & here
        return sorted(common or ())

    def missing(self, blocks: Sequence[int], steps: Sequence[int]) -> list[tuple[int, int]]:
        """The (step, block) pairs of ``steps`` × ``blocks`` that the store does not hold, steps outer."""
        have = set(self.pairs())
        return [(step, block) for step in steps for block in blocks if (step, block) not in have]

    def feature_shape(self, step: int, block: int) -> tuple[int, int, int]:
        """(C, h, w) of one view's features at (step, block)."""
        return tuple(self._array(feat_rel(self.splits()[0], step, block)).shape[2:])

    def checksums(self, split: str, step: int | None = None, block: int | None = None, *,
                  view_text: bool = False) -> np.ndarray:
        """CRC-32s recorded at write time: (N, 4) for image, mask, tokens, token_mask (step=None), (N, 2) for
        view_tokens, view_token_mask (``view_text``), or (N,) for a pair's features; 0 where none was recorded
        (rows or stores written before checksums)."""
        if view_text:
            return self.read(f"{split}/{VIEW_TEXT_CRC}")
        rel = crc_rel(split, step, block)
        if self._exists(rel):
            return self.read(rel)
        n = len(self.layout(split).ids)
        return np.zeros((n, len(self.base_names)) if step is None else n, np.uint32)

    def read(self, rel: str, row: int | None = None) -> np.ndarray:
        """The array at ``rel`` (one row of it with ``row``), read directly (no dask); a chunk that does not
        decode is a :class:`DamagedDataError` naming the array and row."""
        arr = self._array(rel)
        try:
            return np.asarray(arr[...] if row is None else arr[row])
        except Exception as e:  # noqa: BLE001 - any decoder failure: the bytes on disk are damaged
            where = rel if row is None else f"{rel} row {row}"
            reason = f"unreadable ({type(e).__name__}: {e})"
            raise DamagedDataError(f"{self.path}: {where}: {reason}", reason) from e

    # ------------------------------------------------------------------ readers
    def done(self, split: str, step: int | None = None, block: int | None = None) -> np.ndarray:
        """(N,) bool flags; step=None gives the base flags. One directory listing per call."""
        n = len(self.layout(split).ids)
        rel = done_rel(split, step, block)
        if not self._exists(rel):
            raise StoreError(f"{self.path}: no done flags {rel!r} (pair not in the store)")
        return self._backend.flags(rel, n)

    def rows_done(self) -> int:
        """Done flags set, over every split and (base + each pair): the rows a full read-through visits."""
        return sum(int(self.done(s).sum()) + sum(int(self.done(s, *p).sum()) for p in self.pairs())
                   for s in self.splits())

    def complete_indices(self, split: str, pairs: list[tuple[int, int]] | None = None) -> np.ndarray:
        """Rows whose base and every given pair (default: all pairs) are done."""
        ok = self.done(split)
        for step, block in self.pairs() if pairs is None else pairs:
            ok &= self.done(split, step, block)
        return np.flatnonzero(ok)

    def _dask(self, rel: str, rows: int = 1) -> da.Array:
        self._array(rel)  # a clear error when it is missing
        return self._backend.dask(rel, rows)

    def features(self, split: str, step: int, block: int) -> da.Array:
        """(N, V, C, h, w) float16, one image per dask chunk; rows not done read as NaN."""
        return self._dask(feat_rel(split, step, block))

    def tokens(self, split: str) -> da.Array:
        """(N, L, D) float16."""
        return self._dask(f"{split}/tokens", TOKEN_ROWS_PER_DASK_CHUNK)

    def token_mask(self, split: str) -> np.ndarray:
        """(N, L) bool, read into memory."""
        return self._array(f"{split}/token_mask")[...]

    def view_tokens(self, split: str) -> da.Array:
        """(N, V, L, D) float16: each view's text's tokens (a split with :meth:`view_texts` only)."""
        return self._dask(f"{split}/view_tokens")

    def view_token_mask(self, split: str) -> np.ndarray:
        """(N, V, L) bool, read into memory (a split with :meth:`view_texts` only)."""
        return self._array(f"{split}/view_token_mask")[...]

    def masks(self, split: str, resize: str = "nearest") -> da.Array:
        """(N, V, S, S) uint8 in {0, 1}: the masks resized as ``resize`` says (nearest or authors; one of
        :attr:`mask_resizes`)."""
        return self._dask(f"{split}/{self.mask_array(resize)}")

    def mask_array(self, resize: str) -> str:
        """The name of the array of the masks under ``resize``; a store that lacks them is a StoreError."""
        if resize not in MASK_ARRAYS:
            raise StoreError(f"mask resizing must be one of {list(MASK_ARRAYS)}, got {resize!r}")
        if resize not in self.mask_resizes:
            raise StoreError(f"{self.path}: this store (format {self.version}) holds only the masks resized "
                             f"{self.mask_resizes[0]}, not {resize}; use those, or re-extract (a store of format 3 "
                             f"or later holds both)")
        return MASK_ARRAYS[resize] if self.version >= 3 else "mask"

    def images(self, split: str) -> da.Array:
        """(N, V, 3, S, S) uint8."""
        return self._dask(f"{split}/image")

    def info(self) -> dict:
        """JSON-able summary: key, arrays (shape, dtype, chunks) and per-split done counts."""
        pairs = self.pairs()
        rels = [rel for split in self.splits() for rel in split_rels(split, pairs, self.version)
                + [f"{split}/{name}" for name in VIEW_TEXT_ARRAYS if self.layout(split).view_texts is not None]]
        arrays = {rel: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
                  for rel in rels for a in [self._array(rel)]}
        splits = {}
        for split in self.splits():
            base, flags = self.done(split), {p: self.done(split, *p) for p in pairs}
            complete = np.logical_and.reduce([base, *flags.values()])
            splits[split] = {"total": len(base), "views": self.layout(split).views, "base_done": int(base.sum()),
                             "done": {pair_name(*p): int(f.sum()) for p, f in flags.items()},
                             "complete": int(complete.sum())}
        facts = {name: self._attrs[name] for name in ("format_version", "textdiff_version", "token_len", "token_dim")}
        return {"path": str(self.path), "format": self.format, "key": self.key, "key_hash": self.key_hash,
                "size": self.size, **facts, "pairs": [list(p) for p in pairs], "arrays": arrays, "splits": splits}


def remove_leftovers(path: Path | str) -> int:
    """Delete what a killed writer of the local store ``path`` left: zarr's half-written ``*.partial``
    chunk files inside it and unfinished builds (``.<name>.tmp-*``) beside it. Only for the holder of the
    store's writer lock. Returns how many were removed."""
    path = Path(path)
    found = list(path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"))
    if path.is_dir():
        found += [p for p in path.rglob("*.partial") if p.is_file()]
    for p in found:
        remove_local(p)
    return len(found)
