"""The ``pipeline extract`` command line that made a store: how a store that lacks rows or pairs is
completed. Built here, above ``cache/``, from what ``extract`` recorded in the store (``attrs["extract"]``)."""

from __future__ import annotations

from collections.abc import Sequence

from cache.backends import dirname
from cache.store import FeatureStore

_ARGS = ("dataset", "data_root", "unet", "unet_flags", "text_encoder", "size", "seed", "max_length", "augment")


def extract_command(store: FeatureStore, blocks: Sequence[int] | None = None,
                    steps: Sequence[int] | None = None) -> str:
    """The ``pipeline extract`` command that made ``store``, for ``blocks`` × ``steps`` (default: the pairs
    it holds): re-run, it adds those pairs and rewrites every row whose done flag is clear."""
    args = dict(store.attrs.get("extract", {}))
    pairs = store.pairs()
    blocks = sorted({b for _, b in pairs}) if blocks is None else blocks
    steps = sorted({s for s, _ in pairs}) if steps is None else steps
    parts = ["pipeline extract"]
    for name in _ARGS:
        value = args.get(name)
        if value not in (None, "", "none"):
            parts.append(f"--{name.replace('_', '-')} {value}")
    if args.get("color_order") == "bgr":
        parts.append("--bgr")
    if args.get("mask_resize", "nearest") != "nearest":
        parts.append(f"--mask-resize {args['mask_resize']}")
    parts += [f"--steps {','.join(map(str, steps))}", f"--blocks {','.join(map(str, blocks))}",
              f"--cache-dir {dirname(store.path)}"]
    return " ".join(parts)
