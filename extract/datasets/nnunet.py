"""nnU-Net's raw dataset layout (v2), 2-D files, with the texts in a table beside ``dataset.json``::

    DatasetXXX_Name/
      dataset.json           channel_names, labels ({"background": 0, "lesion": 1, ...}), file_ending[, numTraining]
      imagesTr/<case>_0000<file_ending>     one file per case (grey or RGB; a second channel file is refused)
      labelsTr/<case><file_ending>          integer label maps, values among dataset.json's labels
      imagesTs/<case>_0000<file_ending>     optional; read as the test split when labelsTs/ is there
      labelsTs/<case><file_ending>
      texts.csv | texts.xlsx                columns: image (the case id or a file name), text[, split]

The training cases are ``train`` unless the table's ``split`` says ``val`` (nnU-Net keeps its folds elsewhere,
so a validation split is chosen in the table); ``imagesTs`` cases are ``test``. The mask is binary: every
non-background label is foreground, or only the label named by the ``label`` option (its name or value).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from extract.datasets.core import DatasetError, Item
from extract.datasets.decoding import LabelMap
from extract.datasets.matching import match_rows
from extract.datasets.tables import Row, read_table, text_table

REQUIRED_KEYS = ("channel_names", "labels", "file_ending")


def read_dataset_json(root: Path) -> dict[str, Any]:
    """``root/dataset.json``, checked for the keys this reader needs (one line naming the file otherwise)."""
    path = root / "dataset.json"
    if not path.is_file():
        raise DatasetError(f"{path}: not found (an nnU-Net raw dataset folder holds dataset.json, imagesTr/ and "
                           f"labelsTr/)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        old = " (an nnU-Net v1 file: convert it with nnUNetv2_convert_old_nnUNet_dataset)" if (
            isinstance(meta, dict) and "modality" in meta) else ""
        raise DatasetError(f"{path}: missing key(s) {missing}{old}")
    return meta


def label_map(meta: dict[str, Any], path: Path, label: str | int | None) -> LabelMap:
    """The declared label values and the foreground: ``label`` (a name or a value), else every non-background
    label."""
    labels = meta["labels"]
    if not isinstance(labels, dict) or not all(isinstance(v, int) and not isinstance(v, bool)
                                               for v in labels.values()):
        raise DatasetError(f"{path}: labels must map names to integer values (region-based label lists are not "
                           f"read), got {labels!r}")
    if labels.get("background") != 0:
        raise DatasetError(f"{path}: labels must declare background as 0, got {labels!r}")
    declared = tuple(sorted(set(labels.values())))
    if label is None:
        foreground = tuple(v for v in declared if v != 0)
    else:
        by_value = {str(v): v for v in declared if v != 0}
        chosen = labels.get(str(label)) if str(label) in labels else by_value.get(str(label))
        if chosen is None or chosen == 0:
            named = ", ".join(f"{k} ({v})" for k, v in labels.items() if v != 0)
            raise DatasetError(f"nnunet: label {label!r} is not a foreground label of {path} (it declares {named})")
        foreground = (chosen,)
    return LabelMap(declared, foreground, path)


def _cases(folder: Path, ending: str, channel: bool, problems: list[tuple[Path, str]]) -> dict[str, Path]:
    """{case: file} of ``folder``: ``<case>_0000<ending>`` (``channel``) or ``<case><ending>``."""
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$" if channel else rf"^(.+){re.escape(ending)}$")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        m = pattern.match(p.name)
        if m is None:
            problems.append((p, f"not named <case>{'_0000' if channel else ''}{ending} as dataset.json's "
                                f"file_ending says"))
        elif channel and m.group(2) != "0000":
            problems.append((p, "a second channel file: textdiff reads one image file per case (grey or RGB)"))
        else:
            out[m.group(1)] = p
    return out


def read_nnunet(root: Path, wanted: list[str] | None, label: str | int | None,
                problems: list[tuple[Path, str]]) -> tuple[list[Item], list[Path], str, LabelMap]:
    """Items, the tables read, the layout's name (with the foreground chosen) and the label map."""
    meta = read_dataset_json(root)
    labels = label_map(meta, root / "dataset.json", label)
    ending = str(meta["file_ending"])
    folders = {"Tr": (root / "imagesTr", root / "labelsTr")}
    unlabelled: set[str] = set()  # imagesTs without labelsTs: nothing to score them on
    if (root / "imagesTs").is_dir():
        if (root / "labelsTs").is_dir():
            folders["Ts"] = (root / "imagesTs", root / "labelsTs")
        else:
            unlabelled = set(_cases(root / "imagesTs", ending, True, []))
    images: dict[str, Path] = {}
    masks: dict[str, Path] = {}
    part: dict[str, str] = {}
    for name, (img_dir, lab_dir) in folders.items():
        for d in (img_dir, lab_dir):
            if not d.is_dir():
                raise DatasetError(f"{d}: folder not found (nnU-Net raw layout)")
        found = _cases(img_dir, ending, True, problems)
        for case, p in found.items():
            if case in images:
                problems.append((p, f"case {case!r} is in both imagesTr and imagesTs"))
            images[case], part[case] = p, name
        masks.update(_cases(lab_dir, ending, False, problems))
    n_train = meta.get("numTraining")
    tr = sum(1 for v in part.values() if v == "Tr")
    if isinstance(n_train, int) and n_train != tr:
        problems.append((root / "dataset.json", f"numTraining is {n_train} but imagesTr holds {tr} cases"))
    table = text_table(root)
    rows = [_case_row(r, part, ending, problems) for r in read_table(table)]
    rows = [r for r in rows if r is not None and r.image not in unlabelled]
    items = match_rows(rows, None, images, masks, root / "images{Tr,Ts}",
                       root / "labels{Tr,Ts}", "", wanted or ("train", "val", "test"), problems)
    chosen = "all" if label is None else str(label)
    return items, [table, root / "dataset.json"], f"nnunet:foreground={chosen}", labels


def _case_row(row: Row, part: dict[str, str], ending: str, problems: list[tuple[Path, str]]) -> Row | None:
    """A text row naming its case (a case id, ``<case>_0000<ending>`` or ``<case><ending>``), its split settled:
    imagesTs cases are test, imagesTr cases train or (the table says) val."""
    case = re.sub(rf"(_\d{{4}})?{re.escape(ending)}$", "", row.image)
    split = (row.split or "").lower()
    if part.get(case) == "Ts":
        if split not in ("", "test"):
            problems.append((row.table, f"{row.where}: {case} is in imagesTs, so its split is test, not {row.split!r}"))
            return None
        split = "test"
    elif part.get(case) == "Tr" and split == "test":
        problems.append((row.table, f"{row.where}: {case} is a training case (imagesTr); its split is train or val"))
        return None
    return replace(row, image=case, split=split or None)
