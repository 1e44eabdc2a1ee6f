"""The stores in a local cache folder: listing them, finding a dataset's, sizing and removing them.

What ``pipeline cache ls / rm / gc`` do, and how stage two finds a store when it is not given one.
Only what opens as a textdiff feature store is ever listed, matched or deleted.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cache.backends import is_url
from common.errors import OptionError
from cache.lock import held_by_other, lock_path
from cache.schema import pair_name
from cache.store import FeatureStore, StoreError


@dataclass(frozen=True)
class StoreEntry:
    """A readable store of a dataset, as :func:`matching_stores` finds it."""

    path: Path
    dataset: str
    size: int                 # image side in px
    views: int                # the most views of any split (8: dihedral views cached)
    complete: bool            # every split's images (base arrays) written
    modified: float           # last written (seconds since the epoch)
    data_root: str | None     # the dataset folder it was extracted from, resolved


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


def store_files(path: Path | str) -> list[Path]:
    """Every file of a local store (the file itself for HDF5)."""
    path = Path(path)
    return [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]


def store_bytes(path: Path | str) -> int:
    """The bytes a local store takes on disk."""
    return sum(f.stat().st_size for f in store_files(path))


def last_written(path: Path | str) -> float:
    """The newest modification time of anything in a local store (a resumed extract counts as use)."""
    return max((f.stat().st_mtime for f in store_files(path)), default=Path(path).stat().st_mtime)


def list_stores(cache_dir: Path | str) -> list[dict]:
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
            "pairs": [pair_name(s, b) for s, b in info["pairs"]],
            "images_done": sum(s["complete"] for s in info["splits"].values()),
            "images_total": sum(s["total"] for s in info["splits"].values()),
            "splits": {name: {"complete": s["complete"], "total": s["total"]}
                       for name, s in info["splits"].items()},
        })
    return rows


def matching_stores(cache_dir: Path | str, dataset: str, data_root: Path | str | None = None,
                    size: int | None = None) -> list[StoreEntry]:
    """The readable stores in ``cache_dir`` extracted from ``dataset`` (from ``data_root``, at ``size`` px,
    where given), complete or not, in path order. Stores that do not open are skipped."""
    root = str(Path(data_root).expanduser().resolve()) if data_root is not None else None
    found = []
    for path in store_paths(cache_dir):
        try:
            store = FeatureStore.open(path)
        except StoreError:
            continue
        try:
            made = store.attrs.get("extract", {})
            if (made.get("dataset") == dataset and (root is None or made.get("data_root") == root)
                    and (size is None or store.size == size)):
                found.append(StoreEntry(
                    path=path, dataset=dataset, size=store.size,
                    views=max(store.layout(s).views for s in store.splits()),
                    complete=all(store.done(s).all() for s in store.splits()),
                    modified=last_written(path), data_root=made.get("data_root")))
        finally:
            store.close()
    return found


def remove_stores(paths: list[Path], dry_run: bool = False) -> list[tuple[Path, int]]:
    """Delete feature stores (refusing anything that is not one); (path, bytes) of each."""
    checked = []
    for p in paths:
        FeatureStore.open(p).close()  # raises StoreError, naming the path, if it is not a feature store
        holder = held_by_other(p)
        if holder:
            raise StoreError(f"{p}: being written by another process ({holder}); stop it or let it finish first")
        checked.append((Path(p), store_bytes(Path(p))))
    if not dry_run:
        for p, _ in checked:
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            lock_path(p).unlink(missing_ok=True)
    return checked


def gc_candidates(cache_dir: Path | str, older_than_days: float | None = None, keep: int | None = None
                  ) -> list[tuple[Path, float]]:
    """Stores in ``cache_dir`` to remove: last written more than ``older_than_days`` ago, and/or beyond
    the ``keep`` most recently written. (path, last written) of each, oldest first."""
    if older_than_days is None and keep is None:
        raise OptionError("say what to collect: older_than_days=DAYS and/or keep=N", "older_than_days", "keep")
    if keep is not None and keep < 0:
        raise OptionError(f"keep must be >= 0, got {keep}", "keep")
    stores = []
    for p in store_paths(cache_dir):
        try:
            FeatureStore.open(p).close()
        except StoreError:
            continue  # not ours: never touched
        if held_by_other(p):
            continue  # being written now: in use
        stores.append((p, last_written(p)))
    stores.sort(key=lambda s: s[1], reverse=True)
    now = time.time()
    out = []
    for rank, (p, t) in enumerate(stores):
        too_old = older_than_days is None or now - t > older_than_days * 86400
        beyond = keep is None or rank >= keep
        if too_old and beyond:  # both given: older than DAYS and not among the N most recent
            out.append((p, t))
    return sorted(out, key=lambda s: s[1])
