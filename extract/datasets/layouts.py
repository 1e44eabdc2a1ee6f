"""The on-disk layouts: LViT's (MoNuSeg, QaTa), SGSeg's (QaTa) and the generic folder, each a registered reader.

monuseg
    LViT's layout: ``{Train,Val,Test}_Folder/`` each with ``img/``, ``labelcol/`` and
    ``<Train|Val|Test>_text.xlsx`` (columns ``Image``, ``Description``; ``Image`` names the mask file,
    the image is found by stem, e.g. the test images are ``.tif``).
qata
    SGSeg's layout (``images/{train,valid,test}/{images,masks}`` with masks ``mask_<name>.png`` and
    ``prompts/annotation.json``) or LViT's layout (as monuseg, masks ``mask_<name>.png``), detected
    from the folders present (option ``layout="sgseg"|"lvit"`` forces one). Item id = ``<name>``.
mosmedplus
    MosMedData+ (LViT's CT slices of COVID-19 lesions) in LViT's layout, as monuseg; masks named as their
    images or ``mask_<name>`` (detected).
nnunet
    nnU-Net's raw dataset folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/``, ``labelsTs/``)
    and a text table beside it: :mod:`extract.datasets.nnunet`.
folder
    A generic layout; either flat::

        root/images/<id>.png|jpg|jpeg|tif|tiff|bmp|dcm|dicom
        root/masks/<id>.<any of those>          same stem as the image
        root/texts.csv  or  root/texts.xlsx     columns: image, text[, split]

    where ``image`` is the image's file name or stem and ``split`` is train / val (or valid) / test
    (no split column: everything is ``train``); or the same three entries inside per-split
    subfolders ``root/train/``, ``root/val/`` (or ``valid/``), ``root/test/``. DICOM files (with the
    ``dicom`` extra) may also have no extension: ``<id>`` is then the whole file name. Each is displayed
    as a viewer would (modality LUT, VOI LUT or window, MONOCHROME1 inverted) and taken as 8-bit grey;
    masks in DICOM are read from their stored values.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from extract.datasets.core import DEFAULT_BLOCKS, SPLITS, DatasetError, Item, problems_error, rel_path
from extract.datasets.dataset import Dataset
from extract.datasets.matching import index_files, match_rows, split_dirs
from extract.datasets.nnunet import read_nnunet
from extract.datasets.registry import register
from extract.datasets.tables import Row, cell, read_table, text_table

Problems = list[tuple[Path, str]]


_LVIT = {"train": ("Train_Folder",), "val": ("Val_Folder",), "test": ("Test_Folder",)}


def _read_lvit(root: Path, wanted: list[str] | None, mask_prefix: str,
               problems: Problems) -> tuple[list[Item], list[Path]]:
    items, tables = [], []
    for split, d in split_dirs(root, _LVIT, wanted, "expected LViT's Train_Folder/Val_Folder/Test_Folder").items():
        table = d / f"{d.name.split('_')[0]}_text.xlsx"
        rows = read_table(table, image_column="image")
        images, masks = index_files(d / "img", problems), index_files(d / "labelcol", problems, mask_prefix)
        items += match_rows(rows, split, images, masks, d / "img", d / "labelcol", mask_prefix, [split], problems)
        tables.append(table)
    return items, tables


_SGSEG = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}


def _read_sgseg(root: Path, wanted: list[str] | None,
                problems: Problems) -> tuple[list[Item], list[Path]]:
    ann_path = root / "prompts" / "annotation.json"
    if not ann_path.is_file():
        raise DatasetError(f"{ann_path}: annotation file not found (SGSeg layout)")
    try:
        ann = json.loads(ann_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{ann_path}: cannot read annotation JSON ({e})") from e
    items = []
    for split, d in split_dirs(root / "images", _SGSEG, wanted, "expected SGSeg's images/{train,valid,test}").items():
        entries = ann.get(d.name) if isinstance(ann, dict) else None
        if not entries or not isinstance(entries, list):
            raise DatasetError(f"{ann_path}: no entries for split {d.name!r}")
        rows = [Row(ann_path, f"{d.name}[{n}]", cell(e.get("image_path")), cell(e.get("caption")), None)
                if isinstance(e, dict) else Row(ann_path, f"{d.name}[{n}]", "", "", None)
                for n, e in enumerate(entries)]
        images, masks = index_files(d / "images", problems), index_files(d / "masks", problems, "mask_")
        items += match_rows(rows, split, images, masks, d / "images", d / "masks", "mask_", [split], problems)
    return items, [ann_path]


_FOLDER = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def _read_folder(root: Path, wanted: list[str] | None,
                 problems: Problems) -> tuple[list[Item], list[Path], str]:
    flat = (root / "images").is_dir()
    dirs: dict[str | None, Path] = {None: root} if flat else dict(
        split_dirs(root, _FOLDER, wanted, "expected images/ or train/ val/ test/ subfolders"))
    items, tables = [], []
    for split, d in dirs.items():
        table = text_table(d)
        images, masks = index_files(d / "images", problems), index_files(d / "masks", problems)
        items += match_rows(read_table(table), split, images, masks, d / "images", d / "masks", "",
                            wanted or SPLITS, problems)
        tables.append(table)
    return items, tables, "flat" if flat else "per-split"


def _from_files(name: str, root: Path | str | None, skip_bad: bool,
                read: Callable[[Path, Problems], tuple[list[Item], list[Path], str]]) -> Dataset:
    """The dataset ``read`` finds in ``root`` (items, text tables, layout); its structural problems raise
    one :class:`DatasetError`, or with ``skip_bad`` drop those items (recorded in ``skipped``)."""
    if root is None:
        raise DatasetError(f"{name}: a root folder is required")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    problems: Problems = []
    items, tables, layout = read(root, problems)
    if problems and not skip_bad:
        raise problems_error(name, root, problems)
    items.sort(key=lambda it: (SPLITS.index(it.split), it.id))  # ids are unique: files indexed by stem
    if not items:
        raise DatasetError(f"{root}: no usable items")
    skipped = [(rel_path(p, root), why) for p, why in problems]
    return Dataset(name, root, items, DEFAULT_BLOCKS[name], skipped, layout, tables)


@register("monuseg")
def open_monuseg(root: Path | str | None, wanted: list[str] | None, skip_bad: bool = False) -> Dataset:
    """MoNuSeg in LViT's layout."""
    return _from_files("monuseg", root, skip_bad,
                       lambda r, problems: (*_read_lvit(r, wanted, "", problems), "lvit"))


@register("qata", options=("layout",))
def open_qata(root: Path | str | None, wanted: list[str] | None, skip_bad: bool = False, *,
              layout: str = "auto") -> Dataset:
    """QaTa-COV19 in SGSeg's or LViT's layout (``layout="auto"``: SGSeg's when ``images/`` or ``prompts/`` exist)."""

    def read(r: Path, problems: Problems) -> tuple[list[Item], list[Path], str]:
        chosen = layout
        if chosen == "auto":
            chosen = "sgseg" if (r / "images").is_dir() or (r / "prompts").is_dir() else "lvit"
        if chosen not in ("sgseg", "lvit"):
            raise DatasetError(f"qata: layout must be auto, sgseg or lvit, got {chosen!r}")
        items, tables = (_read_sgseg(r, wanted, problems) if chosen == "sgseg"
                         else _read_lvit(r, wanted, "mask_", problems))
        return items, tables, chosen

    return _from_files("qata", root, skip_bad, read)


@register("folder")
def open_folder(root: Path | str | None, wanted: list[str] | None, skip_bad: bool = False) -> Dataset:
    """The generic folder layout (flat or per split)."""
    return _from_files("folder", root, skip_bad, lambda r, problems: _read_folder(r, wanted, problems))


def _lvit_mask_prefix(root: Path) -> str:
    """``mask_`` when every mask of LViT's first split folder is named ``mask_<name>`` (QaTa's way), else ""."""
    for d in (root / n / "labelcol" for names in _LVIT.values() for n in names):
        if d.is_dir():
            names = [p.name for p in d.iterdir() if p.is_file() and not p.name.startswith(".")]
            return "mask_" if names and all(n.startswith("mask_") for n in names) else ""
    return ""


@register("mosmedplus")
def open_mosmedplus(root: Path | str | None, wanted: list[str] | None, skip_bad: bool = False) -> Dataset:
    """MosMedData+ in LViT's layout (as monuseg; masks named as their images, or ``mask_<name>``)."""
    return _from_files("mosmedplus", root, skip_bad,
                       lambda r, problems: (*_read_lvit(r, wanted, _lvit_mask_prefix(r), problems), "lvit"))


@register("nnunet", options=("label",))
def open_nnunet(root: Path | str | None, wanted: list[str] | None, skip_bad: bool = False, *,
                label: str | int | None = None) -> Dataset:
    """An nnU-Net raw dataset folder (:mod:`extract.datasets.nnunet`); ``label``: the one foreground label (its
    name or value; default every non-background label)."""
    found = {}

    def read(r: Path, problems: Problems) -> tuple[list[Item], list[Path], str]:
        items, tables, layout, found["labels"] = read_nnunet(r, wanted, label, problems)
        return items, tables, layout

    ds = _from_files("nnunet", root, skip_bad, read)
    return replace(ds, labels=found["labels"])
