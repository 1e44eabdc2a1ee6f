"""The ``pipeline extract`` command line that rebuilds a store: how a store that lacks rows or pairs is
completed (``cache verify --repair``, a fit that asks for pairs the store lacks). Built here, above ``cache/``,
from what ``extract`` recorded in the store (``attrs["extract"]``, see ``extract.plan``) and what the store
itself shows, one option per :class:`ExtractConfig` field, as ``pipeline extract`` declares them."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from typing import Any

from cache.backends import dirname
from cache.store import FeatureStore
from extract.config import ExtractConfig
from common.devices import autocast_device

#: fields ``pipeline extract`` spells its own way (``pipeline.extract``): value → its flag (others: no flag)
_OWN_FLAGS = {"color_order": {"bgr": "--bgr"}}
#: fields ``pipeline extract`` has no option for (the Python API sets them)
_NO_FLAG = ("dataset_options",)
#: rendered even at their defaults, and last: which pairs, and where
_ALWAYS = ("steps", "blocks", "cache_dir")


def extract_command(store: FeatureStore, blocks: Sequence[int] | None = None,
                    steps: Sequence[int] | None = None) -> str:
    """The ``pipeline extract`` command that made ``store``, for ``blocks`` × ``steps`` (default: the pairs
    it holds): re-run, it adds those pairs and rewrites every row whose done flag is clear."""
    values = recipe(store, blocks, steps)
    order = sorted(dataclasses.fields(ExtractConfig), key=lambda f: f.name in _ALWAYS)
    words = [w for f in order if f.name in values and f.name not in _NO_FLAG for w in _option(f, values[f.name])]
    return " ".join(["pipeline extract", *words])


def recipe(store: FeatureStore, blocks: Sequence[int] | None, steps: Sequence[int] | None) -> dict[str, Any]:
    """The :class:`ExtractConfig` values that rebuild ``store``: what ``extract`` recorded, overridden by what
    the store shows (its key's compute dtype, its format, forward batch, folder and the splits it holds)."""
    made = dict(store.attrs.get("extract") or {})
    pairs = store.pairs()
    device = autocast_device(store.key.get("compute_dtype", "float32"))
    return {**made, "autocast": device is not None, "device": device, "store_format": store.format,
            "batch_size": store.attrs.get("forward_batch"), "splits": _splits(store, made),
            "steps": sorted({s for s, _ in pairs}) if steps is None else list(steps),
            "blocks": sorted({b for _, b in pairs}) if blocks is None else list(blocks),
            "cache_dir": dirname(store.path)}


def _splits(store: FeatureStore, made: dict[str, Any]) -> list[str] | None:
    """The splits a re-run must cover: those recorded (a store made before they were: unknown) and those the
    store holds rows of; None where that is all of them."""
    if "splits" in made and not made["splits"]:
        return None
    recorded, pairs = made.get("splits") or (), store.pairs()
    wanted = [s for s in store.splits() if s in recorded or store.done(s).any()
              or any(store.done(s, t, b).any() for t, b in pairs)]
    return None if wanted == store.splits() else wanted


def _option(f: dataclasses.Field, value: Any) -> list[str]:
    """The words of option ``f`` set to ``value``: none where the command's default gives the same."""
    value = tuple(value) if isinstance(value, list) else value
    default = None if f.default is dataclasses.MISSING else f.default
    if value is None or value is False or (value == default and f.name not in _ALWAYS):
        return []
    if f.name in _OWN_FLAGS:
        return [_OWN_FLAGS[f.name][value]]
    flag = "--" + f.name.replace("_", "-")
    if value is True:
        return [flag]
    return [flag, shlex.quote(",".join(map(str, value)) if isinstance(value, tuple) else str(value))]
