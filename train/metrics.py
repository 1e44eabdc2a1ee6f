"""Segmentation metrics as LViT (and the TextDiff paper) report them, on binary masks.

Per image, with P the predicted foreground (argmax == 1, i.e. any non-zero value) and G the
ground truth::

    Dice = (2|P∩G| + 1e-5) / (|P| + |G| + 1e-5)
    IoU  = (|P∩G| + 1e-5)  / (|P∪G| + 1e-5)

averaged over images. Empty-mask policy, which follows from the formulas: empty G and empty P
scores 1.0 (Dice and IoU); empty G with any predicted pixel scores ~0 (1e-5/(|P|+1e-5)).
The dataset-level global Dice pools the counts over all images, without smoothing:
2Σ|P∩G| / (Σ|P| + Σ|G|), defined as 1.0 when every P and G is empty.
Standard deviations are population (ddof=0) over images.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["SMOOTH", "dice_iou", "SegMetrics"]

SMOOTH = 1e-5


def _as_bool(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x) != 0


def _counts(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(N, 4) int64 rows of |P∩G|, |P|, |G|, |P∪G| over the trailing two axes."""
    axes = (-2, -1)
    return np.stack([(pred & target).sum(axes), pred.sum(axes), target.sum(axes), (pred | target).sum(axes)],
                    axis=-1).reshape(-1, 4).astype(np.int64)


def _scores(inter: int, p: int, g: int, union: int) -> tuple[float, float]:
    return (2 * inter + SMOOTH) / (p + g + SMOOTH), (inter + SMOOTH) / (union + SMOOTH)


def dice_iou(pred: Any, target: Any) -> tuple[float, float]:
    """(Dice, IoU) of one (H, W) mask pair (numpy or torch; non-zero = foreground)."""
    p, g = _as_bool(pred), _as_bool(target)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"need two (H, W) masks of one shape, got {p.shape} and {g.shape}")
    return _scores(*(int(v) for v in _counts(p, g)[0]))


class SegMetrics:
    """Accumulator (MONAI style): ``update`` per batch → ``per_image`` / ``aggregate`` → ``reset``."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []

    def reset(self) -> None:
        self._rows.clear()

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch: pred (B, H, W) bool or int labels (argmax), target (B, H, W); (H, W) = one image."""
        p, g = _as_bool(pred), _as_bool(target)
        if p.shape != g.shape or p.ndim not in (2, 3):
            raise ValueError(f"need (B, H, W) or (H, W) masks of one shape, got {p.shape} and {g.shape}")
        self._rows.append(_counts(p, g))

    def _table(self) -> np.ndarray:
        return np.concatenate(self._rows) if self._rows else np.zeros((0, 4), np.int64)

    def per_image(self) -> list[dict[str, float | int]]:
        """One dict per image in update order: dice, iou, intersection, pred_area, target_area."""
        out = []
        for inter, p, g, union in self._table().tolist():
            dice, iou = _scores(inter, p, g, union)
            out.append(dict(dice=dice, iou=iou, intersection=inter, pred_area=p, target_area=g))
        return out

    def aggregate(self) -> dict[str, float | int]:
        """dice, iou (means over images), dice_std, iou_std (ddof=0), global_dice, n_images."""
        table = self._table()
        if not len(table):
            raise ValueError("no images: call update() before aggregate()")
        scores = np.array([_scores(*row) for row in table.tolist()])
        inter, p, g = table[:, 0].sum(), table[:, 1].sum(), table[:, 2].sum()
        global_dice = 1.0 if p + g == 0 else float(2 * inter / (p + g))
        return dict(dice=float(scores[:, 0].mean()), iou=float(scores[:, 1].mean()),
                    dice_std=float(scores[:, 0].std()), iou_std=float(scores[:, 1].std()),
                    global_dice=global_dice, n_images=int(len(table)))
