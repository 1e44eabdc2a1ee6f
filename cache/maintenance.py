"""Keeping a cache healthy: ``verify`` a store, ``rm`` stores, ``gc`` a cache folder (each with a dry run)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.lock import held_by_other, lock_path
from cache.store import (BASE_ARRAYS, FeatureStore, StoreError, checksum, feat_rel, last_written, store_files,
                         store_paths)


@dataclass
class VerifyReport:
    """What ``verify`` found: rows checked, and one line per problem (split, image id, array, what)."""

    path: Path
    rows_checked: int = 0
    arrays_checked: int = 0
    unrecorded: int = 0                       # rows written before checksums existed
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_row(report: VerifyReport, where: str, value: np.ndarray, recorded: int, float_data: bool) -> None:
    report.arrays_checked += 1
    if float_data and not np.isfinite(value).all():
        n_bad = int((~np.isfinite(value)).sum())
        report.problems.append(f"{where}: {n_bad} NaN/Inf values (missing chunk or corrupt data)")
        return
    if recorded == 0:
        report.unrecorded += 1
    elif checksum(value) != recorded:
        report.problems.append(f"{where}: checksum {checksum(value):08x} != {recorded:08x} recorded at write time")


def verify_store(path: Path | str, progress=None) -> VerifyReport:
    """Every row marked done: its data present and finite, and equal to the checksum recorded when written."""
    store = FeatureStore.open(path)
    report = VerifyReport(store.path)
    for split in store.splits():
        ids = store.ids(split)
        base_crc = store.checksums(split)
        for i in np.flatnonzero(store.done(split)):
            report.rows_checked += 1
            for k, name in enumerate(BASE_ARRAYS):
                value = store.read(f"{split}/{name}", int(i))
                _check_row(report, f"{split}/{ids[i]} {name}", value, int(base_crc[i, k]), name == "tokens")
            if progress:
                progress()
        for step, block in store.pairs():
            crc = store.checksums(split, step, block)
            for i in np.flatnonzero(store.done(split, step, block)):
                value = store.read(feat_rel(split, step, block), int(i))
                _check_row(report, f"{split}/{ids[i]} t{step} b{block}", value, int(crc[i]), True)
                if progress:
                    progress()
    return report


def work_items(path: Path | str) -> int:
    """How many rows ``verify_store`` will check (for a progress bar)."""
    return FeatureStore.open(path).rows_done()


def store_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in store_files(path))


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


def gc_candidates(cache_dir: Path, older_than_days: float | None = None, keep: int | None = None
                  ) -> list[tuple[Path, float]]:
    """Stores in ``cache_dir`` to remove: last written more than ``older_than_days`` ago, and/or beyond
    the ``keep`` most recently written. (path, last written) of each, oldest first."""
    if older_than_days is None and keep is None:
        raise ValueError("say what to collect: --older-than DAYS and/or --keep N")
    if keep is not None and keep < 0:
        raise ValueError(f"--keep must be >= 0, got {keep}")
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
