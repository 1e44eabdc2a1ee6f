"""The head's first classifier conv without the full-resolution concatenation (exact, less work).

A 3×3 conv over ``concat(up(x_1), …, up(x_n))`` is ``Σ_i conv_i(up(x_i))`` (it is linear in its
input channels), and a 3×3 conv is ``Σ_k shift_k(W_k ·)`` over its nine taps k, with ``W_k`` a 1×1
channel mix and ``shift_k`` a zero-padded spatial shift. Bilinear upsampling acts on each channel
alike, so it commutes with the channel mix: ``W_k · up(x) = up(W_k · x)``. A scale below the output
size is therefore mixed to 9·out channels at its native resolution (a quarter to a 64th of the work).
Upsampling and shifting are separable linear maps, one per axis: ``shift_k ∘ up = R_y^{ky} ⊗ R_x^{kx}``
with ``R^d`` (out × in) the bilinear interpolation matrix read one pixel off (``d`` = -1, 0, 1; zero
rows past the border, as the conv's zero padding), so ``Σ_k shift_k(up(t_k))`` is two small matmuls
per scale (:func:`upsample_shift_sum`) and no 9·out-channel map is ever made at full resolution. A
scale already at full size keeps the literal conv (in either memory format: a text block's
channels-last output goes to the channels-last kernel as it is). A text vector that is constant over
space (fusion "concat") enters as nine per-tap constants, which go through the same matrices.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_first_conv", "interpolation_matrix", "upsample_shift_sum"]


@lru_cache(maxsize=64)
def _interpolation(n_in: int, n_out: int, shift: int) -> Tensor:
    src = torch.arange(n_out, dtype=torch.float64) + shift
    inside = (src >= 0) & (src < n_out)
    # torch's upsample_bilinear2d, align_corners=False: src = (dst + ½)·in/out − ½, clamped at 0
    pos = ((src + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    lo = pos.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = pos - lo
    rows = torch.arange(n_out)[inside]
    matrix = torch.zeros(n_out, n_in, dtype=torch.float64)
    matrix.index_put_((rows, lo[inside]), (1 - frac)[inside], accumulate=True)
    matrix.index_put_((rows, hi[inside]), frac[inside], accumulate=True)
    return matrix


def interpolation_matrix(n_in: int, n_out: int, shift: int = 0, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str = "cpu") -> Tensor:
    """(n_out, n_in): bilinear upsampling along one axis (align_corners=False), read at output index
    ``i + shift`` (rows past either end are zero: a conv's zero padding)."""
    return _interpolation(n_in, n_out, shift).to(device=device, dtype=dtype)


def upsample_shift_sum(taps: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-tap maps, pixel-major (B, h, w, 3[kx], 3[ky], O) → (B, O, H, W): ``Σ_k shift_k(up(taps_k))``,
    i.e. each tap upsampled bilinearly to ``size`` and read at offset (ky-1, kx-1) with zeros outside.

    Two batched matmuls on views, no copy of the taps: columns (contracting w and kx, which lie side by
    side in memory), then rows (contracting h and ky). The result is a (B, H, O, W) tensor seen as
    (B, O, H, W).
    """
    b, h, w, _, _, o = taps.shape
    H, W = size
    opts = dict(dtype=taps.dtype, device=taps.device)
    rx = torch.stack([interpolation_matrix(w, W, d, **opts) for d in (-1, 0, 1)], 2).view(W, 3 * w)  # (W, (w, kx))
    ry = torch.stack([interpolation_matrix(h, H, d, **opts) for d in (-1, 0, 1)], 2).view(H, 3 * h)  # (H, (h, ky))
    cols = taps.reshape(b * h, 3 * w, 3 * o).transpose(1, 2) @ rx.t()   # (B·h, (ky, O), W)
    rows = ry @ cols.view(b, 3 * h, o * W)                              # (B, H, (O, W))
    return rows.view(b, H, o, W).transpose(1, 2)


def _mix(x: Tensor, weight: Tensor) -> Tensor:
    """(B, C, h, w) · (9·O, C) → (B, h, w, 9·O) pixel-major, as one matmul over pixels (any memory format of x)."""
    b, c, h, w = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for a channels-last x
    return (pixels @ weight.t()).view(b, h, w, -1)


def fused_first_conv(maps: Sequence[Tensor], size: tuple[int, int], weight: Tensor, bias: Tensor | None,
                     constant: Tensor | None = None) -> Tensor:
    """``conv2d(cat([up(m) for m in maps] + [constant map]), weight, bias, padding=1)`` without the concat.

    ``maps``: (B, C_i, h_i, w_i) at native resolution, upsampled bilinearly (align_corners=False) to
    ``size``; ``constant``: (B, C_t) broadcast over space as the last channels; ``weight``:
    (O, ΣC_i + C_t, 3, 3).
    """
    out_ch = weight.shape[0]
    taps = weight.permute(3, 2, 0, 1)  # (3[kx], 3[ky], O, C), the order upsample_shift_sum reads
    out: Tensor | None = None
    start = 0
    for m in maps:
        c = m.shape[1]
        if tuple(m.shape[-2:]) == tuple(size):  # full size: the literal conv, whatever the memory format
            y = F.conv2d(m, weight[:, start:start + c], None, padding=1)
        else:
            mixed = _mix(m, taps[:, :, :, start:start + c].reshape(9 * out_ch, c))
            y = upsample_shift_sum(mixed.unflatten(3, (3, 3, out_ch)), size)
        out = y if out is None else out + y
        start += c
    if constant is not None:
        v = constant @ taps[:, :, :, start:].reshape(9 * out_ch, -1).t()
        y = upsample_shift_sum(v.view(-1, 1, 1, 3, 3, out_ch), size)  # a 1×1 map "upsampled" is constant; the shifts cut the borders
        out = y if out is None else out + y
    assert out is not None
    return out if bias is None else out + bias[:, None, None]
