"""Metrics (LViT per-image Dice/IoU, global Dice, empty masks) and the CE + Dice loss, on hand cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from train.nets.losses import segmentation_loss, soft_dice_loss
from train.metrics import SMOOTH, SegMetrics, dice_iou

S = SMOOTH

# 2x2: |P∩G| = 1, |P| = 2, |G| = 2, |P∪G| = 3
P2 = np.array([[1, 1], [0, 0]])
G2 = np.array([[1, 0], [1, 0]])
# 3x3: |P∩G| = 3, |P| = 4, |G| = 5, |P∪G| = 6
P3 = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 1]])
G3 = np.array([[1, 1, 1], [1, 1, 0], [0, 0, 0]])


# ---------------------------------------------------------------- per-image Dice / IoU

def test_dice_iou_2x2():
    dice, iou = dice_iou(P2, G2)
    assert dice == pytest.approx((2 * 1 + S) / (2 + 2 + S), abs=1e-12)
    assert iou == pytest.approx((1 + S) / (3 + S), abs=1e-12)
    assert dice == pytest.approx(0.5, abs=1e-5) and iou == pytest.approx(1 / 3, abs=1e-5)


def test_dice_iou_3x3_torch_and_bool_inputs():
    expect = ((6 + S) / (9 + S), (3 + S) / (6 + S))
    assert dice_iou(P3, G3) == pytest.approx(expect, abs=1e-12)
    assert dice_iou(torch.from_numpy(P3), torch.from_numpy(G3).bool()) == pytest.approx(expect, abs=1e-12)


def test_empty_masks():
    empty = np.zeros((3, 3), dtype=bool)
    assert dice_iou(empty, empty) == (1.0, 1.0)  # empty G, empty P → perfect
    one = empty.copy()
    one[1, 1] = True
    dice, iou = dice_iou(one, empty)  # empty G, one false positive → ~0
    assert dice == pytest.approx(S / (1 + S), abs=1e-15) and iou == pytest.approx(S / (1 + S), abs=1e-15)
    assert dice_iou(empty, one) == pytest.approx((S / (1 + S),) * 2, abs=1e-15)  # missed pixel → ~0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        dice_iou(P2, G3)
    with pytest.raises(ValueError):
        SegMetrics().update(P3[None], G3)


# ---------------------------------------------------------------- accumulator

def test_segmetrics_aggregate_hand_values():
    m = SegMetrics()
    m.update(torch.from_numpy(P2)[None], torch.from_numpy(G2)[None])  # batch of one, torch
    m.update(P3, G3)  # a single (H, W) image, numpy
    d = [(2 + S) / (4 + S), (6 + S) / (9 + S)]
    i = [(1 + S) / (3 + S), (3 + S) / (6 + S)]
    agg = m.aggregate()
    assert agg["n_images"] == 2
    assert agg["dice"] == pytest.approx(sum(d) / 2, abs=1e-12)
    assert agg["iou"] == pytest.approx(sum(i) / 2, abs=1e-12)
    assert agg["dice_std"] == pytest.approx(abs(d[0] - d[1]) / 2, abs=1e-12)  # population std of 2 values
    assert agg["iou_std"] == pytest.approx(abs(i[0] - i[1]) / 2, abs=1e-12)
    assert agg["global_dice"] == pytest.approx(2 * (1 + 3) / ((2 + 4) + (2 + 5)))  # 8/13, no smoothing
    rows = m.per_image()
    assert [r["dice"] for r in rows] == pytest.approx(d, abs=1e-12)
    assert [(r["intersection"], r["pred_area"], r["target_area"]) for r in rows] == [(1, 2, 2), (3, 4, 5)]


def test_segmetrics_batch_with_argmax_labels_and_empty_images():
    # int64 labels (argmax output); image 0 empty/empty, image 1 empty G with two predicted pixels
    pred = torch.tensor([[[0, 0], [0, 0]], [[1, 1], [0, 0]]])
    target = torch.zeros(2, 2, 2, dtype=torch.int64)
    m = SegMetrics()
    m.update(pred, target)
    assert [r["dice"] for r in m.per_image()] == pytest.approx([1.0, S / (2 + S)], abs=1e-15)
    agg = m.aggregate()
    assert agg["dice"] == pytest.approx((1.0 + S / (2 + S)) / 2, abs=1e-12)
    assert agg["global_dice"] == 0.0  # 2·0 / (2 + 0)


def test_global_dice_all_empty_is_one_and_reset():
    m = SegMetrics()
    m.update(np.zeros((3, 4, 4)), np.zeros((3, 4, 4)))
    agg = m.aggregate()
    assert agg == dict(dice=1.0, iou=1.0, dice_std=0.0, iou_std=0.0, global_dice=1.0, n_images=3)
    m.reset()
    assert m.per_image() == []
    with pytest.raises(ValueError, match="no images"):
        m.aggregate()


# ---------------------------------------------------------------- loss
# two pixels (1x2 image): A logits (0, 0) target 1 → p = (.5, .5); B logits (ln 3, 0) target 0 → p = (.75, .25)

LOGITS = torch.tensor([[0.0, math.log(3.0)], [0.0, 0.0]]).reshape(1, 2, 1, 2)
TARGET = torch.tensor([[[1, 0]]])
CE = (math.log(2.0) + math.log(4 / 3)) / 2
D1 = (2 * 0.5 + S) / ((0.25 + 0.0625) + 1 + S)  # class 1: p = (.5, .25), t = (1, 0)
D0 = (2 * 0.75 + S) / ((0.25 + 0.5625) + 1 + S)  # class 0: p = (.5, .75), t = (0, 1)


def test_cross_entropy_alone():
    assert segmentation_loss(LOGITS, TARGET, dice_weight=0.0).item() == pytest.approx(CE, abs=1e-6)


def test_dice_term_on_softmax():
    probs = torch.softmax(LOGITS, dim=1)
    assert soft_dice_loss(probs, TARGET).item() == pytest.approx(1 - (D0 + D1) / 2, abs=1e-6)
    assert soft_dice_loss(probs, TARGET, include_background=False).item() == pytest.approx(1 - D1, abs=1e-6)
    total = segmentation_loss(LOGITS, TARGET)
    assert total.item() == pytest.approx(CE + 1.5 * (1 - (D0 + D1) / 2), abs=1e-6)


def test_dice_on_logits_reproduces_authors_bug():
    # raw logits: class 1 scores (0, 0) vs t = (1, 0) → I = 0, D1 = s/(0 + 1 + s) ≈ 0;
    # class 0 scores (0, ln 3) vs t = (0, 1) → I = ln 3, D0 = (2 ln 3 + s)/(ln² 3 + 1 + s)
    ln3 = math.log(3.0)
    d1 = S / (1 + S)
    d0 = (2 * ln3 + S) / (ln3 ** 2 + 1 + S)
    bug = segmentation_loss(LOGITS, TARGET, dice_on_logits=True)
    assert bug.item() == pytest.approx(CE + 1.5 * (1 - (d0 + d1) / 2), abs=1e-6)
    assert abs(bug.item() - segmentation_loss(LOGITS, TARGET).item()) > 0.1


def test_dice_pools_over_batch_and_perfect_prediction():
    target = torch.tensor([[[1, 0], [0, 0]], [[0, 0], [0, 0]]])
    onehot = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert soft_dice_loss(onehot, target).item() == pytest.approx(0.0, abs=1e-7)
    # confident correct logits: CE ≈ 0 and Dice ≈ 0; the loss has a finite gradient
    logits = (20.0 * (2 * onehot - 1)).requires_grad_()
    loss = segmentation_loss(logits, target)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and torch.isfinite(logits.grad).all()
