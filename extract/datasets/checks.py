"""Input checks: decode every file of a dataset before anything is written from it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from extract.datasets.core import DatasetError, Item, problems_error, rel_path
from extract.datasets.dataset import Dataset
from extract.datasets.decoding import decode_image, quiet_decoders


def check_files(ds: Dataset, skip_bad: bool = False, on_item: Callable[[], None] | None = None,
                threads: int = 4) -> tuple[Dataset, list[tuple[str, str]]]:
    """Decode every image and mask of ``ds`` in full before anything is written from them.

    Returns the dataset (less the bad items with ``skip_bad``, recorded in ``skipped``) and notes
    ``(file, what)`` for what is accepted but worth saying: an image converted to RGB (grey, alpha,
    16-bit, palette) and an empty mask. Raises :class:`DatasetError` naming each bad file otherwise: one
    that does not decode (truncated, not an image), a mask that is not binary, an image and a mask of
    different sizes. ``on_item`` is called once per item checked (progress).
    """
    if ds.root is None:  # synthetic: generated, nothing to read
        return ds, []

    def one(item: Item) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
        problems: list[tuple[Path, str]] = []
        notes: list[tuple[Path, str]] = []
        image = mask = None
        try:
            image, note = decode_image(ds._path(item.image_path, item))
            if note:
                notes.append((item.image_path, note))
        except DatasetError as e:
            problems.append((item.image_path, _why(e, item.image_path)))
        try:
            mask = ds.decode_mask(ds._path(item.mask_path, item))
            if not mask.any():
                notes.append((item.mask_path, "empty mask (no foreground): kept; it scores 1 only if the "
                                              "prediction is empty too"))
        except DatasetError as e:
            problems.append((item.mask_path, _why(e, item.mask_path)))
        if image is not None and mask is not None and image.shape[:2] != mask.shape:
            problems.append((item.mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} px but its image "
                                             f"{item.image_path.name} is {image.shape[1]}x{image.shape[0]} px"))
        if on_item:
            on_item()
        return problems, notes

    with quiet_decoders(), ThreadPoolExecutor(max(1, threads), thread_name_prefix="textdiff-check") as pool:
        results = list(pool.map(one, ds.items))
    problems = [p for probs, _ in results for p in probs]
    notes = [(rel_path(p, ds.root), what) for _, ns in results for p, what in ns]
    if problems and not skip_bad:
        raise problems_error(ds.name, ds.root, problems)
    bad = {it.id + "/" + it.split for it, (probs, _) in zip(ds.items, results, strict=True) if probs}
    kept = [it for it in ds.items if it.id + "/" + it.split not in bad]
    if not kept:
        raise DatasetError(f"{ds.root}: no usable items")
    skipped = ds.skipped + [(rel_path(p, ds.root), why) for p, why in problems]
    return replace(ds, items=kept, skipped=skipped), notes


def _why(e: DatasetError, path: Path | None) -> str:
    """The message of a decoding error without the leading "<path>: "."""
    return str(e).removeprefix(f"{path}: ")
