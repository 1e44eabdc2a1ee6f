"""The feature store: one zarr v3 directory (default) or one HDF5 file per cache key (``cache/backends.py``).

Layout (per split group ``<split>``; N images, V views, S size, L tokens, D token dim)::

    <split>/image               (N, V, 3, S, S) uint8    chunk (1, 1, 3, S, S)
    <split>/mask                (N, V, S, S)    uint8    chunk (1, 1, S, S)
    <split>/tokens              (N, L, D)       float16  chunk (1, L, D)
    <split>/token_mask          (N, L)          bool     chunk (1, L)
    <split>/feat/t{step}/b{block}  (N, V, C, h, w) float16  chunk (1, 1, C, h, w)
    <split>/done/base           (N,) bool chunk (1,)   image, mask and tokens of row i written
    <split>/done/t{step}_b{block}  (N,) bool chunk (1,)   features of row i written
    <split>/crc/base            (N, 4) uint32   CRC-32 of row i's image, mask, tokens, token_mask as written
    <split>/crc/t{step}_b{block}   (N,) uint32     CRC-32 of row i's float16 features (0: not recorded)

Ids, texts and views live in the split group's attributes; the key and store facts in the root
group's. Every chunk holds one image, so (zarr) writers of different images never touch the same
file; zarr writes each chunk atomically (temp file + rename), and the done flag is written after the
data, so a killed writer leaves its row not-done. Done flags are never written False: in zarr their
chunk exists exactly when the flag is set (fill False, empty chunks not written), which lets ``done``
read a whole flag array with one directory listing. Checksums are written between the data and the
flag; ``pipeline cache verify`` recomputes them. An HDF5 store (a ``.h5`` path) holds the same
arrays in one file, for one writer at a time.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from zarr.errors import ContainsGroupError

from cache.backends import (BACKENDS, Backend, Location, Spec, as_location, backend_for, basename, dirname,
                            is_url)
from cache.key import FORMAT_VERSION, key_hash

MARKER = "feature-store"
BASE_ARRAYS = ("image", "mask", "tokens", "token_mask")  # per row, beside the features; their CRCs in this order
_TOKEN_ROWS_PER_DASK_CHUNK = 256


class StoreError(RuntimeError):
    """A feature store is missing, foreign, inconsistent, or used wrongly; the message names the path."""


class DamagedDataError(StoreError):
    """A row that does not read back as it was written: undecodable, NaN/Inf, or not its recorded CRC-32.
    ``reason`` is the message without the path and array in front."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class SplitLayout:
    """Rows of one split: ids and texts in order, and views per image (1, or 8 for d4-augmented train)."""

    ids: list[str]
    texts: list[str]
    views: int


def _pair_name(step: int, block: int) -> str:
    return f"t{step}_b{block}"


def feat_rel(split: str, step: int, block: int) -> str:
    """Where a (step, block)'s features live in a store (``FeatureStore.read`` takes it)."""
    return f"{split}/feat/t{step}/b{block}"


def _done_rel(split: str, step: int | None = None, block: int | None = None) -> str:
    if (step is None) != (block is None):
        raise ValueError("give both step and block, or neither (the base flags)")
    return f"{split}/done/base" if step is None else f"{split}/done/{_pair_name(step, block)}"


def _crc_rel(split: str, step: int | None = None, block: int | None = None) -> str:
    return f"{split}/crc/base" if step is None else f"{split}/crc/{_pair_name(step, block)}"


def checksum(value: np.ndarray) -> int:
    """CRC-32 of an array's bytes as stored (C order), never 0: 0 in a crc array means "not recorded"."""
    return zlib.crc32(np.ascontiguousarray(value).tobytes()) or 1


def row_problem(value: np.ndarray, recorded: int, float_data: bool) -> str | None:
    """What is wrong with a row read back (None: nothing): NaN/Inf values (``float_data``; a lost chunk reads
    as NaN), or a CRC-32 other than ``recorded`` at write time (0: none recorded, not compared). A matching
    CRC settles it alone: writers refuse non-finite values."""
    actual = checksum(value) if recorded else None
    if actual == recorded:
        return None
    if float_data and not np.isfinite(value).all():
        return f"{int((~np.isfinite(value)).sum())} NaN/Inf values (missing chunk or corrupt data)"
    return None if actual is None else f"checksum {actual:08x} != {recorded:08x} recorded at write time"


def _base_specs(n: int, v: int, size: int, token_len: int, token_dim: int) -> dict[str, Spec]:
    return {
        "image": Spec((n, v, 3, size, size), (1, 1, 3, size, size), "uint8", 0, "noshuffle",
                       ("image", "view", "channel", "y", "x")),
        "mask": Spec((n, v, size, size), (1, 1, size, size), "uint8", 0, "bitshuffle",
                      ("image", "view", "y", "x")),
        "tokens": Spec((n, token_len, token_dim), (1, token_len, token_dim), "float16", float("nan"),
                        "shuffle", ("image", "token", "feature")),
        "token_mask": Spec((n, token_len), (1, token_len), "bool", False, None, ("image", "token")),
        "done/base": _done_spec(n),
        "crc/base": Spec((n, len(BASE_ARRAYS)), (1, len(BASE_ARRAYS)), "uint32", 0, None, ("image", "array")),
    }


def _feat_spec(n: int, v: int, channels: int, hw: tuple[int, int]) -> Spec:
    h, w = hw
    # bitshuffle: 4 % smaller and 1.8x faster to decode than byte shuffle on float16 activations
    # (bench/cache.py); older stores with byte shuffle read the same (the codec is in each array's metadata)
    return Spec((n, v, channels, h, w), (1, 1, channels, h, w), "float16", float("nan"), "bitshuffle",
                 ("image", "view", "channel", "y", "x"))


def _done_spec(n: int) -> Spec:
    return Spec((n,), (1,), "bool", False, None, ("image",))


def _crc_spec(n: int) -> Spec:
    return Spec((n,), (1,), "uint32", 0, None, ("image",))


def _textdiff_version() -> str:
    try:
        return metadata.version("textdiff")
    except metadata.PackageNotFoundError:
        return "unknown"


def _numbered(names: list[str], prefix: str) -> list[tuple[int, str]]:
    """(number, name) for names `<prefix><digits>`; anything else (temp files) is ignored."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    return [(int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name))]


def format_of(path: Path | str) -> str:
    """The store format a path asks for by its suffix: h5 for .h5/.hdf5, else zarr."""
    return "h5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


def _validate_layout(path: Location, splits: dict[str, SplitLayout], sizes: dict[str, int]) -> None:
    if not splits:
        raise StoreError(f"{path}: a store needs at least one split")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StoreError(f"{path}: {name} must be a positive int, got {value!r}")
    for name, lay in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise StoreError(f"{path}: split name {name!r} is not a plain name")
        if len(lay.ids) != len(lay.texts):
            raise StoreError(f"{path}: split {name!r} has {len(lay.ids)} ids but {len(lay.texts)} texts")
        if len(set(lay.ids)) != len(lay.ids):
            raise StoreError(f"{path}: split {name!r} has duplicate ids")
        if lay.views < 1:
            raise StoreError(f"{path}: split {name!r} has views={lay.views}; need at least 1")


class FeatureStore:
    """A textdiff feature store on local disk (zarr folder or HDF5 file). Build with `create`, reopen with `open`."""

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
        _validate_layout(path, splits, {"size": size, "token_len": token_len, "token_dim": token_dim})
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
            _remove(tmp)
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
        attrs = {
            **extra_attrs,
            "textdiff": MARKER,
            "key": key,
            "key_hash": key_hash(key),
            "format_version": FORMAT_VERSION,
            "size": int(size),
            "textdiff_version": _textdiff_version(),
            "token_len": int(token_len),
            "token_dim": int(token_dim),
            "splits": list(splits),
        }
        store = BACKENDS[format_of(tmp)].build(tmp, attrs, {name: {"ids": list(lay.ids), "texts": list(lay.texts),
                                                  "views": int(lay.views)} for name, lay in splits.items()})
        try:
            for name, lay in splits.items():
                for rel, spec in _base_specs(len(lay.ids), lay.views, size, token_len, token_dim).items():
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
        problems = []
        facts = {"size": size, "token_len": token_len, "token_dim": token_dim}
        for name, value in facts.items():
            if store._attrs[name] != value:
                problems.append(f"{name} {store._attrs[name]} != requested {value}")
        if store.splits() != list(splits):
            problems.append(f"splits {store.splits()} != requested {list(splits)}")
        else:
            for name, lay in splits.items():
                have = store.layout(name)
                if have.ids != list(lay.ids):
                    problems.append(f"split {name!r} ids differ")
                if have.texts != list(lay.texts):
                    problems.append(f"split {name!r} texts differ")
                if have.views != lay.views:
                    problems.append(f"split {name!r} views {have.views} != requested {lay.views}")
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
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path}: store format_version {attrs.get('format_version')} but this "
                             f"textdiff reads format_version {FORMAT_VERSION}; re-extract into a new store")
        if key_hash(attrs["key"]) != attrs.get("key_hash"):
            raise StoreError(f"{path}: stored key does not match its stored key_hash (edited?)")
        return cls(path, backend, mode)

    # ------------------------------------------------------------------ layout
    @property
    def key_hash(self) -> str:
        return self._attrs["key_hash"]

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
            attrs = self._backend.attrs(split)
            lay = SplitLayout(ids=list(attrs["ids"]), texts=list(attrs["texts"]), views=int(attrs["views"]))
            self._layouts[split] = lay
        return lay

    def ids(self, split: str) -> list[str]:
        return list(self.layout(split).ids)

    def texts(self, split: str) -> list[str]:
        return list(self.layout(split).texts)

    def pairs(self) -> list[tuple[int, int]]:
        """(step, block) pairs whose feature and done arrays exist in every split."""
        common: set[tuple[int, int]] | None = None
        for split in self.splits():
            here = set()
            for step, tname in _numbered(self._backend.children(f"{split}/feat"), "t"):
                for block, _ in _numbered(self._backend.children(f"{split}/feat/{tname}"), "b"):
                    if self._exists(feat_rel(split, step, block)) and self._exists(_done_rel(split, step, block)):
                        here.add((step, block))
            common = here if common is None else common & here
        return sorted(common or ())

    def feature_shape(self, step: int, block: int) -> tuple[int, int, int]:
        """(C, h, w) of one view's features at (step, block)."""
        return tuple(self._array(feat_rel(self.splits()[0], step, block)).shape[2:])

    def checksums(self, split: str, step: int | None = None, block: int | None = None) -> np.ndarray:
        """CRC-32s recorded at write time: (N, 4) for image, mask, tokens, token_mask (step=None), or (N,)
        for a pair's features; 0 where none was recorded (rows or stores written before checksums)."""
        rel = _crc_rel(split, step, block)
        if self._exists(rel):
            return self.read(rel)
        n = len(self.layout(split).ids)
        return np.zeros((n, len(BASE_ARRAYS)) if step is None else n, np.uint32)

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

    def extract_command(self, blocks: Sequence[int] | None = None, steps: Sequence[int] | None = None) -> str:
        """The ``pipeline extract`` command that made this store, for ``blocks`` × ``steps`` (default: the
        pairs it holds): re-run, it adds those pairs and rewrites every row whose done flag is clear."""
        args = dict(self.attrs.get("extract", {}))
        pairs = self.pairs()
        blocks = sorted({b for _, b in pairs}) if blocks is None else blocks
        steps = sorted({s for s, _ in pairs}) if steps is None else steps
        parts = ["pipeline extract"]
        for name in ("dataset", "data_root", "unet", "unet_flags", "text_encoder", "size", "seed", "max_length",
                     "augment"):
            value = args.get(name)
            if value not in (None, "", "none"):
                parts.append(f"--{name.replace('_', '-')} {value}")
        if args.get("color_order") == "bgr":
            parts.append("--bgr")
        parts += [f"--steps {','.join(map(str, steps))}", f"--blocks {','.join(map(str, blocks))}",
                  f"--cache-dir {dirname(self.path)}"]
        return " ".join(parts)

    def unmark(self, split: str, i: int, step: int | None = None, block: int | None = None) -> None:
        """Clear row ``i``'s done flag (the base arrays with ``step=None``, else the pair's features), so
        that the next ``extract`` writes it again: how a damaged row is repaired."""
        self._writable()
        i = self._row(split, i)
        self._array(_done_rel(split, step, block))[i] = False  # zarr: the flag's chunk file is removed
        self._backend.commit()

    def _exists(self, rel: str) -> bool:
        return self._backend.exists(rel)

    def _array(self, rel: str) -> Any:
        if not self._exists(rel):
            raise StoreError(f"{self.path}: no array {rel!r}")
        return self._backend.array(rel)

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError(f"{self.path}: opened read-only; open with mode='r+' to write")

    def ensure_pair(self, step: int, block: int, channels: int, hw: tuple[int, int]) -> None:
        """Create the feature and done arrays of (step, block) in every split; existing ones are checked."""
        self._writable()
        h, w = hw
        for name, value, low in (("step", step, 0), ("block", block, 0), ("channels", channels, 1),
                                 ("height", h, 1), ("width", w, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise StoreError(f"{self.path}: ensure_pair {name} must be an int >= {low}, got {value!r}")
        for split in self.splits():
            lay = self.layout(split)
            n = len(lay.ids)
            self._ensure_array(feat_rel(split, step, block), _feat_spec(n, lay.views, channels, (h, w)))
            self._ensure_array(_done_rel(split, step, block), _done_spec(n))
            self._ensure_array(_crc_rel(split, step, block), _crc_spec(n))

    def ensure_pairs(self, pairs: Sequence[tuple[int, int, int, tuple[int, int]]]) -> None:
        """:meth:`ensure_pair` for each (step, block, channels, (h, w)); concurrently for zarr (creating an
        array is a few small metadata writes, and a store has dozens), in order for HDF5 (one file: the
        order of creation decides its bytes)."""
        if self.format == "h5":
            for p in pairs:
                self.ensure_pair(*p)
            return
        with ThreadPoolExecutor(8, thread_name_prefix="textdiff-create") as pool:
            list(pool.map(lambda p: self.ensure_pair(*p), pairs))

    def _ensure_array(self, rel: str, spec: Spec) -> None:
        if not self._exists(rel):
            self._backend.create(rel, spec)  # one made meanwhile by a concurrent ensure_pair is checked below
        arr = self._array(rel)
        if tuple(arr.shape) != spec.shape or arr.dtype != np.dtype(spec.dtype):
            raise StoreError(f"{self.path}: array {rel!r} is {tuple(arr.shape)} {arr.dtype}, "
                             f"requested {spec.shape} {spec.dtype}")

    # ------------------------------------------------------------------ writers
    def _row(self, split: str, i: int) -> int:
        n = len(self.layout(split).ids)
        if not 0 <= int(i) < n:
            raise StoreError(f"{self.path}: row {i} out of range for split {split!r} ({n} images)")
        return int(i)

    def _check_shape(self, what: str, split: str, value: np.ndarray, shape: tuple[int, ...]) -> None:
        if value.shape != shape:
            raise StoreError(f"{self.path}: {what} for split {split!r} has shape {value.shape}, expected {shape}")

    def _float16(self, what: str, split: str, i: int, value: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below, by name
            value = np.asarray(value, dtype=np.float16)
        if not np.isfinite(value).all():
            raise StoreError(f"{self.path}: {what} of split {split!r} row {i} are not finite in float16 "
                             "(overflow or NaN)")
        return value

    def write_base(self, split: str, i: int, image: np.ndarray, mask: np.ndarray,
                   tokens: np.ndarray, token_mask: np.ndarray) -> None:
        """Write image (V,3,S,S) uint8, mask (V,S,S) {0,1}, tokens (L,D), token_mask (L,); then the done flag."""
        self._writable()
        i = self._row(split, i)
        v, s = self.layout(split).views, self.size
        length, dim = self._attrs["token_len"], self._attrs["token_dim"]
        image, mask = np.asarray(image), np.asarray(mask)
        if image.dtype != np.uint8:
            raise StoreError(f"{self.path}: image for split {split!r} row {i} is {image.dtype}, expected uint8")
        if mask.dtype.kind not in "biu" or (mask.size and (mask.min() < 0 or mask.max() > 1)):
            raise StoreError(f"{self.path}: mask for split {split!r} row {i} must hold only 0 and 1")
        tokens = self._float16("tokens", split, i, tokens)
        token_mask = np.asarray(token_mask, dtype=bool)
        self._check_shape("image", split, image, (v, 3, s, s))
        self._check_shape("mask", split, mask, (v, s, s))
        self._check_shape("tokens", split, tokens, (length, dim))
        self._check_shape("token_mask", split, token_mask, (length,))
        values = {"image": image, "mask": mask.astype(np.uint8), "tokens": tokens, "token_mask": token_mask}
        for name in BASE_ARRAYS:
            self._array(f"{split}/{name}")[i] = values[name]
        if self._exists(_crc_rel(split)):  # stores made before checksums have none
            self._array(_crc_rel(split))[i] = [checksum(values[name]) for name in BASE_ARRAYS]
        self._array(_done_rel(split))[i] = True
        self._backend.commit()

    def write_features(self, split: str, i: int, step: int, block: int, feats: np.ndarray) -> None:
        """Write one image's features (V,C,h,w), cast to float16; then the done flag."""
        self._writable()
        i = self._row(split, i)
        rel = feat_rel(split, step, block)
        if not self._exists(rel):
            raise StoreError(f"{self.path}: no arrays for t{step} b{block}; call ensure_pair first")
        arr = self._array(rel)
        feats = self._float16(f"features t{step} b{block}", split, i, feats)
        self._check_shape(f"features t{step} b{block}", split, feats, tuple(arr.shape[1:]))
        arr[i] = feats
        if self._exists(_crc_rel(split, step, block)):
            self._array(_crc_rel(split, step, block))[i] = checksum(feats)
        self._array(_done_rel(split, step, block))[i] = True
        self._backend.commit()

    # ------------------------------------------------------------------ readers
    def done(self, split: str, step: int | None = None, block: int | None = None) -> np.ndarray:
        """(N,) bool flags; step=None gives the base flags. One directory listing per call."""
        n = len(self.layout(split).ids)
        rel = _done_rel(split, step, block)
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
        return self._dask(f"{split}/tokens", _TOKEN_ROWS_PER_DASK_CHUNK)

    def token_mask(self, split: str) -> np.ndarray:
        """(N, L) bool, read into memory."""
        return self._array(f"{split}/token_mask")[...]

    def masks(self, split: str) -> da.Array:
        """(N, V, S, S) uint8."""
        return self._dask(f"{split}/mask")

    def images(self, split: str) -> da.Array:
        """(N, V, 3, S, S) uint8."""
        return self._dask(f"{split}/image")

    def info(self) -> dict:
        """JSON-able summary: key, arrays (shape, dtype, chunks) and per-split done counts."""
        pairs = self.pairs()
        arrays: dict[str, dict] = {}
        splits: dict[str, dict] = {}
        for split in self.splits():
            rels = [f"{split}/{name}" for name in BASE_ARRAYS] + [_done_rel(split)]
            for step, block in pairs:
                rels += [feat_rel(split, step, block), _done_rel(split, step, block)]
            for rel in rels:
                arr = self._array(rel)
                arrays[rel] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "chunks": list(arr.chunks)}
            base = self.done(split)
            complete = base.copy()
            counts = {}
            for step, block in pairs:
                flags = self.done(split, step, block)
                counts[_pair_name(step, block)] = int(flags.sum())
                complete &= flags
            lay = self.layout(split)
            splits[split] = {"total": len(lay.ids), "views": lay.views, "base_done": int(base.sum()),
                             "done": counts, "complete": int(complete.sum())}
        return {
            "path": str(self.path), "format": self.format, "key": self.key, "key_hash": self.key_hash, "size": self.size,
            "format_version": self._attrs["format_version"],
            "textdiff_version": self._attrs["textdiff_version"], "token_len": self._attrs["token_len"],
            "token_dim": self._attrs["token_dim"], "pairs": [list(p) for p in pairs],
            "arrays": arrays, "splits": splits,
        }


def list_stores(cache_dir: Path) -> list[dict]:
    """One row per store (`*.zarr`, `*.h5`) in `cache_dir`: path, dataset, key_hash, pairs, images done/total
    (or error)."""
    rows = []
    for path in store_paths(cache_dir):
        try:
            info = FeatureStore.open(path).info()
        except StoreError as e:
            rows.append({"path": str(path), "error": str(e)})
            continue
        dataset = info["key"].get("dataset")
        rows.append({
            "path": str(path),
            "format": info["format"],
            "dataset": dataset.get("name") if isinstance(dataset, dict) else None,
            "key_hash": info["key_hash"],
            "modified": last_written(path),
            "size": info["size"],
            "pairs": [_pair_name(s, b) for s, b in info["pairs"]],
            "images_done": sum(s["complete"] for s in info["splits"].values()),
            "images_total": sum(s["total"] for s in info["splits"].values()),
            "splits": {name: {"complete": s["complete"], "total": s["total"]}
                       for name, s in info["splits"].items()},
        })
    return rows


def remove_leftovers(path: Path | str) -> int:
    """Delete what a killed writer of the local store ``path`` left: zarr's half-written ``*.partial``
    chunk files inside it and unfinished builds (``.<name>.tmp-*``) beside it. Only for the holder of the
    store's writer lock. Returns how many were removed."""
    path = Path(path)
    found = list(path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"))
    if path.is_dir():
        found += [p for p in path.rglob("*.partial") if p.is_file()]
    for p in found:
        _remove(p)
    return len(found)


def store_files(path: Path | str) -> list[Path]:
    """Every file of a local store (the file itself for HDF5)."""
    path = Path(path)
    return [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]


def last_written(path: Path | str) -> float:
    """The newest modification time of anything in a local store (a resumed extract counts as use)."""
    return max((f.stat().st_mtime for f in store_files(path)), default=Path(path).stat().st_mtime)


def store_paths(cache_dir: Path | str) -> list[Path]:
    """What in ``cache_dir`` looks like a store by its name (``*.zarr`` folders, ``*.h5`` files), sorted."""
    if is_url(cache_dir):
        raise StoreError(f"{cache_dir}: listing and collecting stores works on local folders only; for object "
                         "storage use the bucket's own listing and lifecycle rules")
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return []
    return sorted([p for p in cache_dir.glob("*.zarr") if p.is_dir() and not p.name.startswith(".")]
                  + [p for p in cache_dir.glob("*.h5") if p.is_file() and not p.name.startswith(".")])


def find_store(cache_dir: Path | str, dataset: str, data_root: Path | str | None = None,
               size: int | None = None) -> Path:
    """The store in ``cache_dir`` of ``dataset`` (from ``data_root`` at ``size`` px, where given) whose images
    are all written: one with cached dihedral views first, then the most recently written. Any UNet's store
    will do for what needs only images, masks and ids (the plain U-Net baseline)."""
    root = str(Path(data_root).expanduser().resolve()) if data_root is not None else None
    found = []
    for path in store_paths(cache_dir):
        try:
            store = FeatureStore.open(path)
        except StoreError:
            continue
        made = store.attrs.get("extract", {})
        if (made.get("dataset") == dataset and (root is None or made.get("data_root") == root)
                and (size is None or store.size == size)
                and all(store.done(s).all() for s in store.splits())):
            views = max(store.layout(s).views for s in store.splits())
            found.append((views > 1, last_written(path), path))
        store.close()
    if not found:
        where = "".join([f" from {root}" if root else "", f" at {size} px" if size else ""])
        raise StoreError(f"no complete store of {dataset}{where} in {cache_dir}: the baseline trains on a store's "
                         f"images, so that it sees exactly what `fit` sees; make one with `pipeline extract "
                         f"--dataset {dataset} ... --augment d4 --cache-dir {cache_dir}` (any UNet), or pass --cache STORE")
    return max(found)[2]
