"""Figures of stage two: per-image overlays (the paper's Fig. 2), the sweep heat-map (Fig. 3), loss curves.

Overlays are composed with PIL at exact pixel sizes (fast enough for a few thousand test images);
the heat-map and the loss curve use matplotlib's Agg canvas directly (no pyplot, no display).

Overlay layout (all sizes in pixels, ``P = panel_size(S)``)::

    MARGIN | title                                              TITLE_H
    MARGIN | image P×P | MARGIN | ground truth P×P | MARGIN | prediction P×P | MARGIN
           | "image"          | "ground truth"           | "prediction, Dice 0.83"   CAPTION_H
           | the image's text, wrapped, at most TEXT_LINES lines                    LINE_H each
           MARGIN

so the width is always ``3·P + 4·MARGIN`` and the height ``TITLE_H + P + CAPTION_H + lines·LINE_H + MARGIN``.
"""
from __future__ import annotations

import csv
import math
import textwrap
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from train.metrics import dice_iou

__all__ = ["overlay_png", "overlay_image", "panel_size", "overlay_dims", "heatmap_png", "loss_curve_png",
           "GT_COLOR", "PRED_COLOR"]

GT_COLOR = (0, 200, 70)      # green
PRED_COLOR = (235, 40, 40)   # red
MIN_PANEL = 256              # small images are upscaled (nearest, integer factor) to at least this
MARGIN, TITLE_H, CAPTION_H, LINE_H = 8, 26, 22, 17
TEXT_LINES = 4               # longer texts are cut with an ellipsis
TINT = 0.35                  # mask fill opacity; the contour is drawn opaque


@lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib) when found, else PIL's default font."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans:bold" if bold else "DejaVu Sans"), size)
    except Exception:  # pragma: no cover - matplotlib or FreeType missing
        return ImageFont.load_default()


def panel_size(size: int) -> int:
    """Side of one panel for an S×S image: S times the smallest integer factor reaching MIN_PANEL."""
    return size * max(1, math.ceil(MIN_PANEL / size))


def _wrap(text: str | None, width_px: int) -> list[str]:
    if not text:
        return []
    font = _font(13)
    char_w = max(1.0, font.getlength("abcdefghijklmnopqrstuvwxyz") / 26)
    lines = textwrap.wrap(" ".join(text.split()), width=max(10, int(width_px / char_w)))
    if len(lines) > TEXT_LINES:
        lines = lines[:TEXT_LINES]
        lines[-1] = lines[-1][: max(0, len(lines[-1]) - 1)].rstrip() + "…"
    return lines


def overlay_dims(size: int, text: str | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the overlay of an S×S image with ``text``."""
    p = panel_size(size)
    width = 3 * p + 4 * MARGIN
    return width, TITLE_H + p + CAPTION_H + len(_wrap(text, width - 2 * MARGIN)) * LINE_H + MARGIN


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (the image border counts as outside)."""
    m = np.pad(mask, 1, constant_values=False)
    inner = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask & ~inner


def _paint(rgb: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 with ``mask`` tinted and outlined (2 px) in ``color``."""
    out = rgb.astype(np.float32)
    c = np.array(color, np.float32)
    out[mask] = (1 - TINT) * out[mask] + TINT * c
    edge = _boundary(mask)
    edge |= _boundary(mask & ~edge)  # a second pixel inwards: visible at any scale
    out[edge] = c
    return out.round().astype(np.uint8)


def _as_mask(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x) != 0


def overlay_image(image_uint8, target, pred, title: str, text: str | None = None) -> Image.Image:
    """The overlay as a PIL image; see :func:`overlay_png`."""
    image = np.asarray(image_uint8.detach().cpu().numpy() if hasattr(image_uint8, "detach") else image_uint8)
    if image.ndim != 3 or image.shape[0] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (3, S, S) uint8, got {image.shape} {image.dtype}")
    target, pred = _as_mask(target), _as_mask(pred)
    s = image.shape[1]
    if target.shape != image.shape[1:] or pred.shape != image.shape[1:]:
        raise ValueError(f"image {image.shape}, target {target.shape} and pred {pred.shape} differ in size")
    k = panel_size(s) // s

    def up(a: np.ndarray) -> np.ndarray:  # nearest, integer factor
        return np.repeat(np.repeat(a, k, axis=0), k, axis=1)

    rgb, target, pred = up(image.transpose(1, 2, 0)), up(target), up(pred)
    dice, _ = dice_iou(pred, target)
    panels = [(rgb, "image"), (_paint(rgb, target, GT_COLOR), "ground truth"),
              (_paint(rgb, pred, PRED_COLOR), f"prediction, Dice {dice:.2f}")]

    width, height = overlay_dims(s, text)
    p = panel_size(s)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN // 2 + 2), title, fill="black", font=_font(15, bold=True))
    for i, (arr, caption) in enumerate(panels):
        x = MARGIN + i * (p + MARGIN)
        canvas.paste(Image.fromarray(arr), (x, TITLE_H))
        cap_font = _font(13)
        cx = x + (p - cap_font.getlength(caption)) / 2
        draw.text((cx, TITLE_H + p + 4), caption, fill="black", font=cap_font)
    y = TITLE_H + p + CAPTION_H
    for line in _wrap(text, width - 2 * MARGIN):
        draw.text((MARGIN, y), line, fill=(60, 60, 60), font=_font(13))
        y += LINE_H
    return canvas


def overlay_png(image_uint8, target, pred, path: str | Path, title: str, text: str | None = None) -> Path:
    """Write the paper's Fig. 2 style overlay of one image as a PNG; returns ``path``.

    Args:
        image_uint8: (3, S, S) uint8 RGB image (numpy or torch).
        target, pred: (S, S) masks, non-zero = foreground (ground truth, prediction).
        path: the PNG to write (parent folders are created).
        title: the line above the panels (e.g. the image id).
        text: the image's description, wrapped under the panels (cut after TEXT_LINES lines); None = none.

    Three panels side by side, each upscaled (nearest) to ``panel_size(S)``: the image, the ground
    truth tinted and outlined in green over it, the prediction in red with its Dice in the caption.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    overlay_image(image_uint8, target, pred, title, text).save(path, format="PNG", optimize=False)
    return path


def _figure(width: float, height: float):
    """A matplotlib Figure drawn by Agg, outside pyplot (no global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    """Lay out and write a figure as PNG (parent folders created); returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def heatmap_png(table, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path, title: str,
                fmt: str = ".1f", cmap: str = "viridis", colorbar_label: str | None = None,
                row_breaks: Sequence[int] = (), col_breaks: Sequence[int] = ()) -> Path:
    """A heat-map of ``table`` (rows × cols; NaN = missing, drawn grey with "–") with each cell's
    value written as ``format(value, fmt)``; a white line above each row index in ``row_breaks``
    (left of each column index in ``col_breaks``) separates groups; the title is wrapped to the
    figure. Returns ``path``."""
    values = np.asarray(table, dtype=float)
    if values.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"table is {values.shape} but there are {len(row_labels)} row and "
                         f"{len(col_labels)} column labels")
    import matplotlib

    width = max(5.0, 1.6 + 1.5 * len(col_labels))
    lines = [w for line in title.splitlines() for w in (textwrap.wrap(line, int(width * 11)) or [""])]
    fig = _figure(width, 0.9 + 0.2 * len(lines) + 0.42 * len(row_labels))
    ax = fig.subplots()
    masked = np.ma.masked_invalid(values)
    colormap = matplotlib.colormaps[cmap].with_extremes(bad="#dddddd")
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi == lo:
        lo, hi = lo - 0.5, hi + 0.5
    im = ax.imshow(masked, cmap=colormap, vmin=lo, vmax=hi, aspect="auto")
    for r in range(values.shape[0]):
        for c in range(values.shape[1]):
            v = values[r, c]
            if not np.isfinite(v):
                ax.text(c, r, "–", ha="center", va="center", color="black", fontsize=9)
                continue
            shade = (v - lo) / (hi - lo)
            ax.text(c, r, format(v, fmt), ha="center", va="center", fontsize=9,
                    color="black" if shade > 0.6 else "white")
    ax.set_xticks(range(len(col_labels)), labels=list(col_labels))
    ax.set_yticks(range(len(row_labels)), labels=list(row_labels))
    ax.xaxis.tick_top()
    ax.tick_params(length=0)
    for r in row_breaks:
        ax.axhline(r - 0.5, color="white", lw=3)
    for c in col_breaks:
        ax.axvline(c - 0.5, color="white", lw=3)
    ax.set_title("\n".join(lines), fontsize=10, pad=22)
    cbar = fig.colorbar(im, ax=ax, fraction=0.08, pad=0.04)
    if colorbar_label:
        cbar.set_label(colorbar_label, fontsize=9)
    return _save(fig, path)


def loss_curve_png(history_csv: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Train loss (left axis) and validation Dice % (right axis) per epoch from fit's ``history.csv``
    (columns epoch, train_loss, val_dice, ...); the best validation epoch is marked. Returns ``path``."""
    with open(history_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{history_csv}: no epochs recorded")
    epoch = [int(r["epoch"]) for r in rows]
    loss = [float(r["train_loss"]) for r in rows]
    dice = [100 * float(r["val_dice"]) if r.get("val_dice") not in (None, "") else float("nan") for r in rows]
    fig = _figure(6.4, 3.6)
    ax = fig.subplots()
    ax.plot(epoch, loss, color="tab:blue", marker="o" if len(epoch) < 30 else None, ms=3, label="train loss")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (CE + 1.5 Dice)", color="tab:blue")
    ax.tick_params(axis="y", colors="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(epoch, dice, color="tab:red", marker="o" if len(epoch) < 30 else None, ms=3, label="val Dice")
    ax2.set_ylabel("validation Dice (%)", color="tab:red")
    ax2.tick_params(axis="y", colors="tab:red")
    if np.isfinite(dice).any():
        best = int(np.nanargmax(dice))
        ax2.axvline(epoch[best], color="tab:red", ls=":", lw=1)
        right = best >= len(epoch) / 2  # label on the side with room
        ax2.annotate(f"best {dice[best]:.1f}% @ epoch {epoch[best]}", (epoch[best], dice[best]),
                     textcoords="offset points", xytext=(-6 if right else 6, -12), fontsize=8, color="tab:red",
                     ha="right" if right else "left")
    if len(epoch) == 1:
        ax.set_xlim(epoch[0] - 1, epoch[0] + 1)
    ax.set_title(title or f"training — {Path(history_csv).parent.name}", fontsize=10)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def pretrain_curve_png(log_csv: str | Path, path: str | Path, title: str | None = None) -> Path:
    """Diffusion pretraining loss per iteration (faint) and its running mean, from ``train_log.csv``."""
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{log_csv}: no iterations recorded")
    it = np.array([int(r["iteration"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    fig = _figure(6.4, 3.2)
    ax = fig.subplots()
    ax.plot(it, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss")
    ax.plot(it[window - 1:], smooth, color="tab:blue", lw=1.8, label=f"mean of {window}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("‖ε − ε_θ‖² (L_simple)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax.set_title(title or f"diffusion pretraining — {Path(log_csv).parent.name}", fontsize=10)
    return _save(fig, path)
