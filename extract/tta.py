"""Test-time augmentation's stage one: the 8 dihedral views of a split's images, as features in a store.

A store made with ``tta_views="d4"`` holds them for its val and test splits; for any other store they go into
its *TTA companion*: the store the same recipe makes with ``tta_views="d4"`` (its key differs only there), the
split's views extracted into it on first need and reused afterwards (resumably, like any extraction).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from cache.backends import dirname
from cache.key import key_hash, store_path
from cache.store import FeatureStore, StoreError
from extract.command import recipe
from extract.config import AUGMENTATIONS, ExtractConfig
from extract.run import run_extract
from extract.textviews import TEXT_VIEWS_VERSION

TTA_VIEWS = AUGMENTATIONS["d4"]


def holds_views(store: FeatureStore, split: str, pairs: Sequence[tuple[int, int]]) -> bool:
    """Whether ``store`` has every view of every image of ``split`` for ``pairs``."""
    if split not in store.splits() or store.layout(split).views != TTA_VIEWS:
        return False
    if not set(pairs) <= set(store.pairs()):
        return False
    return bool(store.done(split).all() and all(store.done(split, s, b).all() for s, b in pairs))


def tta_config(store: FeatureStore, split: str, blocks: Sequence[int], steps: Sequence[int]) -> ExtractConfig:
    """The extraction of ``store``'s recipe with the views of ``split`` (``blocks`` × ``steps`` only), on the
    device type that made ``store``."""
    values = recipe(store, blocks, steps)
    names = {f.name for f in dataclasses.fields(ExtractConfig)}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names}
    device = store.attrs.get("device_type") or values.get("device")
    return ExtractConfig(**{**values, "tta_views": "d4", "splits": (split,), "device": device})


def companion_key(key: dict[str, Any]) -> dict[str, Any]:
    """The key of a store's TTA companion: the same, with the val / test views (and their texts) added."""
    prep = {**key["preprocessing"], "tta_views": "d4", "view_text": TEXT_VIEWS_VERSION}
    return {**key, "preprocessing": prep}


def companion_path(store: FeatureStore) -> Path | str:
    """Where ``store``'s TTA companion lives: beside it, named by its key (nothing is read but ``store``'s key)."""
    return store_path(dirname(store.path), store.key["dataset"]["name"], companion_key(store.key), store.format)


def tta_store(store: FeatureStore, split: str, blocks: Sequence[int], steps: Sequence[int],
              console: Console | None = None) -> FeatureStore:
    """A store holding the 8 views of ``split`` for ``blocks`` × ``steps``: ``store`` itself when it does, else its
    TTA companion when that does (opened, nothing loaded), else the companion extracted where it lacks them, with
    the UNet and text encoder ``store`` records."""
    pairs = [(s, b) for s in steps for b in blocks]
    if holds_views(store, split, pairs):
        return store
    with contextlib.suppress(StoreError, OSError, FileNotFoundError):
        companion = FeatureStore.open(companion_path(store))
        if companion.key_hash == key_hash(companion_key(store.key)) and holds_views(companion, split, pairs):
            return companion
    path = run_extract(tta_config(store, split, blocks, steps), console=console or Console(stderr=True))
    return FeatureStore.open(path)
