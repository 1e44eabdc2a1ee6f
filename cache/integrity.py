"""Whether a store's rows read back as they were written: the one row checker, above the store.

Writers record a CRC-32 per row and array between the data and its done flag (:func:`cache.checksums.checksum`);
:func:`check_rows` reads rows back and compares (:func:`cache.checksums.row_problem`). Stage two's loading refuses
the first damaged row it finds; ``verify_store`` (``cache/maintenance.py``) collects them all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cache.checksums import DamagedDataError, row_problem
from cache.schema import VIEW_TEXT_ARRAYS, feat_rel
from cache.store import FeatureStore


@dataclass(frozen=True)
class RowArray:
    """One array of a split as the checker sees it. ``loaded``: the rows to check, already in memory (in
    the order they are given to :func:`check_rows`); without it each row is read from the store."""

    label: str                         # how a problem names it: "mask", "t50 b4"
    rel: str                           # its path in the store
    recorded: np.ndarray               # (N,) CRC-32 per row at write time (0: none recorded)
    float_data: bool                   # NaN/Inf is damage (a lost chunk reads as NaN)
    pair: tuple[int, int] | None = None  # (step, block) of features; None for a base array
    loaded: np.ndarray | None = None


def base_arrays(store: FeatureStore, split: str, names: Sequence[str] | None = None,
                loaded: Mapping[str, np.ndarray] | None = None) -> list[RowArray]:
    """The base arrays ``names`` (default: all of the store's :attr:`~FeatureStore.base_names`) of ``split``;
    ``loaded``: those already in memory."""
    crc, loaded, order = store.checksums(split), loaded or {}, store.base_names
    return [RowArray(name, f"{split}/{name}", crc[:, order.index(name)], name == "tokens", None,
                     loaded.get(name)) for name in (order if names is None else names)]


def view_text_arrays(store: FeatureStore, split: str, loaded: Mapping[str, np.ndarray] | None = None
                     ) -> list[RowArray]:
    """The arrays of each view's text in ``split`` (none where its views have no text of their own); ``loaded``:
    those already in memory. They are base rows: ``done/base`` covers them."""
    if store.view_texts(split) is None:
        return []
    crc, loaded = store.checksums(split, view_text=True), loaded or {}
    return [RowArray(name, f"{split}/{name}", crc[:, k], name == "view_tokens", None, loaded.get(name))
            for k, name in enumerate(VIEW_TEXT_ARRAYS)]


def pair_array(store: FeatureStore, split: str, step: int, block: int,
               loaded: np.ndarray | None = None) -> RowArray:
    """The features of (``step``, ``block``) in ``split``."""
    return RowArray(f"t{step} b{block}", feat_rel(split, step, block), store.checksums(split, step, block),
                    True, (step, block), loaded)


@dataclass(frozen=True)
class RowCheck:
    """One row of one array, checked: ``problem`` is None when it reads back as written."""

    split: str
    row: int
    row_id: str
    array: RowArray
    problem: str | None

    @property
    def where(self) -> str:
        """``train/<id> mask``: the split, the image and the array."""
        return f"{self.split}/{self.row_id} {self.array.label}"

    @property
    def recorded(self) -> bool:
        """Whether a checksum was recorded for the row (rows written before checksums have none)."""
        return bool(self.array.recorded[self.row])


def check_rows(store: FeatureStore, split: str, arrays: Sequence[RowArray], rows: Sequence[int],
               progress: Callable[[], None] | None = None) -> Iterator[RowCheck]:
    """Check ``rows`` of ``split`` in every one of ``arrays``, row by row: each read back (or taken from
    ``loaded``) must decode, be finite where float, and match its recorded CRC-32. Yields every check;
    calls ``progress`` after each row."""
    ids = store.ids(split)
    for k, i in enumerate(rows):
        i = int(i)
        for a in arrays:
            try:
                value = a.loaded[k] if a.loaded is not None else store.read(a.rel, i)
                problem = row_problem(np.asarray(value), int(a.recorded[i]), a.float_data)
            except DamagedDataError as e:
                problem = e.reason
            yield RowCheck(split, i, ids[i], a, problem)
        if progress:
            progress()


def first_damaged(store: FeatureStore, split: str, arrays: Sequence[RowArray], rows: Sequence[int]
                  ) -> RowCheck | None:
    """The first row of :func:`check_rows` with a problem, or None when every row is sound."""
    return next((c for c in check_rows(store, split, arrays, rows) if c.problem), None)


def content_digest(store: FeatureStore, pairs: Sequence[tuple[int, int]] | None = None) -> str:
    """sha256 over the CRC-32s recorded for every row of every split (base arrays, view texts, the ``pairs``;
    default all), in the store's order: two stores with one digest hold the same bytes in those arrays (a
    rebuilt store is checked against the evidence of the runs fitted on its predecessor). A row not written
    yet, or written before checksums, is a ValueError: its content is unknown."""
    h = hashlib.sha256(store.key_hash.encode())
    for split in store.splits():
        crcs = [store.checksums(split)]
        if store.view_texts(split) is not None:
            crcs.append(store.checksums(split, view_text=True))
        crcs += [store.checksums(split, s, b) for s, b in sorted(store.pairs() if pairs is None else pairs)]
        for c in crcs:
            if not c.all():
                raise ValueError(f"{store.path}: split {split!r} has rows without a recorded checksum (not written "
                                 f"yet, or written before checksums): its content has no digest")
            h.update(np.ascontiguousarray(c, dtype="<u4").tobytes())
    return h.hexdigest()


#: how far two stores' sketches may differ and still hold the same content up to a CPU's rounding (relative to
#: the sampled values' norm): another CPU's kernels round ~0.1 % of float16 features one step differently, which
#: moves a projection by ~1e-5 of the norm; another image, UNet or noise moves it by 1e-2 and more
SKETCH_RTOL = 1e-3
_PROJECTIONS = 3


def _sketch(values: np.ndarray, seed: int) -> list[float]:
    """[norm, p1, p2, p3] of a flat float64 sample: its L2 norm and fixed ±1 projections (seeded per array)."""
    x = values.astype(np.float64).ravel()
    signs = np.random.default_rng(seed).integers(0, 2, size=(_PROJECTIONS, x.size), dtype=np.int8) * 2 - 1
    return [float(np.sqrt(x @ x)), *(float(s @ x) for s in signs)]


def content_sketch(store: FeatureStore, pairs: Sequence[tuple[int, int]] | None = None) -> dict[str, list[float]]:
    """A numeric summary of each array's view-0 rows (images, masks, tokens, each pair's features), per split:
    what :func:`sketches_agree` compares when two stores of one key have different digests (bit-identical
    rebuilds share a digest; a rebuild on another CPU rounds a few float16 features differently)."""
    out: dict[str, list[float]] = {}
    arrays = [("image", store.images), ("mask", store.masks), ("tokens", store.tokens)]
    for split in store.splits():
        named = [(name, get(split)) for name, get in arrays]
        named += [(f"t{s} b{b}", store.features(split, s, b))
                  for s, b in sorted(store.pairs() if pairs is None else pairs)]
        for k, (name, arr) in enumerate(named):
            rows = arr[:, 0] if name != "tokens" else arr
            out[f"{split}/{name}"] = _sketch(np.asarray(rows), seed=k)
    return out


def sketches_agree(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]],
                   rtol: float = SKETCH_RTOL) -> list[str]:
    """The arrays whose sketches differ by more than ``rtol`` of their norm (or that only one side has)."""
    differ = sorted(set(a) ^ set(b))
    for name in sorted(set(a) & set(b)):
        scale = max(abs(a[name][0]), abs(b[name][0]), 1e-12)
        if any(abs(x - y) > rtol * scale for x, y in zip(a[name], b[name], strict=True)):
            differ.append(name)
    return differ
