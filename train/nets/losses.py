"""Training loss: cross-entropy + 1.5 × soft Dice, as in the authors' ``train.py``.

Soft Dice per class c (the authors' ``DiceLoss(n_classes=2)``, TransUNet's form, squared
denominator, sums over every pixel of the whole batch)::

    D_c  = (2 Σ s_c·t_c + 1e-5) / (Σ s_c² + Σ t_c² + 1e-5)
    dice = mean over the classes used of (1 − D_c)

with t_c the one-hot target and s_c the softmax probability of class c (default) or, with
``dice_on_logits=True``, the raw logit — what the authors' code actually does (``softmax=False``),
reproduced as a flag. LViT's ``WeightedDiceLoss`` has the same numerator/denominator shape (squared
sums, smooth 1e-5) on the foreground only, per image: ``include_background=False`` gives the
foreground-only variant (batch-pooled; identical per image at batch size 1, the paper's setting).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_dice_loss", "segmentation_loss", "DICE_SMOOTH"]

DICE_SMOOTH = 1e-5


def soft_dice_loss(scores: Tensor, target: Tensor, include_background: bool = True,
                   smooth: float = DICE_SMOOTH) -> Tensor:
    """Mean over classes of 1 − (2Σst + smooth)/(Σs² + Σt² + smooth), pooled over the batch.

    Args:
        scores: (B, K, H, W) per-class scores (probabilities, or raw logits to mimic the authors).
        target: (B, H, W) int64 class indices in [0, K).
        include_background: average over all K classes (authors); False = classes 1..K-1 only.
        smooth: added to numerator and denominator. Default 1e-5.
    """
    onehot = F.one_hot(target.long(), scores.shape[1]).permute(0, 3, 1, 2).to(scores.dtype)
    if not include_background:
        scores, onehot = scores[:, 1:], onehot[:, 1:]
    dims = (0, 2, 3)
    inter = (scores * onehot).sum(dims)
    denom = (scores * scores).sum(dims) + (onehot * onehot).sum(dims)
    return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def segmentation_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.5, dice_on_logits: bool = False,
                      include_background: bool = True, smooth: float = DICE_SMOOTH) -> Tensor:
    """CE(logits, target) + dice_weight × soft Dice; a scalar.

    Args:
        logits: (B, K, H, W) raw head output.
        target: (B, H, W) int64 labels ({0, 1} for the binary datasets).
        dice_weight: weight of the Dice term. Default 1.5 (paper and code).
        dice_on_logits: feed raw logits to the Dice term (the authors' bug). Default False (softmax).
        include_background, smooth: see :func:`soft_dice_loss`.
    """
    target = target.long()
    ce = F.cross_entropy(logits, target)
    scores = logits if dice_on_logits else torch.softmax(logits, dim=1)
    return ce + dice_weight * soft_dice_loss(scores, target, include_background, smooth)
