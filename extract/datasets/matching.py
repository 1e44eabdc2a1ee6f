"""Pairing text rows with image and mask files: the files of a folder by stem, the items they make."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from extract.datasets.core import IMAGE_EXTS, SPLIT_ALIASES, SPLITS, DatasetError, Item
from extract.datasets.decoding import is_dicom
from extract.datasets.tables import Row


def _stem(name: str) -> str:
    p = Path(name)
    return p.stem if p.suffix.lower() in IMAGE_EXTS else p.name


def index_files(folder: Path, problems: list[tuple[Path, str]], prefix: str = "") -> dict[str, Path]:
    """Image files in ``folder`` by stem (minus ``prefix``); a stem used twice is a problem. A DICOM file
    whose name has no image extension (``IM0001``, ``1.2.840.5``: found by its ``DICM`` marker) goes by
    its whole name."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and (p.suffix.lower() in IMAGE_EXTS or is_dicom(p)):
            found.setdefault(_stem(p.name).removeprefix(prefix), []).append(p)
    for key, paths in found.items():
        if len(paths) > 1:
            problems.extend((p, f"{len(paths)} files share the stem {key!r}: {[q.name for q in paths]}") for p in paths)
    return {k: v[0] for k, v in found.items() if len(v) == 1}


def match_rows(rows: Sequence[Row], fixed_split: str | None, images: dict[str, Path], masks: dict[str, Path],
           img_dir: Path, mask_dir: Path, mask_prefix: str, wanted: Sequence[str],
           problems: list[tuple[Path, str]]) -> list[Item]:
    """Items of ``wanted`` splits from text rows and indexed files; anything inconsistent → ``problems``.

    ``fixed_split``: the split of every row (a split column, if any, must agree); None: each row's
    split column, default train.
    """
    items: list[Item] = []
    texted: dict[str, str] = {}
    for row in rows:
        where = row.where
        if not row.image:
            problems.append((row.table, f"{where}: a text but no image name"))
            continue
        key = _stem(row.image).removeprefix(mask_prefix)
        if key in texted:
            problems.append((row.table, f"{where}: {row.image} already has a text ({texted[key]})"))
            continue
        texted[key] = where
        split = SPLIT_ALIASES.get(row.split.lower()) if row.split else (fixed_split or "train")
        if split is None or (fixed_split and split != fixed_split):
            problems.append((row.table, f"{where}: split {row.split!r} is not "
                                        + (repr(fixed_split) if fixed_split else "train, val or test")))
        elif split not in wanted:
            continue
        elif not row.text:
            problems.append((row.table, f"{where}: {row.image} has an empty text"))
        elif key not in images:
            problems.append((row.table, f"{where}: no image with stem {key!r} in {img_dir}"))
        elif key not in masks:
            problems.append((images[key], f"no mask {mask_prefix}{key}.* in {mask_dir}"))
        else:
            items.append(Item(key, split, row.text, images[key], masks[key]))
    table = rows[0].table if rows else img_dir
    problems.extend((p, f"no text for this image in {table}") for k, p in images.items() if k not in texted)
    return items


def split_dirs(root: Path, names: Mapping[str, Sequence[str]], wanted: list[str] | None,
                what: str) -> dict[str, Path]:
    """The existing folder of each wanted split (``names``: candidate folder names per split)."""
    found = {s: next((root / n for n in names[s] if (root / n).is_dir()), None) for s in SPLITS}
    if wanted is None:
        out = {s: d for s, d in found.items() if d is not None}
        if not out:
            raise DatasetError(f"{root}: no split folder found ({what})")
        return out
    missing = [f"{s} ({'/'.join(names[s])})" for s in wanted if found[s] is None]
    if missing:
        raise DatasetError(f"{root}: missing split folder(s) {', '.join(missing)} ({what})")
    return {s: found[s] for s in wanted}  # type: ignore[misc]
