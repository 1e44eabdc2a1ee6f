"""The vocabulary every dataset reader shares: splits, :class:`Item`, :class:`DatasetError`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "val", "test")
DICOM_EXTS = (".dcm", ".dicom")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", *DICOM_EXTS)
DEFAULT_BLOCKS = {"monuseg": (6, 8, 12, 16), "qata": (4, 6, 8, 12), "folder": (6, 8, 12, 16),
                  "synthetic": (4, 6, 8),  # valid for small UNets (12 output blocks) too
                  # not chosen on their own validation: MosMedData+ takes QaTa-COV19's (lung lesions on grey
                  # radiology slices, annotated by LViT in the same words), nnunet the folder layout's
                  "mosmedplus": (4, 6, 8, 12), "nnunet": (6, 8, 12, 16)}
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


class DatasetError(ValueError):
    """Bad dataset input; message names the file and what is wrong (and may suggest ``skip_bad=True``)."""

    options = ("skip_bad",)  # the keywords its messages may name (common.errors)


@dataclass(frozen=True)
class Item:
    """One image with its mask and text."""

    id: str                  # unique within its split; the file stem for real sets
    split: str               # "train" | "val" | "test"
    text: str
    image_path: Path | None  # None for synthetic
    mask_path: Path | None


def problems_error(name: str, root: Path, problems: Sequence[tuple[Path, str]]) -> DatasetError:
    """One line: the file and what is wrong; several files: their count, then each (20 at most)."""
    if len(problems) == 1:
        path, why = problems[0]
        return DatasetError(f"{path}: {why} (skip_bad=True drops such items)")
    shown = "; ".join(f"{p}: {why}" for p, why in problems[:20]) + (
        f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return DatasetError(f"{name}: {len(problems)} problem(s) in {root} (skip_bad=True drops these items): {shown}")


def rel_path(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` (POSIX), or as it is when it lies elsewhere."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
