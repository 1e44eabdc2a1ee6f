"""The synthetic set: a seeded generator whose text is necessary to segment its images.

Identical discs lie in all four regions (the triangles cut by the diagonals: top, right, bottom,
left) and only those in the regions the text names are in the mask. Each region has a fixed background
tint (its landmark), so a model without positional encoding can still tell the regions apart.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from extract.datasets.core import DEFAULT_BLOCKS, SPLITS, DatasetError, Item
from extract.datasets.dataset import Dataset
from extract.datasets.registry import register

SYNTHETIC_VERSION = 2
REGIONS = ("top", "right", "bottom", "left")  # the four triangles cut by the image's diagonals
_TINTS = np.array([[176, 92, 84], [84, 160, 96], [88, 104, 180], [172, 156, 72]], dtype=np.float32)
OBJECT_RGB = (236, 236, 236)  # every disc, in every region, exactly this colour
_BACKGROUND_MAX = 215         # background clipped below the object colour
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve")
_TEMPLATES = ("{Count} {lesions} in the {regions} {region}.",
              "There {be} {count} {lesions} in the {regions} {region}.",
              "{Lesions} seen in the {regions} {region}.")
DEFAULT_COUNTS = {"train": 32, "val": 8, "test": 16}


def region_map(size: int) -> np.ndarray:
    """int (size, size): index into REGIONS of each pixel (top, right, bottom, left triangles)."""
    c = (size - 1) / 2
    dy, dx = np.mgrid[:size, :size] - c
    vertical = np.abs(dy) >= np.abs(dx)
    return np.where(vertical, np.where(dy < 0, 0, 2), np.where(dx > 0, 1, 3))


@dataclass(frozen=True)
class SyntheticSample:
    """One generated image: ``mask`` = the discs of the ``named`` regions; ``objects`` = all discs."""

    image: np.ndarray    # uint8 (H, W, 3)
    mask: np.ndarray     # uint8 (H, W) {0, 1}
    objects: np.ndarray  # uint8 (H, W): 0 background, q + 1 for a disc in region q (index into REGIONS)
    named: tuple[str, ...]
    text: str


def _synthetic_text(rng: np.random.Generator, named: Sequence[str], count: int) -> str:
    regions = named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1]
    words = {"count": _NUMBERS[count], "Count": _NUMBERS[count].capitalize(),
             "lesions": "lesion" if count == 1 else "lesions", "Lesions": "Lesion" if count == 1 else "Lesions",
             "be": "is" if count == 1 else "are", "regions": regions,
             "region": "region" if len(named) == 1 else "regions"}
    return _TEMPLATES[int(rng.integers(len(_TEMPLATES)))].format(**words)


@functools.lru_cache(maxsize=64)
def synthetic_sample(seed: int, split: str, index: int, native_size: int = 128) -> SyntheticSample:
    """Image ``index`` of ``split``, a pure function of its arguments (arrays are read-only).

    Four regions, the triangles cut by the diagonals (top, right, bottom, left), each a fixed tint
    (± a per-image brightness shift and pixel noise) — the landmark that tells regions apart; every
    region holds 1-3 discs of radius 5-8 px (at 128 px, scaled with ``native_size``) in ``OBJECT_RGB``,
    well inside it; 1-3 regions are named, and the mask is the discs in those.
    """
    if split not in SPLITS:
        raise DatasetError(f"synthetic: unknown split {split!r} (expected one of {SPLITS})")
    if native_size < 32 or native_size % 2:
        raise DatasetError(f"synthetic: native_size must be even and >= 32, got {native_size}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    s, scale = native_size, native_size / 128
    regions = region_map(s)
    background = _TINTS[regions] + rng.uniform(-12, 12) + rng.normal(0, 6, (s, s, 3))
    image = np.clip(np.rint(background), 0, _BACKGROUND_MAX).astype(np.uint8)

    k = int(rng.integers(1, 4))
    named_q = sorted(int(q) for q in rng.choice(4, size=k, replace=False))
    objects = np.zeros((s, s), np.uint8)
    n_discs = [0, 0, 0, 0]
    yy, xx = np.mgrid[:s, :s]
    c = (s - 1) / 2
    margin, gap = max(2.0, 3 * scale), 3 * scale
    for q in range(4):
        discs: list[tuple[float, float, float]] = []
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(200):
                r = rng.uniform(5, 8) * scale
                cy, cx = rng.uniform(margin + r, s - 1 - margin - r, size=2)
                dy, dx = cy - c, cx - c
                inside = region_map_at(dy, dx) == q and (abs(abs(dy) - abs(dx)) / np.sqrt(2) >= r + margin)
                if inside and all((cy - y) ** 2 + (cx - x) ** 2 >= (r + rr + gap) ** 2 for y, x, rr in discs):
                    discs.append((cy, cx, r))
                    break
        for cy, cx, r in discs:
            objects[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = q + 1
        n_discs[q] = len(discs)
    image[objects > 0] = OBJECT_RGB
    mask = np.isin(objects, [q + 1 for q in named_q]).astype(np.uint8)
    count = sum(n_discs[q] for q in named_q)
    named = tuple(REGIONS[q] for q in named_q)
    for a in (image, mask, objects):
        a.setflags(write=False)
    return SyntheticSample(image, mask, objects, named, _synthetic_text(rng, named, count))


def region_map_at(dy: float, dx: float) -> int:
    """The region of one point given its offset from the image centre (as :func:`region_map`)."""
    if abs(dy) >= abs(dx):
        return 0 if dy < 0 else 2
    return 1 if dx > 0 else 3


@dataclass(frozen=True)
class SyntheticSpec:
    """The generator behind a synthetic :class:`Dataset`: item ``<split>-<index>`` is ``synthetic_sample``."""

    seed: int
    native_size: int

    def sample(self, item: Item) -> SyntheticSample:
        return synthetic_sample(self.seed, item.split, int(item.id.rsplit("-", 1)[1]), self.native_size)

    def identity(self) -> dict[str, Any]:
        return {"generator_version": SYNTHETIC_VERSION, "seed": self.seed, "native_size": self.native_size}


@register("synthetic", options=("seed", "counts", "native_size"))
def open_synthetic(root: Path | None, wanted: list[str] | None, skip_bad: bool = False, *, seed: int = 0,
                   counts: Mapping[str, int] | None = None, native_size: int = 128) -> Dataset:
    """The synthetic set (no root folder): ``counts`` images per split (default ``DEFAULT_COUNTS``)."""
    if root is not None:
        raise DatasetError(f"synthetic: takes no root folder (got {root})")
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    bad = {k: v for k, v in counts.items() if k not in SPLITS or not isinstance(v, int) or v < 0}
    if bad or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"synthetic: counts must map train/val/test to ints >= 0 and seed be an int >= 0 "
                           f"(got counts={counts}, seed={seed!r})")
    counts = {s: counts[s] for s in SPLITS if s in counts and (wanted is None or s in wanted)}
    spec = SyntheticSpec(seed, native_size)
    items = [Item(f"{s}-{i:04d}", s, synthetic_sample(seed, s, i, native_size).text, None, None)
             for s, n in counts.items() for i in range(n)]
    return Dataset("synthetic", None, items, DEFAULT_BLOCKS["synthetic"], [], "", [], spec)
