"""Decoding image and mask files into arrays (PIL, tifffile, pydicom for DICOM), resizing them, and the
preprocessing that goes into a cache key."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

from cache.schema import MASK_RESIZES
from common.errors import OptionError
from extract.datasets.core import DICOM_EXTS, DatasetError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset as DicomDataset

T = TypeVar("T")

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
            from_array: Callable[[np.ndarray, Path], T], dicom: Callable[[Path], T]) -> T:
    """Decode ``path`` fully (pydicom for DICOM, else PIL, tifffile for TIFFs PIL cannot read); any failure
    names the file."""
    if not path.is_file():
        raise DatasetError(f"{path}: {kind} file not found")
    if is_dicom(path):
        try:
            return dicom(path)
        except (DatasetError, MissingExtraError):
            raise
        except Exception as e:  # noqa: BLE001 - pydicom's failures (bad header, bad VOI values) name the file
            raise DatasetError(f"{path}: cannot read {kind} as DICOM ({_one_line(e)})") from e
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
    return _decode(Path(path), "image", _pil_to_rgb8, _array_to_rgb8, _dicom_image)


@dataclass(frozen=True)
class LabelMap:
    """A label file's declared values (``declared``, e.g. nnU-Net's dataset.json ``labels``) and which of them are
    the foreground; ``source``: the file that declares them (named when a mask holds another value)."""

    declared: tuple[int, ...]
    foreground: tuple[int, ...]
    source: Path


def decode_mask(path: Path, labels: LabelMap | None = None) -> np.ndarray:
    """A whole mask file as (H, W) uint8 in {0, 1}; anything but a binary mask is a :class:`DatasetError`. With
    ``labels``: a label map whose values must be declared, its foreground values → 1."""
    if labels is None:
        return _decode(Path(path), "mask", _pil_mask, _mask_values, lambda p: _mask_values(_dicom_pixels(p)[1], p))
    to_labels = lambda a, p: _label_values(a, p, labels)  # noqa: E731
    return _decode(Path(path), "mask", lambda im, p: to_labels(np.asarray(im), p), to_labels,
                   lambda p: to_labels(_dicom_pixels(p)[1], p))


def _label_values(a: np.ndarray, path: Path, labels: LabelMap) -> np.ndarray:
    """(H, W) {0, 1} uint8: ``labels.foreground`` of an integer label map, refused if it holds undeclared values."""
    if a.ndim != 2 or a.dtype.kind not in "uib":
        raise DatasetError(f"{path}: a label map must be one channel of integers, got shape {a.shape} {a.dtype}")
    stray = sorted(set(np.unique(a).tolist()) - set(labels.declared))
    if stray:
        raise DatasetError(f"{path}: label values {stray[:10]} are not declared in {labels.source} "
                           f"(declared: {list(labels.declared)})")
    return np.isin(a, labels.foreground).astype(np.uint8)


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


class MissingExtraError(RuntimeError):
    """A file needs an optional dependency that is not installed; the message names the extra to install."""


def is_dicom(path: Path) -> bool:
    """A DICOM file: named ``.dcm`` / ``.dicom``, or any file with ``DICM`` after its 128-byte preamble."""
    if Path(path).suffix.lower() in DICOM_EXTS:
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:] == b"DICM"
    except OSError:
        return False


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _dicom_pixels(path: Path) -> tuple[DicomDataset, np.ndarray]:
    """A single-frame DICOM file's dataset and stored pixel values (pydicom, imported only now)."""
    try:
        import pydicom
    except ImportError as e:
        raise MissingExtraError(f"{path}: reading DICOM files needs pydicom: pip install 'textdiff[dicom]'") from e
    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise DatasetError(f"{path}: DICOM file without pixel data (truncated, or not an image)")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DatasetError(f"{path}: multi-frame DICOM ({frames} frames) is not supported; "
                           "save the frame to use as a file of its own")
    try:
        return ds, ds.pixel_array
    except Exception as e:  # noqa: BLE001 - a missing or failing pixel decoder
        syntax = ds.file_meta.get("TransferSyntaxUID")
        if syntax is not None and syntax.is_compressed:
            raise DatasetError(f"{path}: cannot decode DICOM pixel data compressed as {syntax.name} ({syntax}): "
                               f"{_one_line(e)}") from e
        raise DatasetError(f"{path}: cannot decode DICOM pixel data ({_one_line(e)})") from e


_DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT")  # pydicom returns these as RGB


def _dicom_image(path: Path) -> tuple[np.ndarray, str | None]:
    """(H, W, 3) uint8 from a DICOM image (grey: :func:`_dicom_grey8`, replicated), and what was converted."""
    ds, raw = _dicom_pixels(path)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric in _DICOM_COLOUR and raw.ndim == 3 and raw.shape[2] == 3:
        rgb8, note = _array_to_rgb8(raw, path)
        notes = [f"DICOM {photometric}, converted to RGB"] if photometric != "RGB" else []
        return rgb8, "; ".join(notes + ([note] if note else [])) or None
    if photometric not in ("MONOCHROME1", "MONOCHROME2") or raw.ndim != 2:
        raise DatasetError(f"{path}: unsupported DICOM image (photometric interpretation "
                           f"{photometric or 'missing'}, pixel array {raw.shape})")
    grey, how = _dicom_grey8(ds, raw)
    inverted = ", inverted" if photometric == "MONOCHROME1" else ""
    note = f"DICOM {photometric}: {how} to 8 bits{inverted}, grey replicated to RGB"
    return np.repeat(grey[..., None], 3, axis=2), note


def _dicom_grey8(ds: DicomDataset, raw: np.ndarray) -> tuple[np.ndarray, str]:
    """(H, W) uint8 display values of a MONOCHROME1/2 image, and how its range was chosen.

    The modality LUT (or RescaleSlope / RescaleIntercept), then the VOI LUT (or WindowCenter / WindowWidth)
    as pydicom applies them; the VOI output range becomes 0..255 (no VOI in the file: the min–max of the
    modality values); MONOCHROME1 (0 is white) is inverted last."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(raw, ds)
    lut = ds.get("VOILUTSequence")
    probe: np.ndarray | None = None
    if lut and lut[0].get("LUTDescriptor") is not None and lut[0].get("LUTData") is not None:
        entries, first = lut[0].LUTDescriptor[:2]
        probe, how = np.arange(first, first + (entries or 65536)), "VOI LUT"  # every output it can give
        values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values  # a LUT takes integers
    elif ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        probe, how = np.array([-np.inf, np.inf]), "window"  # below the window: its black; above: its white
    else:
        how = "min-max (no window in the file)"
    shown = apply_voi_lut(values, ds) if probe is not None else values
    ends = apply_voi_lut(probe, ds) if probe is not None else shown
    lo, hi = float(np.min(ends)), float(np.max(ends))
    grey = (np.clip(np.rint((shown - lo) * (255 / (hi - lo))), 0, 255).astype(np.uint8) if hi > lo
            else np.zeros(raw.shape, np.uint8))
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        grey = 255 - grey
    return grey, how


def resize_image(rgb8: np.ndarray, size: int, color_order: str = "rgb") -> np.ndarray:
    """uint8 (3, size, size) from (H, W, 3) uint8: PIL bilinear, channels RGB (or BGR)."""
    a = np.asarray(Image.fromarray(rgb8, "RGB").resize((int(size), int(size)), Image.Resampling.BILINEAR))
    if color_order == "bgr":
        a = a[..., ::-1]
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def read_image(path: Path, size: int, color_order: str = "rgb") -> tuple[np.ndarray, tuple[int, int]]:
    """A single image file as extraction reads it: (uint8 (3, size, size), original (height, width))."""
    check_prep(size, color_order)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    rgb8, _note = decode_image(path)
    return resize_image(rgb8, size, color_order), (int(rgb8.shape[0]), int(rgb8.shape[1]))




def resize_mask(mask01: np.ndarray, size: int, mode: str = "nearest") -> np.ndarray:
    """uint8 (size, size) in {0, 1} from a {0, 1} mask. ``nearest``: PIL's nearest neighbour (the annotation's
    boundary, no new foreground). ``authors``: the authors' ``cv2.resize(mask, (size, size))`` on the 0/255
    mask, then ``> 0`` — any output pixel that touches foreground is foreground, which dilates every object."""
    check_mask_resize(mode)
    if mode == "authors":
        return (cv2_linear_u8(mask01.astype(np.uint8) * 255, size) > 0).astype(np.uint8)
    im = Image.fromarray(mask01, "L").resize((int(size), int(size)), Image.Resampling.NEAREST)
    return np.asarray(im, dtype=np.uint8).copy()


def check_mask_resize(mode: str) -> None:
    if mode not in MASK_RESIZES:
        raise OptionError(f"mask_resize must be one of {list(MASK_RESIZES)}, got {mode!r}", "mask_resize")


def _linear_taps(src: int, dst: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV INTER_LINEAR's two taps per output pixel along one axis: source indices and 11-bit weights.

    Half-pixel centres, ``f = (i + 0.5) * (1 / (dst / src)) - 0.5`` in float32 and no antialiasing when
    shrinking. Columns (``clamp``) take the edge pixel with weight 2048 outside the image; rows keep their
    fractional weight on the edge row repeated (cv2 clamps only the row index)."""
    f = ((np.arange(dst) + 0.5) * (1.0 / (dst / src)) - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    frac = (f - i.astype(np.float32)).astype(np.float32)
    if clamp:
        outside = (i < 0) | (i >= src - 1)
        frac[outside] = 0
        i = np.where(i < 0, 0, np.where(i >= src - 1, src - 1, i))
    w0 = np.rint((np.float32(1) - frac) * np.float32(2048)).astype(np.int64)
    w1 = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(i, 0, src - 1), np.clip(i + 1, 0, src - 1), w0, w1


def cv2_linear_u8(a: np.ndarray, size: int) -> np.ndarray:
    """``cv2.resize(a, (size, size))`` (INTER_LINEAR) of a 2-D uint8 array, bit for bit (int64 out).

    OpenCV's fixed-point path: 11-bit weights; columns first (exact integers), then rows as its SIMD kernel
    rounds them: ``((r0 >> 4) * w0 >> 16) + ((r1 >> 4) * w1 >> 16) + 2 >> 2``. Equal to OpenCV 4.10 and 5.0 on
    every pixel of 90 M random-mask trials, MoNuSeg's and QaTa-COV19's masks, shrinking and enlarging (an exact
    halving, which cv2 hands to INTER_AREA, gives the same values)."""
    h, w = a.shape
    x0, x1, a0, a1 = _linear_taps(w, size, clamp=True)
    y0, y1, b0, b1 = _linear_taps(h, size, clamp=False)
    v = a.astype(np.int64)
    rows = v[:, x0] * a0 + v[:, x1] * a1
    return (((rows[y0] >> 4) * b0[:, None] >> 16) + ((rows[y1] >> 4) * b1[:, None] >> 16) + 2) >> 2


def check_prep(size: int, color_order: str) -> None:
    """Refuse a size that is not a positive integer or a colour order other than rgb / bgr."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if color_order not in ("rgb", "bgr"):
        raise ValueError(f"color_order must be 'rgb' or 'bgr', got {color_order!r}")


def preprocessing(size: int, color_order: str = "rgb") -> dict:
    """The preprocessing that determines the loaded arrays (goes into the cache key): the masks are kept under
    every resizing (``masks``; stores before format 3 held one, their key's ``mask_resize``)."""
    check_prep(size, color_order)
    return {"size": int(size), "image_resize": "pil-bilinear", "masks": list(MASK_RESIZES), "range": [-1.0, 1.0],
            "to_rgb": "grey-replicated,alpha-dropped,16bit-rounded", "color_order": color_order}


@contextlib.contextmanager
def quiet_decoders() -> Iterator[None]:
    """Silence the decoders' own chatter (PIL's warnings, tifffile's and pydicom's logs): a broken file is
    reported once, as one error naming it, not with extra lines from the library that failed to read it."""
    logs = [logging.getLogger(name) for name in ("tifffile", "pydicom")]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)
