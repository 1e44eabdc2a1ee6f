"""What a feature store is made of: its arrays' names, paths and specs, and its splits' layout.

Layout (per split group ``<split>``; N images, V views, S size, L tokens, D token dim)::

    <split>/image               (N, V, 3, S, S) uint8    chunk (1, 1, 3, S, S)
    <split>/mask                (N, V, S, S)    uint8    chunk (1, 1, S, S)   resized nearest
    <split>/mask_authors        (N, V, S, S)    uint8    chunk (1, 1, S, S)   resized as the authors' cv2.resize
    <split>/tokens              (N, L, D)       float16  chunk (1, L, D)
    <split>/token_mask          (N, L)          bool     chunk (1, L)
    <split>/feat/t{step}/b{block}  (N, V, C, h, w) float16  chunk (1, 1, C, h, w)
    <split>/done/base           (N,) bool chunk (1,)   image, mask and tokens of row i written
    <split>/done/t{step}_b{block}  (N,) bool chunk (1,)   features of row i written
    <split>/crc/base            (N, 5) uint32   CRC-32 of row i's image, mask, tokens, token_mask, mask_authors
    <split>/crc/t{step}_b{block}   (N,) uint32     CRC-32 of row i's float16 features (0: not recorded)

A split whose views keep their own text (``extract --augment d4``; ``SplitLayout.view_texts``) also has,
written with the base arrays and covered by ``done/base``::

    <split>/view_tokens         (N, V, L, D)    float16  chunk (1, V, L, D)   each view's text's tokens
    <split>/view_token_mask     (N, V, L)       bool     chunk (1, V, L)
    <split>/crc/view_text       (N, 2) uint32   CRC-32 of row i's view_tokens, view_token_mask

Ids, texts, views and each view's text live in the split group's attributes; the key and store facts in
the root group's. Every chunk holds one image, so that writers of different images never touch the same file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import metadata

import numpy as np

from cache.backends import Location, Spec
from cache.key import FORMAT_VERSION, key_hash

MARKER = "feature-store"  # the root attribute ``textdiff`` of every store
#: per row, beside the features; their CRCs in this order (stores before format 3: the first four)
BASE_ARRAYS = ("image", "mask", "tokens", "token_mask", "mask_authors")
#: the array of the masks under each resizing (``extract.datasets.resize_mask``); format 3 keeps both
MASK_ARRAYS = {"nearest": "mask", "authors": "mask_authors"}
#: the mask resizings (``extract.datasets.resize_mask``; what ``FitConfig.mask_resize`` takes)
MASK_RESIZES = tuple(MASK_ARRAYS)
VIEW_TEXT_ARRAYS = ("view_tokens", "view_token_mask")   # per row of a split with view texts; CRCs in this order
VIEW_TEXT_CRC = "crc/view_text"
TOKEN_ROWS_PER_DASK_CHUNK = 256


class StoreError(RuntimeError):
    """A feature store is missing, foreign, inconsistent, or used wrongly; the message names the path."""


@dataclass
class SplitLayout:
    """Rows of one split: ids and texts in order, and views per image (1, or 8 for d4-augmented train).
    ``view_texts``: each row's text for each view (``extract.textviews``), or None: every view has the
    row's text (splits with one view, and stores made before views kept their own text)."""

    ids: list[str]
    texts: list[str]
    views: int
    view_texts: list[list[str]] | None = None


def pair_name(step: int, block: int) -> str:
    """A (step, block) pair's name in flag and checksum paths and listings: ``t50_b6``."""
    return f"t{step}_b{block}"


def numbered(names: list[str], prefix: str) -> list[tuple[int, str]]:
    """(number, name) for names ``<prefix><digits>`` (``t50``, ``b4``); anything else (temp files) is ignored."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    return [(int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name))]


def feat_rel(split: str, step: int, block: int) -> str:
    """Where a (step, block)'s features live in a store (``FeatureStore.read`` takes it)."""
    return f"{split}/feat/t{step}/b{block}"


def done_rel(split: str, step: int | None = None, block: int | None = None) -> str:
    """Where the done flags live: the base arrays' (no step and block) or a pair's features'."""
    if (step is None) != (block is None):
        raise ValueError("give both step and block, or neither (the base flags)")
    return f"{split}/done/base" if step is None else f"{split}/done/{pair_name(step, block)}"


def crc_rel(split: str, step: int | None = None, block: int | None = None) -> str:
    """Where the CRC-32s recorded at write time live: (N, 4) for the base arrays, (N,) for a pair."""
    return f"{split}/crc/base" if step is None else f"{split}/crc/{pair_name(step, block)}"


def base_names(version: int) -> tuple[str, ...]:
    """The base arrays of a store of format ``version`` (before 3: one mask, resized as its key says)."""
    return BASE_ARRAYS if version >= 3 else BASE_ARRAYS[:4]


def split_rels(split: str, pairs: list[tuple[int, int]], version: int = FORMAT_VERSION) -> list[str]:
    """A split's data and flag arrays: the base arrays and their flags, then each pair's features and flags."""
    rels = [f"{split}/{name}" for name in base_names(version)] + [done_rel(split)]
    for step, block in pairs:
        rels += [feat_rel(split, step, block), done_rel(split, step, block)]
    return rels


def base_specs(n: int, v: int, size: int, token_len: int, token_dim: int) -> dict[str, Spec]:
    """The arrays of a split made with the store (relative to the split group)."""
    return {
        "image": Spec((n, v, 3, size, size), (1, 1, 3, size, size), "uint8", 0, "noshuffle",
                       ("image", "view", "channel", "y", "x")),
        **{name: Spec((n, v, size, size), (1, 1, size, size), "uint8", 0, "bitshuffle", ("image", "view", "y", "x"))
           for name in MASK_ARRAYS.values()},
        "tokens": Spec((n, token_len, token_dim), (1, token_len, token_dim), "float16", float("nan"),
                        "shuffle", ("image", "token", "feature")),
        "token_mask": Spec((n, token_len), (1, token_len), "bool", False, None, ("image", "token")),
        "done/base": done_spec(n),
        "crc/base": Spec((n, len(BASE_ARRAYS)), (1, len(BASE_ARRAYS)), "uint32", 0, None, ("image", "array")),
    }


def view_text_specs(n: int, v: int, token_len: int, token_dim: int) -> dict[str, Spec]:
    """The arrays of a split whose views keep their own text (relative to the split group)."""
    return {
        "view_tokens": Spec((n, v, token_len, token_dim), (1, v, token_len, token_dim), "float16", float("nan"),
                            "shuffle", ("image", "view", "token", "feature")),
        "view_token_mask": Spec((n, v, token_len), (1, v, token_len), "bool", False, None, ("image", "view", "token")),
        VIEW_TEXT_CRC: Spec((n, len(VIEW_TEXT_ARRAYS)), (1, len(VIEW_TEXT_ARRAYS)), "uint32", 0, None,
                            ("image", "array")),
    }


def feat_spec(n: int, v: int, channels: int, hw: tuple[int, int]) -> Spec:
    """A (step, block)'s features: float16, one image × view per chunk."""
    h, w = hw
    # bitshuffle + lz4-9: on float16 activations 5x faster to compress and 2x faster to decode than
    # zstd-3 for 1 % more bytes (bench/cache.py); older stores (zstd, byte shuffle) read the same: the codec
    # is in each array's metadata
    return Spec((n, v, channels, h, w), (1, 1, channels, h, w), "float16", float("nan"), "bitshuffle",
                 ("image", "view", "channel", "y", "x"), cname="lz4", clevel=9)


def done_spec(n: int) -> Spec:
    """Done flags: never written False, so that a zarr chunk exists exactly when its flag is set."""
    return Spec((n,), (1,), "bool", False, None, ("image",))


def crc_spec(n: int) -> Spec:
    """A pair's CRC-32 per row (0: not recorded)."""
    return Spec((n,), (1,), "uint32", 0, None, ("image",))


def validate_layout(path: Location, splits: dict[str, SplitLayout], sizes: dict[str, int]) -> None:
    """Refuse a layout no store can hold (a :class:`StoreError` naming ``path``)."""
    if not splits:
        raise StoreError(f"{path}: a store needs at least one split")
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise StoreError(f"{path}: {name} must be a positive int, got {value!r}")
    for name, lay in splits.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise StoreError(f"{path}: split name {name!r} is not a plain name")
        if len(lay.ids) != len(lay.texts):
            raise StoreError(f"{path}: split {name!r} has {len(lay.ids)} ids but {len(lay.texts)} texts")
        if len(set(lay.ids)) != len(lay.ids):
            raise StoreError(f"{path}: split {name!r} has duplicate ids")
        if lay.views < 1:
            raise StoreError(f"{path}: split {name!r} has views={lay.views}; need at least 1")
        if lay.view_texts is not None and (len(lay.view_texts) != len(lay.ids)
                                           or any(len(t) != lay.views for t in lay.view_texts)):
            raise StoreError(f"{path}: split {name!r} needs {lay.views} view texts for each of its "
                             f"{len(lay.ids)} rows")


def _textdiff_version() -> str:
    try:
        return metadata.version("textdiff")
    except metadata.PackageNotFoundError:
        return "unknown"


def root_attrs(key: dict, size: int, splits: dict[str, SplitLayout], token_len: int, token_dim: int) -> dict:
    """The root attributes a new store sets itself: marker, key and its hash, versions, sizes, split names."""
    return {"textdiff": MARKER, "key": key, "key_hash": key_hash(key), "format_version": FORMAT_VERSION,
            "size": int(size), "textdiff_version": _textdiff_version(), "token_len": int(token_len),
            "token_dim": int(token_dim), "splits": list(splits)}


def split_attrs(lay: SplitLayout) -> dict:
    """A split group's attributes: its ids, texts and views (and each view's text, where views have their own)."""
    attrs = {"ids": list(lay.ids), "texts": list(lay.texts), "views": int(lay.views)}
    if lay.view_texts is not None:
        attrs["view_texts"] = [list(t) for t in lay.view_texts]
    return attrs


def split_layout(attrs: dict) -> SplitLayout:
    """A split's layout from its group's attributes (:func:`split_attrs`; older stores have no view texts)."""
    view_texts = attrs.get("view_texts")
    return SplitLayout(ids=list(attrs["ids"]), texts=list(attrs["texts"]), views=int(attrs["views"]),
                       view_texts=None if view_texts is None else [list(t) for t in view_texts])


def layout_problems(have_facts: dict, wanted_facts: dict, have: dict[str, SplitLayout],
                    wanted: dict[str, SplitLayout]) -> list[str]:
    """How a store's facts (size, token_len, ...) and splits differ from the requested ones (empty: none)."""
    problems = [f"{name} {have_facts[name]} != requested {value}"
                for name, value in wanted_facts.items() if have_facts[name] != value]
    if list(have) != list(wanted):
        return problems + [f"splits {list(have)} != requested {list(wanted)}"]
    for name, lay in wanted.items():
        if have[name].ids != list(lay.ids):
            problems.append(f"split {name!r} ids differ")
        if have[name].texts != list(lay.texts):
            problems.append(f"split {name!r} texts differ")
        if have[name].views != lay.views:
            problems.append(f"split {name!r} views {have[name].views} != requested {lay.views}")
        if have[name].view_texts != lay.view_texts:
            problems.append(f"split {name!r} view texts differ")
    return problems
