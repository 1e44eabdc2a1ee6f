"""Keeping a cache healthy: ``verify`` a store, ``rm`` stores, ``gc`` a cache folder (each with a dry run)."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.lock import held_by_other, lock_path, writer_lock
from cache.store import (BASE_ARRAYS, DamagedDataError, FeatureStore, StoreError, feat_rel, last_written,
                         row_problem, store_files, store_paths)


Damage = tuple[str, int, tuple[int, int] | None]  # (split, row, (step, block) or None for the base arrays)


@dataclass
class VerifyReport:
    """What ``verify`` found: rows checked, one line per problem (split, image id, array, what), and the
    damaged rows themselves (for ``repair_store``)."""

    path: Path
    rows_checked: int = 0
    arrays_checked: int = 0
    unrecorded: int = 0                       # rows written before checksums existed
    problems: list[str] = field(default_factory=list)
    damaged: list[Damage] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def check(self, store: FeatureStore, where: str, rel: str, row: int, recorded: int, float_data: bool,
              damage: Damage) -> None:
        """Read row ``row`` of ``rel`` and record what is wrong with it, if anything."""
        self.arrays_checked += 1
        try:
            problem = row_problem(store.read(rel, row), recorded, float_data)
        except DamagedDataError as e:
            problem = e.reason
        if problem:
            self.problems.append(f"{where}: {problem}")
            if not self.damaged or self.damaged[-1] != damage:  # a row's arrays are checked one after another
                self.damaged.append(damage)
        elif recorded == 0:
            self.unrecorded += 1


def verify_store(path: Path | str, progress=None) -> VerifyReport:
    """Every row marked done: its data readable, finite, and equal to the checksum recorded when written."""
    store = FeatureStore.open(path)
    report = VerifyReport(store.path)
    for split in store.splits():
        ids = store.ids(split)
        base_crc = store.checksums(split)
        for i in np.flatnonzero(store.done(split)):
            i = int(i)
            report.rows_checked += 1
            for k, name in enumerate(BASE_ARRAYS):
                report.check(store, f"{split}/{ids[i]} {name}", f"{split}/{name}", i, int(base_crc[i, k]),
                             name == "tokens", (split, i, None))
            if progress:
                progress()
        for step, block in store.pairs():
            crc = store.checksums(split, step, block)
            for i in np.flatnonzero(store.done(split, step, block)):
                i = int(i)
                report.check(store, f"{split}/{ids[i]} t{step} b{block}", feat_rel(split, step, block), i,
                             int(crc[i]), True, (split, i, (step, block)))
                if progress:
                    progress()
    return report


def repair_store(report: VerifyReport) -> int:
    """Clear the done flags of the damaged rows ``report`` found (under the store's writer lock), so that
    running the store's ``pipeline extract`` again rewrites exactly them; returns how many were cleared."""
    with writer_lock(report.path):
        store = FeatureStore.open(report.path, mode="r+")
        try:
            for split, row, pair in report.damaged:
                store.unmark(split, row, *(pair or (None, None)))
        finally:
            store.close()
    return len(report.damaged)


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
