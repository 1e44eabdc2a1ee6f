"""Where a feature store's arrays live: a zarr v3 directory (default) or one HDF5 file.

Both hold the same layout (``cache/schema.py``): groups by relative path (``train/feat/t50/b4``), the
same shapes, chunks (one image per chunk), dtypes and fill values, the root and split attributes as
JSON. ``FeatureStore`` talks only to the small interface below, so readers, ``fit``, ``evaluate``,
``cache info`` and ``cache verify`` work on either.

zarr: any number of processes may write different images at once (one file per chunk, each
written atomically) — what ``extract --scheduler`` needs. A zarr store may also live at any fsspec
URL zarr supports (``s3://bucket/cache/x.zarr``, ``gs://``, ``memory://`` ...; the protocol's
package, e.g. s3fs, installed; credentials as that package reads them). HDF5: one writing process at a time
(HDF5 locks the file; a second writer is refused), flushed after every image so that a killed
writer leaves the images it committed readable.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import dask.array as da
import fsspec
import numpy as np
import zarr
from zarr.codecs import BloscCodec
from zarr.errors import ContainsArrayError
from zarr.storage import FsspecStore, LocalStore

FORMATS = ("zarr", "h5")
_CHUNK_KEYS = {"name": "default", "separator": "/"}
_H5_ATTRS = "textdiff_attrs"  # HDF5 attributes hold the JSON of what zarr keeps as attributes


Location = Path | str  # a local path, or an fsspec URL (str) for zarr stores


def is_url(location: Location) -> bool:
    """An fsspec URL (``proto://...``) rather than a local path."""
    return isinstance(location, str) and "://" in location


def as_location(value: str | Path) -> Location:
    """A command-line store or cache folder: URLs stay strings (``Path`` would fold their ``//``)."""
    return value if is_url(value) else Path(value)


def join(location: Location, name: str) -> Location:
    """``location / name`` for paths and URLs."""
    return f"{str(location).rstrip('/')}/{name}" if is_url(location) else Path(location) / name


def dirname(location: Location) -> Location:
    return str(location).rstrip("/").rsplit("/", 1)[0] if is_url(location) else Path(location).parent


def basename(location: Location) -> str:
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_url(location) else Path(location).name


def remove_local(path: Path) -> None:
    """Delete a local file or folder if it is there (what is left of a folder that will not go stays)."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


@dataclass(frozen=True)
class Spec:
    """One array: shape, chunks, dtype, fill value, shuffle mode (None: uncompressed), dimension names, and
    zarr's blosc compressor with its level (HDF5 uses deflate whatever it says)."""

    shape: tuple[int, ...]
    chunks: tuple[int, ...]
    dtype: str
    fill: Any
    shuffle: str | None
    dims: tuple[str, ...]
    cname: str = "zstd"
    clevel: int = 3


class Backend:
    """The storage interface of a feature store (see the module docstring)."""

    format: ClassVar[str]
    suffix: ClassVar[str]

    def __init__(self, path: Location, read_only: bool) -> None:
        self.path, self.read_only = path, read_only

    @classmethod
    def build(cls, path: Location, attrs: dict, groups: dict[str, dict]) -> Backend:
        """A new, writable store at ``path`` with root ``attrs`` and one group per ``groups`` item."""
        raise NotImplementedError

    def attrs(self, group: str = "") -> dict:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        raise NotImplementedError

    def children(self, rel: str) -> list[str]:
        """Names directly under group ``rel`` ([] when it does not exist)."""
        raise NotImplementedError

    def create(self, rel: str, spec: Spec) -> None:
        """Create array ``rel``; an array created meanwhile by another writer is left as it is."""
        raise NotImplementedError

    def array(self, rel: str) -> Any:
        """The array at ``rel``: numpy-style indexing for reads and writes, ``shape``, ``dtype``, ``chunks``."""
        raise NotImplementedError

    def flags(self, rel: str, n: int) -> np.ndarray:
        """A (n,) bool done-flag array, read whole."""
        return np.asarray(self.array(rel)[...], dtype=bool)

    def dask(self, rel: str, rows: int) -> da.Array:
        raise NotImplementedError

    def commit(self) -> None:
        """Make what was written so far durable (after each image's done flag)."""

    def close(self) -> None:
        """Release the store's file handles."""


def _fs(location: Location) -> tuple[Any, str]:
    """(fsspec filesystem, path on it) of a local path or URL."""
    if is_url(location):
        return fsspec.core.url_to_fs(str(location))
    return fsspec.filesystem("file"), str(Path(location).resolve())


class ZarrBackend(Backend):
    """A zarr v3 directory: on the local (or a shared) filesystem, or at an fsspec URL."""

    format, suffix = "zarr", ".zarr"

    def __init__(self, path: Location, read_only: bool, root: zarr.Group) -> None:
        super().__init__(path, read_only)
        self._root = root
        self._arrays: dict[str, zarr.Array] = {}
        self._fs, self._base = _fs(path)

    @staticmethod
    def _store(path: Location, read_only: bool) -> Any:
        if not is_url(path):
            return LocalStore(path, read_only=read_only)
        options = {"auto_mkdir": True} if str(path).startswith("file://") else None
        return FsspecStore.from_url(str(path), read_only=read_only, storage_options=options)

    @classmethod
    def build(cls, path: Location, attrs: dict, groups: dict[str, dict]) -> ZarrBackend:
        root = zarr.open_group(cls._store(path, False), mode="w-", zarr_format=3, attributes=attrs)
        for name, group_attrs in groups.items():
            root.create_group(name, attributes=group_attrs)
        return cls(path, False, root)

    @classmethod
    def open(cls, path: Location, read_only: bool) -> ZarrBackend:
        root = zarr.open_group(cls._store(path, read_only), mode="r" if read_only else "r+", zarr_format=3)
        return cls(path, read_only, root)

    def attrs(self, group: str = "") -> dict:
        return dict((self._root[group] if group else self._root).attrs)

    def _names(self, rel: str, directories: bool) -> list[str]:
        try:
            entries = self._fs.ls(f"{self._base}/{rel}", detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries
                      if (e["type"] == "directory") == directories)

    def exists(self, rel: str) -> bool:
        if not is_url(self.path):  # the common case, without fsspec's overhead
            return (Path(self.path) / rel / "zarr.json").is_file()
        return self._fs.exists(f"{self._base}/{rel}/zarr.json")

    def children(self, rel: str) -> list[str]:
        return self._names(rel, directories=True)

    def create(self, rel: str, spec: Spec) -> None:
        compressors = (None if spec.shuffle is None
                       else BloscCodec(cname=spec.cname, clevel=spec.clevel, shuffle=spec.shuffle))
        try:
            self._root.create_array(rel, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                                    fill_value=spec.fill, compressors=compressors,
                                    chunk_key_encoding=_CHUNK_KEYS, dimension_names=spec.dims)
        except ContainsArrayError:
            pass

    def array(self, rel: str) -> zarr.Array:
        arr = self._arrays.get(rel)
        if arr is None:
            arr = zarr.open_array(self._root.store, path=rel, mode="r" if self.read_only else "r+", zarr_format=3)
            # flags: a chunk file exists exactly when set, so writing False (the fill) removes it. Float arrays
            # are only ever written finite, never their NaN fill: skip zarr's per-chunk fill comparison
            # (a full comparison pass per chunk, costlier than compressing it with lz4)
            arr = self._arrays[rel] = arr.with_config({"write_empty_chunks": arr.dtype.kind == "f"})
        return arr

    def flags(self, rel: str, n: int) -> np.ndarray:
        """Done flags are never written False, so a flag's chunk file exists exactly when it is set: one
        directory listing reads them all."""
        flags = np.zeros(n, dtype=bool)
        if is_url(self.path):
            names = self._names(f"{rel}/c", directories=False)
        else:
            try:
                names = os.listdir(Path(self.path) / rel / "c")
            except FileNotFoundError:
                return flags  # nothing written yet
        rows = np.fromiter((int(x) for x in names if x.isdigit()), dtype=np.int64)
        flags[rows[rows < n]] = True
        return flags

    def dask(self, rel: str, rows: int) -> da.Array:
        arr = self.array(rel)
        return da.from_zarr(arr, chunks=(rows,) + tuple(arr.shape[1:]))


class H5Backend(Backend):
    """One HDF5 file (h5py): chunked datasets, byte shuffle + deflate (level 1) where zarr uses blosc.

Not LZF: HDF5's LZF filter hashes through an uninitialised table, so the same chunk can compress to
different bytes in two runs (still decoding to the same values), which breaks "same inputs → same file"."""

    format, suffix = "h5", ".h5"

    def __init__(self, path: Path, read_only: bool, file: Any) -> None:
        super().__init__(path, read_only)
        self._file = file

    @classmethod
    def build(cls, path: Path, attrs: dict, groups: dict[str, dict]) -> H5Backend:
        import h5py

        f = h5py.File(path, "w-")
        f.attrs[_H5_ATTRS] = json.dumps(attrs)
        for name, group_attrs in groups.items():
            f.create_group(name).attrs[_H5_ATTRS] = json.dumps(group_attrs)
        return cls(path, False, f)

    @classmethod
    def open(cls, path: Path, read_only: bool) -> H5Backend:
        import h5py

        return cls(path, read_only, h5py.File(path, "r" if read_only else "r+"))

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        f = getattr(self, "_file", None)
        if f is not None and f.id.valid:
            f.close()

    def attrs(self, group: str = "") -> dict:
        raw = (self._file[group] if group else self._file).attrs.get(_H5_ATTRS)
        return json.loads(raw) if raw is not None else {}

    def exists(self, rel: str) -> bool:
        import h5py

        return isinstance(self._file.get(rel), h5py.Dataset)

    def children(self, rel: str) -> list[str]:
        import h5py

        group = self._file.get(rel)
        return sorted(group.keys()) if isinstance(group, h5py.Group) else []

    def create(self, rel: str, spec: Spec) -> None:
        if rel in self._file:
            return
        compress = spec.shuffle is not None
        ds = self._file.create_dataset(rel, shape=spec.shape, chunks=spec.chunks, dtype=spec.dtype,
                                       fillvalue=np.array(spec.fill, dtype=spec.dtype),
                                       compression="gzip" if compress else None,
                                       compression_opts=1 if compress else None, shuffle=compress,
                                       track_times=False)  # same inputs → same file bytes
        ds.attrs["dimension_names"] = list(spec.dims)

    def array(self, rel: str) -> Any:
        return self._file[rel]

    def dask(self, rel: str, rows: int) -> da.Array:
        ds = self._file[rel]
        return da.from_array(ds, chunks=(rows,) + tuple(ds.shape[1:]), lock=True, asarray=True)

    def commit(self) -> None:
        self._file.flush()


BACKENDS: dict[str, type[Backend]] = {"zarr": ZarrBackend, "h5": H5Backend}


def backend_for(path: Location) -> type[Backend] | None:
    """The backend of what is at ``path``: a directory (or a URL holding zarr.json) is zarr, an HDF5 file
    h5; None otherwise."""
    if is_url(path):
        fs, base = _fs(path)
        return ZarrBackend if fs.exists(f"{base}/zarr.json") else None
    path = Path(path)
    if path.is_dir():
        return ZarrBackend
    if path.is_file():
        import h5py

        return H5Backend if h5py.is_hdf5(path) else None
    return None
