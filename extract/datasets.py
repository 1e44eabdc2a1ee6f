"""Dataset readers: image + mask + text triples in train / val / test splits.

``open_dataset(name, root)`` reads one of four sources into a :class:`Dataset`:

monuseg
    LViT's layout: ``{Train,Val,Test}_Folder/`` each with ``img/``, ``labelcol/`` and
    ``<Train|Val|Test>_text.xlsx`` (columns ``Image``, ``Description``; ``Image`` names the mask file,
    the image is found by stem, e.g. the test images are ``.tif``).
qata
    SGSeg's layout (``images/{train,valid,test}/{images,masks}`` with masks ``mask_<name>.png`` and
    ``prompts/annotation.json``) or LViT's layout (as monuseg, masks ``mask_<name>.png``), detected
    from the folders present (option ``layout="sgseg"|"lvit"`` forces one). Item id = ``<name>``.
folder
    A generic layout; either flat::

        root/images/<id>.png|jpg|jpeg|tif|tiff|bmp
        root/masks/<id>.<any of those>          same stem as the image
        root/texts.csv  or  root/texts.xlsx     columns: image, text[, split]

    where ``image`` is the image's file name or stem and ``split`` is train / val (or valid) / test
    (no split column: everything is ``train``); or the same three entries inside per-split
    subfolders ``root/train/``, ``root/val/`` (or ``valid/``), ``root/test/``.
synthetic
    Generated from a seed (options ``seed``, ``counts``, ``native_size``); the text is necessary to
    segment it: identical discs lie in all four regions (the triangles cut by the diagonals: top,
    right, bottom, left) and only those in the regions the text names are in the mask. Each region has
    a fixed background tint (its landmark), so a model without positional encoding can still tell
    the regions apart. See :func:`synthetic_sample`.

Structural problems (missing mask, a text row with no image, an image with no text, empty text)
raise one :class:`DatasetError` listing every problem, or with ``skip_bad=True`` drop those items
and record them in ``Dataset.skipped``. Unreadable files raise when loaded.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from cache.key import sha256_file

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
DEFAULT_BLOCKS = {"monuseg": (6, 8, 12, 16), "qata": (4, 6, 8, 12), "folder": (6, 8, 12, 16),
                  "synthetic": (4, 6, 8)}  # valid for small UNets (12 output blocks) too
_SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_TEXT_COLUMNS = ("text", "description", "caption")
T = TypeVar("T")


class DatasetError(ValueError):
    """Bad dataset input; message names the file and what is wrong."""


@dataclass(frozen=True)
class Item:
    """One image with its mask and text."""

    id: str                  # unique within its split; the file stem for real sets
    split: str               # "train" | "val" | "test"
    text: str
    image_path: Path | None  # None for synthetic
    mask_path: Path | None


# --------------------------------------------------------------------------- pixels

_MODE_NOTES = {"L": "grayscale, replicated to RGB", "1": "1-bit, replicated to RGB",
               "LA": "grayscale with alpha, alpha dropped", "P": "palette colours, converted to RGB",
               "PA": "palette colours with alpha, converted to RGB", "RGBA": "alpha dropped",
               "RGBa": "alpha dropped", "RGBX": "padding channel dropped", "CMYK": "CMYK, converted to RGB",
               "YCbCr": "YCbCr, converted to RGB", "LAB": "Lab, converted to RGB", "HSV": "HSV, converted to RGB"}


def _pil_to_rgb8(im: Image.Image, path: Path) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 from any PIL mode (grey replicated, alpha dropped, 16-bit scaled to 8-bit) and a
    note saying what was converted (None for 8-bit RGB)."""
    if im.mode.startswith("I"):  # I;16*, I: 16-bit grey (PNG / TIFF)
        return _array_to_rgb8(np.asarray(im), path)
    if im.mode == "F":
        raise DatasetError(f"{path}: floating-point images are not supported (mode F)")
    return np.asarray(im.convert("RGB")), _MODE_NOTES.get(im.mode, None if im.mode == "RGB" else
                                                           f"mode {im.mode}, converted to RGB")


def _array_to_rgb8(a: np.ndarray, path: Path) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 from a (H, W[, C]) uint8/uint16/bool array (C = 1, 3 or 4), and what was converted."""
    notes = []
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
        notes.append("1-bit")
    elif a.dtype.kind in "ui" and a.dtype.itemsize > 1:  # 16-bit grey/RGB (PIL "I;16*", "I"; tifffile)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise DatasetError(f"{path}: pixel values outside the 16-bit range")
        a = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
        notes.append("16-bit, scaled to 8 bits")
    elif a.dtype != np.uint8:
        raise DatasetError(f"{path}: unsupported pixel type {a.dtype}")
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4):
        raise DatasetError(f"{path}: unsupported image shape {a.shape}")
    if a.shape[2] == 1:
        notes.append("grayscale, replicated to RGB")
    elif a.shape[2] == 4:
        notes.append("alpha dropped")
    a = a[..., :3] if a.shape[2] != 1 else np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a), "; ".join(notes) or None


def _decode(path: Path, kind: str, convert: Callable[[Image.Image, Path], T],
            from_array: Callable[[np.ndarray, Path], T]) -> T:
    """Decode ``path`` fully (PIL, tifffile for TIFFs PIL cannot read); any failure names the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: {kind} file not found")
    try:
        with Image.open(path) as im:
            im.load()
            return convert(im, path)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure becomes one error naming the file
        also = ""
        if path.suffix.lower() in (".tif", ".tiff"):  # TIFFs PIL cannot decode (e.g. 16-bit RGB, some codecs)
            try:
                import tifffile
                return from_array(np.asarray(tifffile.imread(path)), path)
            except Exception as e2:  # noqa: BLE001
                also = f"; tifffile: {str(e2).removeprefix(f'{path}: ')}"
        raise DatasetError(f"{path}: cannot read {kind} (unreadable or truncated: {e}{also})") from e


def decode_image(path: Path) -> tuple[np.ndarray, str | None]:
    """A whole image file as (H, W, 3) uint8 RGB and a note of what was converted (None: it was 8-bit RGB)."""
    return _decode(Path(path), "image", _pil_to_rgb8, _array_to_rgb8)


def decode_mask(path: Path) -> np.ndarray:
    """A whole mask file as (H, W) uint8 in {0, 1}; anything but a binary mask is a :class:`DatasetError`."""
    return _decode(Path(path), "mask", _pil_mask, _mask_values)


def _mask_values(a: np.ndarray, path: Path) -> np.ndarray:
    """(H, W) {0, 1} uint8 from a {0,255} or {0,1} mask (grey, or colour with equal channels)."""
    if a.ndim == 3:
        if a.shape[2] in (2, 4):  # drop alpha
            a = a[..., :-1]
        if a.shape[2] > 1 and not (a == a[..., :1]).all():
            raise DatasetError(f"{path}: mask is in colour (its channels differ); expected a grey binary mask")
        a = a[..., 0]
    if a.ndim != 2:
        raise DatasetError(f"{path}: unsupported mask shape {a.shape}")
    if a.dtype == bool:
        return a.astype(np.uint8)
    values = np.unique(a)
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(str(v) for v in values[:10]) + (", ..." if len(values) > 10 else "")
        raise DatasetError(f"{path}: mask values {{{shown}}} are not binary (expected {{0, 255}} or {{0, 1}})")
    return (a > 0).astype(np.uint8)


def _pil_mask(im: Image.Image, path: Path) -> np.ndarray:
    if im.mode not in ("1", "L", "P", "LA", "PA", "RGB", "RGBA") and not im.mode.startswith("I"):
        raise DatasetError(f"{path}: unsupported mask mode {im.mode}")
    return _mask_values(np.asarray(im), path)


def resize_image(rgb8: np.ndarray, size: int, color_order: str = "rgb") -> np.ndarray:
    """uint8 (3, size, size) from (H, W, 3) uint8: PIL bilinear, channels RGB (or BGR)."""
    a = np.asarray(Image.fromarray(rgb8, "RGB").resize((int(size), int(size)), Image.Resampling.BILINEAR))
    if color_order == "bgr":
        a = a[..., ::-1]
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def to_unit_range(img8: np.ndarray) -> np.ndarray:
    """uint8 → float32 in [-1, 1], the UNet's input scale."""
    return img8.astype(np.float32) / 127.5 - 1.0


def read_image(path: Path, size: int, color_order: str = "rgb") -> tuple[np.ndarray, tuple[int, int]]:
    """A single image file as extraction reads it: (uint8 (3, size, size), original (height, width))."""
    _check_prep(size, color_order)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    rgb8, _note = decode_image(path)
    return resize_image(rgb8, size, color_order), (int(rgb8.shape[0]), int(rgb8.shape[1]))


def _resize_mask(mask01: np.ndarray, size: int) -> np.ndarray:
    im = Image.fromarray(mask01, "L").resize((int(size), int(size)), Image.Resampling.NEAREST)
    return np.asarray(im, dtype=np.uint8).copy()


def _check_prep(size: int, color_order: str) -> None:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if color_order not in ("rgb", "bgr"):
        raise ValueError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")


def preprocessing(size: int, color_order: str = "rgb") -> dict:
    """The preprocessing that determines the loaded arrays (goes into the cache key)."""
    _check_prep(size, color_order)
    return {"size": int(size), "image_resize": "pil-bilinear", "mask_resize": "nearest", "range": [-1.0, 1.0],
            "to_rgb": "grey-replicated,alpha-dropped,16bit-rounded", "color_order": color_order}


# --------------------------------------------------------------------------- synthetic

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
class _Synthetic:
    seed: int
    native_size: int

    def sample(self, item: Item) -> SyntheticSample:
        return synthetic_sample(self.seed, item.split, int(item.id.rsplit("-", 1)[1]), self.native_size)


# --------------------------------------------------------------------------- dataset

@dataclass
class Dataset:
    """Items in a deterministic order (train, val, test; by id within a split) and how to load them."""

    name: str
    root: Path | None
    items: list[Item]
    default_blocks: tuple[int, ...]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    layout: str = ""                                    # which on-disk layout was read ("" for synthetic)
    tables: list[Path] = field(default_factory=list)    # text tables read (part of the fingerprint)
    _synthetic: _Synthetic | None = field(default=None, repr=False)

    def splits(self) -> list[str]:
        present = {it.split for it in self.items}
        return [s for s in SPLITS if s in present]

    def head(self, n: int) -> Dataset:
        """The same dataset with only the first ``n`` items of each split (its fingerprint shrinks too)."""
        if n < 1:
            raise DatasetError(f"{self.name}: --limit must be >= 1, got {n}")
        kept = [it for s in self.splits() for it in self.by_split(s)[:n]]
        return replace(self, items=kept)

    def by_split(self, split: str) -> list[Item]:
        if split not in SPLITS:
            raise DatasetError(f"{self.name}: unknown split {split!r} (expected one of {SPLITS})")
        return [it for it in self.items if it.split == split]

    def load_image_uint8(self, item: Item, size: int, color_order: str = "rgb") -> np.ndarray:
        """uint8 (3, size, size), RGB (or BGR), PIL bilinear resize: what the store keeps."""
        _check_prep(size, color_order)
        if self._synthetic is not None:
            rgb8 = self._synthetic.sample(item).image
        else:
            rgb8, _note = decode_image(self._path(item.image_path, item))
        return resize_image(rgb8, size, color_order)

    def load_image(self, item: Item, size: int, color_order: str = "rgb") -> np.ndarray:
        """float32 (3, size, size) in [-1, 1]: :meth:`load_image_uint8` scaled for the UNet."""
        return to_unit_range(self.load_image_uint8(item, size, color_order))

    def load_mask(self, item: Item, size: int) -> np.ndarray:
        """uint8 (size, size) in {0, 1}, nearest resize."""
        _check_prep(size, "rgb")
        if self._synthetic is not None:
            mask = self._synthetic.sample(item).mask
        else:
            mask = decode_mask(self._path(item.mask_path, item))
        return _resize_mask(np.ascontiguousarray(mask), size)

    def _path(self, path: Path | None, item: Item) -> Path:
        if path is None:
            raise DatasetError(f"{self.name}: item {item.split}/{item.id} has no file")
        return path

    def texts_sha256(self) -> str:
        rows = [[it.split, it.id, it.text] for it in self.items]
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode()).hexdigest()

    def fingerprint(self) -> dict:
        """JSON-able identity of the content: files and their sha256 (or the generator), and the texts."""
        counts = {s: len(self.by_split(s)) for s in self.splits()}
        if self._synthetic is not None:
            return {"name": "synthetic", "generator_version": SYNTHETIC_VERSION, "seed": self._synthetic.seed,
                    "counts": counts, "native_size": self._synthetic.native_size,
                    "texts_sha256": self.texts_sha256()}
        assert self.root is not None
        paths = sorted({*self.tables, *(p for it in self.items for p in (it.image_path, it.mask_path) if p)})
        files = {p.relative_to(self.root).as_posix(): sha256_file(p) for p in paths}
        return {"name": self.name, "layout": self.layout, "counts": counts, "files": files,
                "texts_sha256": self.texts_sha256()}


# --------------------------------------------------------------------------- text tables

@dataclass(frozen=True)
class _Row:
    table: Path
    where: str         # "row 4" (header = row 1) or "valid[3]" (JSON list position)
    image: str
    text: str
    split: str | None  # None: the table's default split


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return str(v).strip()


def _read_rows(path: Path) -> list[list[str]]:
    """All rows of a .csv / .xlsx (first sheet) as stripped strings, header first."""
    if not path.is_file():
        raise DatasetError(f"{path}: text table not found")
    try:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [[_cell(c) for c in row] for row in csv.reader(f)]
        import openpyxl
        wb = openpyxl.load_workbook(path, read_only=True, data_only=True)
        try:
            return [[_cell(c) for c in row] for row in wb.worksheets[0].iter_rows(values_only=True)]
        finally:
            wb.close()
    except Exception as e:  # noqa: BLE001
        raise DatasetError(f"{path}: cannot read text table ({e})") from e


def _read_table(path: Path, image_column: str = "image") -> list[_Row]:
    """Rows of a text table with columns ``image_column``, text (or description/caption) [, split]."""
    rows = _read_rows(path)
    header = [h.lower() for h in rows[0]] if rows else []

    def col(names: Sequence[str], required: bool = True) -> int | None:
        idx = next((header.index(n) for n in names if n in header), None)
        if idx is None and required:
            raise DatasetError(f"{path}: no {'/'.join(names)} column (header: {rows[0] if rows else 'empty'})")
        return idx

    i_img, i_txt, i_split = col((image_column,)), col(_TEXT_COLUMNS), col(("split",), required=False)
    get = lambda r, i: r[i] if i is not None and i < len(r) else ""  # noqa: E731
    out = [_Row(path, f"row {n}", get(r, i_img), get(r, i_txt), get(r, i_split) if i_split is not None else None)
           for n, r in enumerate(rows[1:], start=2) if any(r)]
    if not out:
        raise DatasetError(f"{path}: text table is empty (no rows under the header)")
    return out


# --------------------------------------------------------------------------- matching files and texts

def _stem(name: str) -> str:
    p = Path(name)
    return p.stem if p.suffix.lower() in IMAGE_EXTS else p.name


def _index(folder: Path, problems: list[tuple[Path, str]], prefix: str = "") -> dict[str, Path]:
    """Image files in ``folder`` by stem (minus ``prefix``); a stem used twice is a problem."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found")
    found: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS:
            found.setdefault(p.stem.removeprefix(prefix), []).append(p)
    for key, paths in found.items():
        if len(paths) > 1:
            problems.extend((p, f"{len(paths)} files share the stem {key!r}: {[q.name for q in paths]}") for p in paths)
    return {k: v[0] for k, v in found.items() if len(v) == 1}


def _match(rows: Sequence[_Row], fixed_split: str | None, images: dict[str, Path], masks: dict[str, Path],
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
        split = _SPLIT_ALIASES.get(row.split.lower()) if row.split else (fixed_split or "train")
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


def _wanted(splits: Sequence[str] | None) -> list[str] | None:
    if splits is None:
        return None
    bad = [s for s in splits if s not in _SPLIT_ALIASES]
    if bad:
        raise DatasetError(f"unknown split(s) {bad} (expected train, val, test)")
    return list(dict.fromkeys(_SPLIT_ALIASES[s] for s in splits))


def _split_dirs(root: Path, names: Mapping[str, Sequence[str]], wanted: list[str] | None,
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


_LVIT = {"train": ("Train_Folder",), "val": ("Val_Folder",), "test": ("Test_Folder",)}


def _read_lvit(root: Path, wanted: list[str] | None, mask_prefix: str,
               problems: list[tuple[Path, str]]) -> tuple[list[Item], list[Path]]:
    items, tables = [], []
    for split, d in _split_dirs(root, _LVIT, wanted, "expected LViT's Train_Folder/Val_Folder/Test_Folder").items():
        table = d / f"{d.name.split('_')[0]}_text.xlsx"
        rows = _read_table(table, image_column="image")
        images, masks = _index(d / "img", problems), _index(d / "labelcol", problems, mask_prefix)
        items += _match(rows, split, images, masks, d / "img", d / "labelcol", mask_prefix, [split], problems)
        tables.append(table)
    return items, tables


_SGSEG = {"train": ("train",), "val": ("valid", "val"), "test": ("test",)}


def _read_sgseg(root: Path, wanted: list[str] | None,
                problems: list[tuple[Path, str]]) -> tuple[list[Item], list[Path]]:
    ann_path = root / "prompts" / "annotation.json"
    if not ann_path.is_file():
        raise DatasetError(f"{ann_path}: annotation file not found (SGSeg layout)")
    try:
        ann = json.loads(ann_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DatasetError(f"{ann_path}: cannot read annotation JSON ({e})") from e
    items = []
    for split, d in _split_dirs(root / "images", _SGSEG, wanted, "expected SGSeg's images/{train,valid,test}").items():
        entries = ann.get(d.name) if isinstance(ann, dict) else None
        if not entries or not isinstance(entries, list):
            raise DatasetError(f"{ann_path}: no entries for split {d.name!r}")
        rows = [_Row(ann_path, f"{d.name}[{n}]", _cell(e.get("image_path")), _cell(e.get("caption")), None)
                if isinstance(e, dict) else _Row(ann_path, f"{d.name}[{n}]", "", "", None)
                for n, e in enumerate(entries)]
        images, masks = _index(d / "images", problems), _index(d / "masks", problems, "mask_")
        items += _match(rows, split, images, masks, d / "images", d / "masks", "mask_", [split], problems)
    return items, [ann_path]


def _text_table(d: Path) -> Path:
    found = [d / n for n in ("texts.csv", "texts.xlsx") if (d / n).is_file()]
    if len(found) != 1:
        raise DatasetError(f"{d}: expected exactly one of texts.csv / texts.xlsx, found {[p.name for p in found]}")
    return found[0]


_FOLDER = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}


def _read_folder(root: Path, wanted: list[str] | None,
                 problems: list[tuple[Path, str]]) -> tuple[list[Item], list[Path], str]:
    flat = (root / "images").is_dir()
    dirs: dict[str | None, Path] = {None: root} if flat else dict(
        _split_dirs(root, _FOLDER, wanted, "expected images/ or train/ val/ test/ subfolders"))
    items, tables = [], []
    for split, d in dirs.items():
        table = _text_table(d)
        images, masks = _index(d / "images", problems), _index(d / "masks", problems)
        items += _match(_read_table(table), split, images, masks, d / "images", d / "masks", "",
                        wanted or SPLITS, problems)
        tables.append(table)
    return items, tables, "flat" if flat else "per-split"


# --------------------------------------------------------------------------- entry point

_OPTIONS = {"monuseg": set(), "qata": {"layout"}, "folder": set(), "synthetic": {"seed", "counts", "native_size"}}


def _open_synthetic(wanted: list[str] | None, seed: int = 0, counts: Mapping[str, int] | None = None,
                    native_size: int = 128) -> Dataset:
    counts = dict(DEFAULT_COUNTS if counts is None else counts)
    bad = {k: v for k, v in counts.items() if k not in SPLITS or not isinstance(v, int) or v < 0}
    if bad or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"synthetic: counts must map train/val/test to ints >= 0 and seed be an int >= 0 "
                           f"(got counts={counts}, seed={seed!r})")
    counts = {s: counts[s] for s in SPLITS if s in counts and (wanted is None or s in wanted)}
    spec = _Synthetic(seed, native_size)
    items = [Item(f"{s}-{i:04d}", s, synthetic_sample(seed, s, i, native_size).text, None, None)
             for s, n in counts.items() for i in range(n)]
    return Dataset("synthetic", None, items, DEFAULT_BLOCKS["synthetic"], [], "", [], spec)


def open_dataset(name: str, root: Path | str | None = None, *, splits: Sequence[str] | None = None,
                 skip_bad: bool = False, **options: Any) -> Dataset:
    """Read dataset ``name`` ("monuseg" | "qata" | "folder" | "synthetic") from ``root``.

    ``splits`` restricts the splits read (default: every split present). ``skip_bad`` drops items with
    structural problems (recorded in ``Dataset.skipped``) instead of raising. Options: qata
    ``layout`` ("auto" | "sgseg" | "lvit"); synthetic ``seed`` (0), ``counts`` ({"train": 24, "val": 8,
    "test": 16}), ``native_size`` (128).
    """
    if name not in _OPTIONS:
        raise DatasetError(f"unknown dataset {name!r} (expected one of {sorted(_OPTIONS)})")
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        accepted = ", ".join(sorted(_OPTIONS[name])) or "none"
        raise DatasetError(f"{name}: unknown option(s) {sorted(unknown)} (accepted: {accepted})")
    wanted = _wanted(splits)
    if name == "synthetic":
        if root is not None:
            raise DatasetError(f"synthetic: takes no root folder (got {root})")
        return _open_synthetic(wanted, **options)
    if root is None:
        raise DatasetError(f"{name}: a root folder is required")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    problems: list[tuple[Path, str]] = []
    layout = "lvit"
    if name == "monuseg":
        items, tables = _read_lvit(root, wanted, "", problems)
    elif name == "qata":
        layout = options.get("layout", "auto")
        if layout == "auto":
            layout = "sgseg" if (root / "images").is_dir() or (root / "prompts").is_dir() else "lvit"
        if layout not in ("sgseg", "lvit"):
            raise DatasetError(f"qata: layout must be auto, sgseg or lvit, got {layout!r}")
        items, tables = (_read_sgseg(root, wanted, problems) if layout == "sgseg"
                         else _read_lvit(root, wanted, "mask_", problems))
    else:
        items, tables, layout = _read_folder(root, wanted, problems)
    if problems and not skip_bad:
        raise problems_error(name, root, problems)
    items.sort(key=lambda it: (SPLITS.index(it.split), it.id))  # ids are unique: files indexed by stem
    if not items:
        raise DatasetError(f"{root}: no usable items")
    skipped = [(_rel(p, root), why) for p, why in problems]
    return Dataset(name, root, items, DEFAULT_BLOCKS[name], skipped, layout, tables)


def problems_error(name: str, root: Path, problems: Sequence[tuple[Path, str]]) -> DatasetError:
    """One line: the file and what is wrong; several files: their count, then each (20 at most)."""
    if len(problems) == 1:
        path, why = problems[0]
        return DatasetError(f"{path}: {why} (--skip-bad drops such items)")
    shown = "; ".join(f"{p}: {why}" for p, why in problems[:20]) + (
        f"; ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    return DatasetError(f"{name}: {len(problems)} problem(s) in {root} (--skip-bad drops these items): {shown}")


@contextlib.contextmanager
def quiet_decoders() -> Iterator[None]:
    """Silence the decoders' own chatter (PIL's warnings, tifffile's log): a broken file is reported once,
    as one error naming it, not with extra lines from the library that failed to read it."""
    log = logging.getLogger("tifffile")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


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
            mask = decode_mask(ds._path(item.mask_path, item))
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

    from concurrent.futures import ThreadPoolExecutor

    with quiet_decoders(), ThreadPoolExecutor(max(1, threads), thread_name_prefix="textdiff-check") as pool:
        results = list(pool.map(one, ds.items))
    problems = [p for probs, _ in results for p in probs]
    notes = [(_rel(p, ds.root), what) for _, ns in results for p, what in ns]
    if problems and not skip_bad:
        raise problems_error(ds.name, ds.root, problems)
    bad = {it.id + "/" + it.split for it, (probs, _) in zip(ds.items, results, strict=True) if probs}
    kept = [it for it in ds.items if it.id + "/" + it.split not in bad]
    if not kept:
        raise DatasetError(f"{ds.root}: no usable items")
    skipped = ds.skipped + [(_rel(p, ds.root), why) for p, why in problems]
    return replace(ds, items=kept, skipped=skipped), notes


def _why(e: DatasetError, path: Path | None) -> str:
    """The message of a decoding error without the leading "<path>: "."""
    return str(e).removeprefix(f"{path}: ")


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
