"""Keeping a store healthy: ``verify_store`` checks every row marked done, ``repair_store`` clears the
damaged rows' done flags so that extracting again rewrites exactly them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cache.integrity import RowCheck, base_arrays, check_rows, pair_array, view_text_arrays
from cache.lock import writer_lock
from cache.store import FeatureStore

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

    def add(self, check: RowCheck) -> None:
        """Count one checked row of one array, and record what is wrong with it, if anything."""
        self.arrays_checked += 1
        if check.problem:
            self.problems.append(f"{check.where}: {check.problem}")
            damage = (check.split, check.row, check.array.pair)
            if not self.damaged or self.damaged[-1] != damage:  # a row's arrays are checked one after another
                self.damaged.append(damage)
        elif not check.recorded:
            self.unrecorded += 1


def verify_store(path: Path | str, progress: Callable[[], None] | None = None) -> VerifyReport:
    """Every row marked done: its data readable, finite, and equal to the checksum recorded when written.
    ``progress`` is called after each row (base or pair), :func:`work_items` times in all."""
    store = FeatureStore.open(path)
    report = VerifyReport(store.path)
    for split in store.splits():
        rows = np.flatnonzero(store.done(split))
        report.rows_checked += len(rows)
        base = base_arrays(store, split) + view_text_arrays(store, split)
        for check in check_rows(store, split, base, rows, progress):
            report.add(check)
        for step, block in store.pairs():
            rows = np.flatnonzero(store.done(split, step, block))
            for check in check_rows(store, split, [pair_array(store, split, step, block)], rows, progress):
                report.add(check)
    return report


def repair_store(report: VerifyReport) -> int:
    """Clear the done flags of the damaged rows ``report`` found (under the store's writer lock), so that
    extracting the store again rewrites exactly them; returns how many were cleared."""
    with writer_lock(report.path):
        store = FeatureStore.open(report.path, mode="r+")
        try:
            for split, row, pair in report.damaged:
                store.writer.unmark(split, row, *(pair or (None, None)))
        finally:
            store.close()
    return len(report.damaged)


def work_items(path: Path | str) -> int:
    """How many rows ``verify_store`` will check (for a progress bar)."""
    return FeatureStore.open(path).rows_done()
