"""The head's first classifier conv without the full-resolution concatenation (exact, less work).

A 3×3 conv over ``concat(up(x_1), …, up(x_n))`` is ``Σ_i conv_i(up(x_i))`` (it is linear in its
input channels), and a 3×3 conv is ``Σ_k shift_k(W_k ·)`` over its nine taps k, with ``W_k`` a 1×1
channel mix and ``shift_k`` a zero-padded spatial shift. Bilinear upsampling acts on each channel
alike, so it commutes with the channel mix: ``W_k · up(x) = up(W_k · x)``. A scale below the output
size is therefore mixed to 9·out channels at its native resolution (a quarter to a 64th of the work),
upsampled, summed over scales, and shifted once at full resolution. A scale already at full size is
mixed the same way when it is channels-last (a text block's output: a conv would copy it to
channels-first, forward and backward), and keeps the literal conv when it is channels-first. A text vector that is constant over space (fusion "concat") enters as
nine per-tap constants, which the zero padding cuts at the borders exactly as the literal conv does.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_first_conv", "shift_sum"]


def _ranges(k: int, h: int, w: int) -> tuple[slice, slice, slice, slice]:
    """Tap k's output rows/cols and the input rows/cols they read (offset (ky-1, kx-1), zeros outside)."""
    dy, dx = k // 3 - 1, k % 3 - 1
    return (slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx)),
            slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), w + min(0, dx)))


class _ShiftSum(torch.autograd.Function):
    """Σ_k shift_k(taps[:, k]) by sliced in-place adds; its backward writes the nine shifted gradients
    into one buffer (autograd's own backward of slicing would zero-fill and copy nine full tensors)."""

    @staticmethod
    def forward(ctx, taps: Tensor) -> Tensor:  # type: ignore[override]
        ctx.taps_shape = taps.shape
        b, _, o, h, w = taps.shape
        out = taps.new_zeros(b, h, w, o).permute(0, 3, 1, 2)  # channels-last, as the taps usually are
        for k in range(9):
            ry, rx, sy, sx = _ranges(k, h, w)
            out[:, :, ry, rx] += taps[:, k, :, sy, sx]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        b, nine, o, h, w = ctx.taps_shape
        out = grad.new_zeros(b, h, w, nine, o).permute(0, 3, 4, 1, 2)
        for k in range(9):
            ry, rx, sy, sx = _ranges(k, h, w)
            out[:, k, :, sy, sx] = grad[:, :, ry, rx]
        return out


def shift_sum(taps: Tensor) -> Tensor:
    """(B, 9, O, H, W) per-tap maps → (B, O, H, W): Σ_k tap k read at offset (ky-1, kx-1), zeros outside."""
    return _ShiftSum.apply(taps)


def _mix(x: Tensor, weight: Tensor) -> Tensor:
    """(B, C, h, w) · (9·O, C) → (B, 9·O, h, w) as one matmul over pixels (any memory format of x)."""
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for a channels-last x
    return (pixels @ weight.t()).view(b, h, w, -1).permute(0, 3, 1, 2)


def fused_first_conv(maps: Sequence[Tensor], size: tuple[int, int], weight: Tensor, bias: Tensor | None,
                     constant: Tensor | None = None) -> Tensor:
    """``conv2d(cat([up(m) for m in maps] + [constant map]), weight, bias, padding=1)`` without the concat.

    ``maps``: (B, C_i, h_i, w_i) at native resolution, upsampled bilinearly (align_corners=False) to
    ``size``; ``constant``: (B, C_t) broadcast over space as the last channels; ``weight``:
    (O, ΣC_i + C_t, 3, 3).
    """
    out_ch = weight.shape[0]
    taps = weight.permute(2, 3, 0, 1)  # (3, 3, O, C): tap k = ky*3 + kx
    out: Tensor | None = None
    acc: Tensor | None = None
    start = 0
    for m in maps:
        c = m.shape[1]
        w = weight[:, start:start + c]
        full = tuple(m.shape[-2:]) == tuple(size)
        if full and m.is_contiguous():  # channels-first at full size: the literal conv is as fast
            y = F.conv2d(m, w, None, padding=1)
            out = y if out is None else out + y
        else:
            y = _mix(m, taps[:, :, :, start:start + c].reshape(9 * out_ch, c))
            if not full:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            acc = y if acc is None else acc + y
        start += c
    if constant is not None:
        v = (constant @ taps[:, :, :, start:].reshape(9 * out_ch, -1).t())[:, :, None, None]
        acc = v.expand(-1, -1, *size) if acc is None else acc + v
    if acc is not None:
        shifted = shift_sum(acc.unflatten(1, (9, out_ch)))
        out = shifted if out is None else out + shifted
    assert out is not None
    return out if bias is None else out + bias[:, None, None]
