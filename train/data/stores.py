"""Which store of a cache folder the plain U-Net baseline reads its images from (any UNet's store will do)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cache.catalogue import StoreEntry

__all__ = ["NoStoreError", "baseline_store", "choose_store"]


class NoStoreError(ValueError):
    """No store in the cache folder can give the baseline its images."""


def choose_store(entries: list[StoreEntry]) -> StoreEntry | None:
    """The complete store to train on: one with cached dihedral views first, then the newest."""
    complete = [e for e in entries if e.complete]
    return max(complete, key=lambda e: (e.views > 1, e.modified, str(e.path)), default=None)


def baseline_store(cache_dir: Path | str, dataset: str, data_root: Path | str | None = None,
                   size: int | None = None) -> Path:
    """The store in ``cache_dir`` of ``dataset`` (from ``data_root`` at ``size`` px, where given) whose
    images are all written (:func:`choose_store`). Any UNet's store will do: the baseline reads images."""
    from cache.catalogue import matching_stores  # opens stores: only when asked to choose one

    chosen = choose_store(matching_stores(cache_dir, dataset, data_root=data_root, size=size))
    if chosen is None:
        root = str(Path(data_root).expanduser().resolve()) if data_root is not None else None
        where = "".join([f" from {root}" if root else "", f" at {size} px" if size else ""])
        raise NoStoreError(f"no complete store of {dataset}{where} in {cache_dir}: the baseline trains on a store's "
                           f"images, so that it sees exactly what `fit` sees; make one with `pipeline extract "
                           f"--dataset {dataset} ... --augment d4 --cache-dir {cache_dir}` (any UNet)")
    return chosen.path
