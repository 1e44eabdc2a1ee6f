"""The writing half of a feature store, by composition (``store.writer``, a :class:`StoreWriter` wrapping a store
opened with mode "r+"): creating pair arrays, writing an image's base arrays and features (checked, then
checksummed, then flagged done), and clearing a flag for repair.

Every write checks its values (dtype, shape, finite in float16) before anything is written, writes the data,
then its CRC-32, then the done flag: a killed writer leaves its row not-done (see :mod:`cache.store`).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from cache.backends import Backend, Location, Spec
from cache.checksums import checksum
from cache.schema import (BASE_ARRAYS, VIEW_TEXT_ARRAYS, VIEW_TEXT_CRC, SplitLayout, StoreError, crc_rel, crc_spec,
                          done_rel, done_spec, feat_rel, feat_spec)

if TYPE_CHECKING:
    from cache.store import FeatureStore

__all__ = ["StoreWriter"]


class StoreWriter:
    """The write methods of a feature store opened for writing (``store.writer``): it wraps the store, which
    reads; a read-only store has none."""

    def __init__(self, store: FeatureStore) -> None:
        if store.mode == "r":
            raise StoreError(f"{store.path}: opened read-only; open with mode='r+' to write")
        self.store = store

    @property
    def path(self) -> Location:
        return self.store.path

    @property
    def format(self) -> str:
        return self.store.format

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def _backend(self) -> Backend:
        return self.store._backend

    @property
    def _attrs(self) -> dict:
        return self.store._attrs

    def layout(self, split: str) -> SplitLayout:
        return self.store.layout(split)

    def splits(self) -> list[str]:
        return self.store.splits()

    def _exists(self, rel: str) -> bool:
        return self.store._exists(rel)

    def _array(self, rel: str) -> Any:
        return self.store._array(rel)

    def unmark(self, split: str, i: int, step: int | None = None, block: int | None = None) -> None:
        """Clear row ``i``'s done flag (the base arrays with ``step=None``, else the pair's features), so
        that the next ``extract`` writes it again: how a damaged row is repaired."""
        i = self._row(split, i)
        self._array(done_rel(split, step, block))[i] = False  # zarr: the flag's chunk file is removed
        self._backend.commit()

    def ensure_pair(self, step: int, block: int, channels: int, hw: tuple[int, int]) -> None:
        """Create the feature and done arrays of (step, block) in every split; existing ones are checked."""
        h, w = hw
        for name, value, low in (("step", step, 0), ("block", block, 0), ("channels", channels, 1),
                                 ("height", h, 1), ("width", w, 1)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise StoreError(f"{self.path}: ensure_pair {name} must be an int >= {low}, got {value!r}")
        for split in self.splits():
            lay = self.layout(split)
            n = len(lay.ids)
            self._ensure_array(feat_rel(split, step, block), feat_spec(n, lay.views, channels, (h, w)))
            self._ensure_array(done_rel(split, step, block), done_spec(n))
            self._ensure_array(crc_rel(split, step, block), crc_spec(n))

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

    def _row(self, split: str, i: int) -> int:
        return self.store._row(split, i)

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
                   tokens: np.ndarray, token_mask: np.ndarray, view_tokens: np.ndarray | None = None,
                   view_token_mask: np.ndarray | None = None, mask_authors: np.ndarray | None = None) -> None:
        """Write image (V,3,S,S) uint8, mask (V,S,S) {0,1} (resized nearest), tokens (L,D), token_mask (L,),
        mask_authors (V,S,S) {0,1} (the same annotation resized as the authors do; None: the annotation is at
        the store's size, where both resizings are the identity) — and, in a split whose views have their own
        text, each view's view_tokens (V,L,D) and view_token_mask (V,L); then the done flag."""
        i = self._row(split, i)
        v, s = self.layout(split).views, self.size
        views = self._view_text_values(split, i, view_tokens, view_token_mask)
        length, dim = self._attrs["token_len"], self._attrs["token_dim"]
        image = np.asarray(image)
        if image.dtype != np.uint8:
            raise StoreError(f"{self.path}: image for split {split!r} row {i} is {image.dtype}, expected uint8")
        masks = {"mask": self._mask("mask", split, i, mask),
                 "mask_authors": self._mask("mask_authors", split, i, mask if mask_authors is None else mask_authors)}
        tokens = self._float16("tokens", split, i, tokens)
        token_mask = np.asarray(token_mask, dtype=bool)
        self._check_shape("image", split, image, (v, 3, s, s))
        self._check_shape("tokens", split, tokens, (length, dim))
        self._check_shape("token_mask", split, token_mask, (length,))
        values = {"image": image, **masks, "tokens": tokens, "token_mask": token_mask}
        for name in BASE_ARRAYS:
            self._array(f"{split}/{name}")[i] = values[name]
        self._array(crc_rel(split))[i] = [checksum(values[name]) for name in BASE_ARRAYS]
        if views:
            for name in VIEW_TEXT_ARRAYS:
                self._array(f"{split}/{name}")[i] = views[name]
            self._array(f"{split}/{VIEW_TEXT_CRC}")[i] = [checksum(views[name]) for name in VIEW_TEXT_ARRAYS]
        self._array(done_rel(split))[i] = True
        self._backend.commit()

    def _mask(self, name: str, split: str, i: int, mask: np.ndarray) -> np.ndarray:
        """A row's masks (V,S,S) as written: only 0 and 1, uint8."""
        mask = np.asarray(mask)
        if mask.dtype.kind not in "biu" or (mask.size and (mask.min() < 0 or mask.max() > 1)):
            raise StoreError(f"{self.path}: {name} for split {split!r} row {i} must hold only 0 and 1")
        self._check_shape(name, split, mask, (self.layout(split).views, self.size, self.size))
        return mask.astype(np.uint8)

    def _view_text_values(self, split: str, i: int, view_tokens: np.ndarray | None,
                          view_token_mask: np.ndarray | None) -> dict[str, np.ndarray]:
        """The view arrays of a row as written (checked), or {} in a split whose views have no text of their own."""
        given = view_tokens is not None and view_token_mask is not None
        if self.layout(split).view_texts is None:
            if view_tokens is not None or view_token_mask is not None:
                raise StoreError(f"{self.path}: split {split!r} keeps no text per view; got view tokens for row {i}")
            return {}
        if not given:
            raise StoreError(f"{self.path}: split {split!r} keeps each view's text: row {i} needs view_tokens and "
                             "view_token_mask")
        v, length, dim = self.layout(split).views, self._attrs["token_len"], self._attrs["token_dim"]
        values = {"view_tokens": self._float16("view tokens", split, i, view_tokens),
                  "view_token_mask": np.asarray(view_token_mask, dtype=bool)}
        self._check_shape("view_tokens", split, values["view_tokens"], (v, length, dim))
        self._check_shape("view_token_mask", split, values["view_token_mask"], (v, length))
        return values

    def write_features(self, split: str, i: int, step: int, block: int, feats: np.ndarray) -> None:
        """Write one image's features (V,C,h,w), cast to float16; then the done flag."""
        i = self._row(split, i)
        rel = feat_rel(split, step, block)
        if not self._exists(rel):
            raise StoreError(f"{self.path}: no arrays for t{step} b{block}; call ensure_pair first")
        arr = self._array(rel)
        feats = self._float16(f"features t{step} b{block}", split, i, feats)
        self._check_shape(f"features t{step} b{block}", split, feats, tuple(arr.shape[1:]))
        arr[i] = feats
        if self._exists(crc_rel(split, step, block)):
            self._array(crc_rel(split, step, block))[i] = checksum(feats)
        self._array(done_rel(split, step, block))[i] = True
        self._backend.commit()
