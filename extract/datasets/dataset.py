"""The :class:`Dataset`: items in a deterministic order, how to load each one, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cache.key import sha256_file
from extract.datasets.core import SPLITS, DatasetError, Item
from extract.datasets.decoding import (MASK_RESIZES, LabelMap, check_prep, decode_image, decode_mask, resize_image,
                                      resize_mask)
from extract.shared import to_unit_range


class Generated(Protocol):
    """What a generated dataset (the synthetic set) gives a :class:`Dataset`: its samples and its identity."""

    def sample(self, item: Item) -> Any:
        """The item's sample: ``.image`` uint8 (H, W, 3) and ``.mask`` uint8 (H, W) in {0, 1}."""

    def identity(self) -> dict[str, Any]:
        """The generator's part of the fingerprint (version, seed, size)."""


@dataclass
class Dataset:
    """Items in a deterministic order (train, val, test; by id within a split) and how to load them."""

    name: str
    root: Path | None
    items: list[Item]
    default_blocks: tuple[int, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = ""                                    # which on-disk layout was read ("" for synthetic)
    tables: list[Path] = field(default_factory=list)    # text tables read (part of the fingerprint)
    _synthetic: Generated | None = field(default=None, repr=False)
    labels: LabelMap | None = None  # masks are label maps (nnU-Net's): their declared values, the foreground

    def decode_mask(self, path: Path) -> np.ndarray:
        """A mask file of this dataset as (H, W) uint8 {0, 1} (a label map through :attr:`labels`)."""
        return decode_mask(path, self.labels)

    def splits(self) -> list[str]:
        present = {it.split for it in self.items}
        return [s for s in SPLITS if s in present]

    def head(self, n: int) -> Dataset:
        """The same dataset with only the first ``n`` items of each split (its fingerprint shrinks too)."""
        if n < 1:
            raise DatasetError(f"{self.name}: head(n) needs n >= 1, got {n}")
        kept = [it for s in self.splits() for it in self.by_split(s)[:n]]
        return replace(self, items=kept)

    def by_split(self, split: str) -> list[Item]:
        if split not in SPLITS:
            raise DatasetError(f"{self.name}: unknown split {split!r} (expected one of {SPLITS})")
        return [it for it in self.items if it.split == split]

    def load_image_uint8(self, item: Item, size: int, color_order: str = "rgb") -> np.ndarray:
        """uint8 (3, size, size), RGB (or BGR), PIL bilinear resize: what the store keeps."""
        check_prep(size, color_order)
        if self._synthetic is not None:
            rgb8 = self._synthetic.sample(item).image
        else:
            rgb8, _note = decode_image(self._path(item.image_path, item))
        return resize_image(rgb8, size, color_order)

    def load_image(self, item: Item, size: int, color_order: str = "rgb") -> np.ndarray:
        """float32 (3, size, size) in [-1, 1]: :meth:`load_image_uint8` scaled for the UNet."""
        return to_unit_range(self.load_image_uint8(item, size, color_order))

    def load_mask(self, item: Item, size: int, mask_resize: str = "nearest") -> np.ndarray:
        """uint8 (size, size) in {0, 1}, resized as ``mask_resize`` says (:func:`decoding.resize_mask`)."""
        return self.load_masks(item, size, (mask_resize,))[mask_resize]

    def load_masks(self, item: Item, size: int, resizes: tuple[str, ...] = MASK_RESIZES) -> dict[str, np.ndarray]:
        """The item's mask read once, under each resizing of ``resizes``: uint8 (size, size) in {0, 1} each."""
        check_prep(size, "rgb")
        if self._synthetic is not None:
            mask = self._synthetic.sample(item).mask
        else:
            mask = self.decode_mask(self._path(item.mask_path, item))
        mask = np.ascontiguousarray(mask)
        return {mode: resize_mask(mask, size, mode) for mode in resizes}

    def _path(self, path: Path | None, item: Item) -> Path:
        if path is None:
            raise DatasetError(f"{self.name}: item {item.split}/{item.id} has no file")
        return path

    def texts_sha256(self) -> str:
        rows = [[it.split, it.id, it.text] for it in self.items]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    def fingerprint(self) -> dict:
        """JSON-able identity of the content: files and their sha256 (or the generator), and the texts."""
        counts = {s: len(self.by_split(s)) for s in self.splits()}
        if self._synthetic is not None:
            return {"name": "synthetic", **self._synthetic.identity(), "counts": counts,
                    "texts_sha256": self.texts_sha256()}
        assert self.root is not None
        paths = sorted({*self.tables, *(p for it in self.items for p in (it.image_path, it.mask_path) if p)})
        files = {p.relative_to(self.root).as_posix(): sha256_file(p) for p in paths}
        return {"name": self.name, "layout": self.layout, "counts": counts, "files": files,
                "texts_sha256": self.texts_sha256()}
