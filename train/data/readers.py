"""Stage two's view of the cache: which features, which images, in memory or streamed.

Nothing here loads the UNet or a text encoder: everything comes from a :class:`cache.store.FeatureStore`.
A model reads a split through one of two readers with one interface (:class:`SplitData`: rows → a
sample): :class:`SplitFeatures` (cached features + text tokens, a :class:`Sample`) or
:class:`SplitImages` (the store's images, an :class:`ImageSample`); each model's registry entry names its
reader (:attr:`train.registry.ModelSpec.reader`).
Per scale (one block), the chosen steps are concatenated on channels in ascending order, so a
block with C channels gives a (len(steps)·C, h, w) map, as in the authors' code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cache.checksums import DamagedDataError
from cache.integrity import base_arrays, first_damaged, pair_array, view_text_arrays
from cache.store import FeatureStore
from extract.command import extract_command
from extract.shared import to_unit_range
from train.config import MEMORY_BUDGET_GB

#: few-shot protocol of the paper: training images per dataset (others: all)
PAPER_TRAIN_COUNT = {"monuseg": 5, "qata": 150}
GIB = 1 << 30
MEMORY_BUDGET = MEMORY_BUDGET_GB * GIB  # bytes: FitConfig's default


class MissingFeaturesError(ValueError):
    """A fit asks for blocks or steps that the store does not hold."""


def choose_subset(n_total: int, count: int | None, seed: int) -> np.ndarray:
    """Sorted indices of ``count`` images drawn from ``n_total`` with ``seed`` (all if count is None).

    The one definition of a few-shot subset: ``fit`` and ``baseline`` draw the same ids for a seed.
    """
    if count is None or count >= n_total:
        return np.arange(n_total)
    if count < 1:
        raise ValueError(f"train_count must be >= 1, got {count}")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=count, replace=False))


def resolve_selection(store: FeatureStore, blocks: Sequence[int] | None, steps: Sequence[int] | None
                      ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Blocks and steps to use (default: all the store has); refuse any the store lacks."""
    pairs = store.pairs()
    have_blocks = sorted({b for _, b in pairs})
    have_steps = sorted({s for s, _ in pairs})
    blocks = tuple(sorted(blocks)) if blocks else tuple(have_blocks)
    steps = tuple(sorted(steps)) if steps else tuple(have_steps)
    missing = store.missing(blocks, steps)
    if missing:
        raise MissingFeaturesError(
            f"store {store.path} lacks (step, block) {missing} (it has steps {have_steps} × blocks "
            f"{have_blocks}); add them with:\n  {extract_command(store, blocks, steps)}")
    return blocks, steps


def visible_tokens(token_mask: np.ndarray, attend_padding: bool) -> np.ndarray:
    """The token mask a model attends with: every token with ``attend_padding`` (the authors' code),
    else the real ones. Applied wherever tokens are read (the store's, a new image's)."""
    return np.ones_like(token_mask) if attend_padding else token_mask


@dataclass(frozen=True)
class Reading:
    """What a run reads from a store: its blocks × steps, padding attention, the memory budget, and whether a
    view gets its own text's tokens (``view_tokens``; in splits whose views have their own text) or the image's."""

    blocks: tuple[int, ...] = ()
    steps: tuple[int, ...] = ()
    attend_padding: bool = False
    memory_budget: float = MEMORY_BUDGET
    view_tokens: bool = False
    mask_resize: str | None = None  # the masks it trains and scores on; None: the store's first (a run before them)


@dataclass
class Sample:
    """One image (one view) as the TextDiff head takes it, batch dimension included."""

    feats: list[torch.Tensor]    # per block (B, len(steps)·C, h, w) float32 (float16 before .to(device))
    tokens: torch.Tensor         # (B, L, D) float32
    token_mask: torch.Tensor     # (B, L) bool
    target: torch.Tensor         # (B, S, S) int64 in {0, 1}

    def inputs(self) -> dict[str, Any]:
        """The model's keyword arguments."""
        return {"feats": self.feats, "tokens": self.tokens, "token_mask": self.token_mask}

    def withhold_text(self, withheld: torch.Tensor | None = None) -> Sample:
        """The same sample with every token of the rows ``withheld`` ((B,) bool; None: all rows) masked out:
        the head reads no text there (cross-attention adds nothing, concat's mean is zero). The one way
        text is withheld: ``evaluate --text none`` and ``fit --text-dropout``."""
        if withheld is None:
            keep = torch.zeros_like(self.token_mask)
        else:
            keep = self.token_mask & ~withheld.to(self.token_mask.device, torch.bool)[:, None]
        return Sample(self.feats, self.tokens, keep, self.target)

    def to(self, device: torch.device, non_blocking: bool = False) -> Sample:
        """The inputs on ``device``, features as float32 (converted there: float16 ones travel as float16); the
        target stays where it is."""
        return Sample([f.to(device, non_blocking=non_blocking).float() for f in self.feats],
                      self.tokens.to(device, non_blocking=non_blocking),
                      self.token_mask.to(device, non_blocking=non_blocking), self.target)

    def pin(self) -> Sample:
        """A copy in page-locked memory, so that copies to a GPU need not block."""
        return Sample([f.pin_memory() for f in self.feats], self.tokens.pin_memory(), self.token_mask.pin_memory(),
                      self.target.pin_memory())

    def part(self, start: int, stop: int) -> Sample:
        """Its images ``start:stop``."""
        return Sample([f[start:stop] for f in self.feats], self.tokens[start:stop], self.token_mask[start:stop],
                      self.target[start:stop])


@dataclass
class ImageSample:
    """One image (one view) as a model on the images takes it, batch dimension included."""

    image: torch.Tensor          # (B, 3, S, S) float32 in [-1, 1]
    target: torch.Tensor         # (B, S, S) int64 in {0, 1}

    def inputs(self) -> dict[str, Any]:
        """The model's keyword arguments."""
        return {"image": self.image}

    def to(self, device: torch.device, non_blocking: bool = False) -> ImageSample:
        """The inputs on ``device`` (the target stays where it is)."""
        return ImageSample(self.image.to(device, non_blocking=non_blocking), self.target)

    def pin(self) -> ImageSample:
        """A copy in page-locked memory, so that copies to a GPU need not block."""
        return ImageSample(self.image.pin_memory(), self.target.pin_memory())

    def part(self, start: int, stop: int) -> ImageSample:
        """Its images ``start:stop``."""
        return ImageSample(self.image[start:stop], self.target[start:stop])


class SplitData(Protocol):
    """The selected rows of one split, as a model reads them."""

    ids: list[str]
    texts: list[str]
    view_texts: list[list[str]] | None
    indices: np.ndarray
    views: int
    in_memory: bool

    def __len__(self) -> int: ...

    def batch(self, rows: Sequence[int], views: Sequence[int] | None = None,
              half: bool = False) -> Sample | ImageSample: ...

    def describe(self) -> str: ...


class SplitRows:
    """The selected rows of one split, what every reader shares: ids, texts (and each view's, ``view_texts``,
    where views have their own), masks, tokens, the in-memory choice and the row checks. The rows are held in
    memory when they fit ``memory_budget`` bytes (with what the subclass reads, :meth:`_arrays`), else read from
    the store on demand (one chunk per row and array). ``attend_padding`` marks every token valid, as the
    authors' code does. ``mask_resize``: the masks read (nearest or authors; None: the store's first, which is
    the only one a store before format 3 holds)."""

    def __init__(self, store: FeatureStore, split: str, indices: Sequence[int] | None = None,
                 memory_budget: float = MEMORY_BUDGET, attend_padding: bool = False, mask_resize: str | None = None):
        if split not in store.splits():
            raise ValueError(f"store {store.path} has no split {split!r} (it has {store.splits()})")
        self.store, self.split = store, split
        n = len(store.ids(split))
        self.indices = np.arange(n) if indices is None else np.asarray(indices, dtype=int)
        complete = set(store.complete_indices(split, self._pairs()).tolist())
        absent = [store.ids(split)[i] for i in self.indices if i not in complete]
        if absent:
            raise MissingFeaturesError(f"store {store.path}: {len(absent)} {split} image(s) not extracted yet "
                                       f"(e.g. {absent[:3]}); run the same `pipeline extract` again to finish")
        self.ids = [store.ids(split)[i] for i in self.indices]
        self.texts = [store.texts(split)[i] for i in self.indices]
        view_texts = store.view_texts(split)
        self.view_texts = None if view_texts is None else [view_texts[i] for i in self.indices]
        self.views = store.layout(split).views
        self.mask_resize = mask_resize or store.mask_resizes[0]
        self._mask_array = store.mask_array(self.mask_resize)
        self._data = {**self._arrays(), "tokens": store.tokens(split), "mask": store.masks(split, self.mask_resize)}
        self._token_mask = store.token_mask(split)[self.indices]
        if "view_tokens" in self._data:  # (rows, V, L): each view's own text's token mask
            self._view_token_mask = store.view_token_mask(split)[self.indices]
        self.nbytes = sum(int(np.prod(a.shape[1:])) * a.dtype.itemsize * len(self.indices)
                          for a in self._data.values())
        self.in_memory = self.nbytes <= memory_budget
        if self.in_memory:
            try:
                self._data = {k: a[self.indices].compute() for k, a in self._data.items()}
            except Exception:  # noqa: BLE001 - a chunk that does not decode: name its row (below) instead
                self.in_memory = False
                self._check_rows()
                raise
        self._check_rows()
        self.attend_padding = attend_padding
        self._token_mask = visible_tokens(self._token_mask, attend_padding)
        if "view_tokens" in self._data:
            self._view_token_mask = visible_tokens(self._view_token_mask, attend_padding)

    def _pairs(self) -> list[tuple[int, int]]:
        """The (step, block) feature pairs every selected row must have."""
        return []

    def _arrays(self) -> dict[Any, Any]:
        """What this reader reads besides masks and tokens, by name: (N, views, ...) arrays of the split
        (``view_tokens``: each view's text's tokens, with their mask)."""
        return {}

    def _check_rows(self) -> None:
        """Every selected row reads back as written (finite, its recorded CRC-32), or a
        :class:`DamagedDataError` names it and the repair: a store damaged after it was written is refused,
        never learned from. Rows held in memory (numpy) are checked as loaded; streamed ones are read once."""
        store, split = self.store, self.split
        loaded = {k: v for k, v in self._data.items() if isinstance(v, np.ndarray)}
        names = [self._mask_array, "tokens", "token_mask", *(["image"] if "image" in self._data else [])]
        loaded = {**loaded, self._mask_array: loaded.get("mask"), "token_mask": self._token_mask}
        arrays = base_arrays(store, split, names, loaded)
        if "view_tokens" in self._data:
            arrays += view_text_arrays(store, split, {**loaded, "view_token_mask": self._view_token_mask})
        arrays += [pair_array(store, split, s, b, loaded.get((s, b))) for s, b in self._pairs()]
        damaged = first_damaged(store, split, arrays, self.indices)
        if damaged:
            raise DamagedDataError(
                f"{store.path}: {damaged.where}: {damaged.problem}; the store was damaged after it was written: "
                f"`pipeline cache verify --repair {store.path}` marks every damaged row, then the store's "
                f"`pipeline extract` rewrites them", damaged.problem)

    def __len__(self) -> int:
        return len(self.indices)

    def _row(self, name: Any, k: int, view: int | None = None) -> np.ndarray:
        arr = self._data[name]
        if self.in_memory:
            out = arr[k] if view is None else arr[k, view]
        else:
            i = int(self.indices[k])
            out = (arr[i] if view is None else arr[i, view]).compute()
        return np.asarray(out)

    def targets(self, rows: Sequence[int], views: Sequence[int]) -> torch.Tensor:
        """(B, S, S) int64 masks of ``rows`` at ``views``."""
        return torch.from_numpy(np.stack([self._row("mask", k, v) for k, v in zip(rows, views)])).long()


class SplitFeatures(SplitRows):
    """The selected rows of one split as the TextDiff head reads them: the cached features of ``blocks`` ×
    ``steps`` and the text tokens (:class:`SplitRows` for memory, streaming and the row checks). With
    ``view_tokens``, in a split whose views have their own text, a view gets its own text's tokens; else every
    view gets the image's."""

    def __init__(self, store: FeatureStore, split: str, blocks: Sequence[int], steps: Sequence[int],
                 indices: Sequence[int] | None = None, memory_budget: float = MEMORY_BUDGET,
                 attend_padding: bool = False, view_tokens: bool = False, mask_resize: str | None = None):
        self.blocks, self.steps = tuple(blocks), tuple(steps)
        self.view_tokens = view_tokens and store.view_texts(split) is not None
        self._tokens: np.ndarray | None = None  # replace_text's tokens, else the store's
        super().__init__(store, split, indices, memory_budget, attend_padding, mask_resize)

    def _pairs(self) -> list[tuple[int, int]]:
        return [(s, b) for s in self.steps for b in self.blocks]

    def _arrays(self) -> dict[Any, Any]:
        feats = {(s, b): self.store.features(self.split, s, b) for s, b in self._pairs()}
        return {**feats, "view_tokens": self.store.view_tokens(self.split)} if self.view_tokens else feats

    @classmethod
    def open(cls, store: FeatureStore, split: str, reading: Reading, indices: Sequence[int] | None = None
             ) -> SplitFeatures:
        """The rows ``indices`` of ``split`` (default all) as ``reading`` reads them."""
        return cls(store, split, reading.blocks, reading.steps, indices, reading.memory_budget,
                   reading.attend_padding, view_tokens=reading.view_tokens, mask_resize=reading.mask_resize)

    @staticmethod
    def select(store: FeatureStore, blocks: Sequence[int] | None, steps: Sequence[int] | None
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The blocks and steps a fit reads (:func:`resolve_selection`)."""
        return resolve_selection(store, blocks, steps)

    def describe(self) -> str:
        """What is read, for a fit's first line."""
        return f"blocks {list(self.blocks)} × steps {list(self.steps)}"

    def batch(self, rows: Sequence[int], views: Sequence[int] | None = None, half: bool = False) -> Sample:
        """Rows ``rows`` (positions in this selection), each at its view (default 0); with ``half`` the features
        stay float16 as stored (half the bytes to a GPU; :meth:`Sample.to` converts them there)."""
        views = list(views) if views is not None else [0] * len(rows)
        if self.view_tokens and self._tokens is None:
            tokens = torch.from_numpy(np.stack([self._row("view_tokens", k, v) for k, v in zip(rows, views)])).float()
            token_mask = torch.from_numpy(self._view_token_mask[list(rows), views])
        else:
            tokens = torch.from_numpy(np.stack([self._token_row(k) for k in rows])).float()
            token_mask = torch.from_numpy(self._token_mask[list(rows)])
        feats = self.features(rows, views)
        return Sample(feats if half else [f.float() for f in feats], tokens, token_mask, self.targets(rows, views))

    def _token_row(self, k: int) -> np.ndarray:
        return self._row("tokens", k) if self._tokens is None else self._tokens[k]

    def text_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Every selected row's tokens (N, L, D), as stored, and the token mask the model attends with (N, L)."""
        return np.stack([self._token_row(k) for k in range(len(self))]), self._token_mask.copy()

    def replace_text(self, tokens: np.ndarray, token_mask: np.ndarray, texts: Sequence[str]) -> None:
        """From now on row k reads ``texts[k]``: its tokens ``tokens[k]`` ((N, L, D), the store's L and D) and
        the mask of its real tokens ``token_mask[k]`` (attended as the run attends,
        :func:`visible_tokens`), at every view; the features and masks stay the store's (``evaluate --text``)."""
        want = (len(self), *self._token_mask.shape[1:])
        if tokens.shape[:2] != want or token_mask.shape != want or len(texts) != len(self):
            raise ValueError(f"replace_text: {len(self)} rows of {want[1]} tokens expected, got tokens "
                             f"{tokens.shape}, token_mask {token_mask.shape}, {len(texts)} texts")
        self._tokens = np.asarray(tokens)
        self._token_mask = visible_tokens(np.asarray(token_mask, dtype=bool), self.attend_padding)
        self.texts = list(texts)

    def features(self, rows: Sequence[int], views: Sequence[int]) -> list[torch.Tensor]:
        """Per block, (B, len(steps)·C, h, w) as stored (float16): the steps concatenated on channels."""
        feats = []
        for b in self.blocks:
            per_row = [np.concatenate([self._row((s, b), k, v) for s in self.steps], axis=0)
                       for k, v in zip(rows, views)]
            feats.append(torch.from_numpy(np.stack(per_row)))
        return feats

    def channels(self) -> list[int]:
        """Input channels per scale: len(steps) × the block's channels."""
        return [len(self.steps) * int(self._data[(self.steps[0], b)].shape[2]) for b in self.blocks]


class SplitImages(SplitRows):
    """The selected rows of a split as a model on the images reads them: the store's images (every cached
    view) and masks (:class:`SplitRows` for memory, streaming and the row checks)."""

    def __init__(self, store: FeatureStore, split: str, indices: Sequence[int] | None = None,
                 memory_budget: float = MEMORY_BUDGET, mask_resize: str | None = None):
        super().__init__(store, split, indices, memory_budget, mask_resize=mask_resize)

    def _arrays(self) -> dict[Any, Any]:
        return {"image": self.store.images(self.split)}

    @classmethod
    def open(cls, store: FeatureStore, split: str, reading: Reading, indices: Sequence[int] | None = None
             ) -> SplitImages:
        """The rows ``indices`` of ``split`` (default all); of ``reading`` only the memory budget and the masks
        count."""
        return cls(store, split, indices, reading.memory_budget, reading.mask_resize)

    @staticmethod
    def select(store: FeatureStore, blocks: Sequence[int] | None, steps: Sequence[int] | None
               ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """No blocks or steps: the images are read."""
        return (), ()

    def describe(self) -> str:
        """What is read, for a fit's first line."""
        return "images"

    def batch(self, rows: Sequence[int], views: Sequence[int] | None = None, half: bool = False) -> ImageSample:
        """Rows ``rows`` (positions in this selection), each at its view (default 0), in [-1, 1] float32
        (``half`` is :class:`SplitFeatures`'; the images are small)."""
        views = list(views) if views is not None else [0] * len(rows)
        image = to_unit_range(np.stack([self._row("image", k, v) for k, v in zip(rows, views)]))
        return ImageSample(torch.from_numpy(image), self.targets(rows, views))

