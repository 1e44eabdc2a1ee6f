"""The fast head (train.nets.fastconv) computes the literal head's function: logits, gradients, fits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from train.nets.fastconv import fused_first_conv, interpolation_matrix, upsample_shift_sum
from train.fit import FitConfig, fit
from train.nets.head import TextDiffHead
from train.runs.rundir import load_weights

from helpers import tiny_store

# the paper's feature shapes (channels = 3 steps × C of a block, native size), output 256 px
SHAPES = {"monuseg": ([1536, 1536, 768, 768], [32, 64, 128, 256]),
          "qata": ([3072, 1536, 1536, 768], [16, 32, 64, 128])}
SLOW = pytest.mark.slow  # ~40 s each on 2 shared cores
CASES = [("monuseg", dict(fusion="cross-attn")),
         pytest.param("monuseg", dict(fusion="cross-attn", shared_block=False, pos_enc=True), marks=SLOW),
         pytest.param("monuseg", dict(fusion="concat", pos_enc=True), marks=SLOW),
         ("qata", dict(fusion="concat")),
         ("qata", dict(fusion="none", pos_enc=True, norm="batch"))]


def run(head: TextDiffHead, impl: str, dtype: torch.dtype, channels: list[int], sizes: list[int],
        out: int) -> dict[str, torch.Tensor]:
    """Logits and the gradients of every parameter and input, for seeded inputs and cotangent."""
    gen = torch.Generator().manual_seed(1)
    feats = [torch.randn(1, c, s, s, generator=gen, dtype=dtype).requires_grad_() for c, s in zip(channels, sizes)]
    tokens = torch.randn(1, 5, 48, generator=gen, dtype=dtype).requires_grad_()
    mask = torch.tensor([[True, True, True, False, False]])  # padding
    head = head.to(dtype)
    head.zero_grad(set_to_none=True)
    logits = head(feats, tokens, mask, out_size=out, impl=impl)
    logits.backward(torch.randn(1, 2, out, out, generator=gen, dtype=dtype))
    result = {"logits": logits.detach()}
    result.update({f"grad {n}": p.grad.clone() for n, p in head.named_parameters()})
    result.update({f"grad input {k}": t.grad.clone() for k, t in enumerate([*feats, tokens]) if t.grad is not None})
    return result


def compare(channels: list[int], sizes: list[int], dim: int, out: int = 256, **kw) -> None:
    """The fast path equals the literal one: in float64 to 1e-9 of each tensor's scale (the same function),
    and in float32 its error against the float64 truth is within float32 tolerance of the literal path's own.

    A float32 gradient that flows through the classifier's per-image norms loses digits to cancellation
    in both paths alike (a conv bias before a norm has true gradient 0), hence the second criterion.
    """
    torch.manual_seed(0)
    head = TextDiffHead(channels, text_dim=48, dim=dim, heads=2, head_dim=16, **kw)
    head.init_weights()
    with torch.no_grad():  # non-zero biases, so that the bias handling is checked too
        for name, p in head.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    truth = run(head, "literal", torch.float64, channels, sizes, out)
    fast64 = run(head, "fast", torch.float64, channels, sizes, out)
    literal32 = run(head, "literal", torch.float32, channels, sizes, out)
    fast32 = run(head, "fast", torch.float32, channels, sizes, out)
    assert truth.keys() == fast64.keys() == fast32.keys()
    for key, t in truth.items():
        # a bias's scale is its weight's (a conv bias before a norm has gradient 0, up to rounding)
        scale = max(t.abs().max().item(), truth.get(key.replace(".bias", ".weight"), t).abs().max().item())
        torch.testing.assert_close(fast64[key], t, rtol=1e-9, atol=1e-9 * scale + 1e-15, msg=lambda m: f"{key}: {m}")
        err_fast = (fast32[key].double() - t).abs().max().item()
        err_literal = (literal32[key].double() - t).abs().max().item()
        assert err_fast <= 2 * err_literal + 1e-5 * scale + 1e-12, (key, err_fast, err_literal, scale)


def _case_id(case) -> str:
    shape, kw = case.values if hasattr(case, "values") else case
    return f"{shape}-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("shape,kw", CASES, ids=[_case_id(c) for c in CASES])
def test_fast_equals_literal_on_the_paper_shapes(shape: str, kw: dict) -> None:
    channels, sizes = SHAPES[shape]
    compare([c // 16 for c in channels], sizes, dim=16, **kw)  # channels cut 16×; the paper's spatial sizes


def test_fast_equals_literal_with_identity_projections_and_a_full_size_contiguous_scale() -> None:
    compare([16, 16, 24], [8, 16, 16], dim=16, out=16, fusion="none")    # the literal conv branch
    compare([16, 40, 16], [4, 16, 7], dim=16, out=12, fusion="concat")   # odd sizes, down- and upsampled


@pytest.mark.slow
def test_fast_equals_literal_at_the_papers_monuseg_width() -> None:  # ~5 min on 2 shared cores
    channels, sizes = SHAPES["monuseg"]
    compare(channels, sizes, dim=768)


@pytest.mark.parametrize("h,w,size", [(5, 4, (5, 4)), (3, 4, (8, 12)), (4, 3, (7, 13)), (1, 1, (6, 5))])
def test_upsample_shift_sum_is_upsampling_then_a_padded_one_hot_conv(h: int, w: int, size: tuple[int, int]) -> None:
    taps = torch.randn(2, h, w, 3, 3, 3, dtype=torch.float64, requires_grad=True)  # (B, h, w, kx, ky, O)
    onehot = torch.zeros(3, 9, 3, 3, dtype=torch.float64)
    for k in range(9):
        onehot[:, k, k // 3, k % 3] = 1  # tap k = ky·3 + kx reads offset (ky-1, kx-1)
    maps = taps.permute(0, 5, 4, 3, 1, 2).reshape(2, 27, h, w)  # channels (O, ky, kx)
    ref = F.conv2d(F.interpolate(maps, size=size, mode="bilinear", align_corners=False), onehot, groups=3, padding=1)
    torch.testing.assert_close(upsample_shift_sum(taps, size), ref)
    assert torch.autograd.gradcheck(lambda t: upsample_shift_sum(t, size), (taps,))


def test_interpolation_matrix_is_torchs_bilinear_with_a_shift() -> None:
    m = interpolation_matrix(2, 4, dtype=torch.float64)
    assert m.tolist() == [[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]]  # half-pixel centres, clamped ends
    assert interpolation_matrix(2, 4, 1, dtype=torch.float64).tolist() == [[0.75, 0.25], [0.25, 0.75], [0, 1], [0, 0]]
    assert interpolation_matrix(2, 4, -1, dtype=torch.float64).tolist() == [[0, 0], [1, 0], [0.75, 0.25], [0.25, 0.75]]


def test_fused_first_conv_equals_the_concatenated_conv() -> None:
    torch.manual_seed(1)
    maps = [torch.randn(1, 3, 4, 4, dtype=torch.float64), torch.randn(1, 2, 8, 8, dtype=torch.float64)]
    text = torch.randn(1, 5, dtype=torch.float64)
    weight, bias = torch.randn(6, 10, 3, 3, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    up = [F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=False) for m in maps]
    ref = F.conv2d(torch.cat([*up, text[:, :, None, None].expand(-1, -1, 8, 8)], 1), weight, bias, padding=1)
    torch.testing.assert_close(fused_first_conv(maps, (8, 8), weight, bias, text), ref)


def test_impl_is_no_part_of_config_or_state_and_is_checked() -> None:
    head = TextDiffHead([8, 8], text_dim=8, dim=8, heads=1, head_dim=8)
    assert head.impl == "fast" and "impl" not in head.config
    other = TextDiffHead(**head.config)
    other.impl = "literal"
    other.load_state_dict(head.state_dict())
    feats, tokens = [torch.randn(1, 8, 4, 4), torch.randn(1, 8, 8, 8)], torch.randn(1, 3, 8)
    torch.testing.assert_close(other(feats, tokens), head(feats, tokens), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="impl"):
        head(feats, tokens, impl="quick")


def test_a_short_fit_gives_the_same_metrics_with_either_path(tiny_unet: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    store = tiny_store(tiny_unet, tmp_path / "cache")
    metrics, weights = {}, {}
    for impl in ("literal", "fast"):
        monkeypatch.setattr(TextDiffHead, "impl", impl)
        metrics[impl] = fit(FitConfig.flat(cache=store, out=tmp_path / impl, epochs=2, dim=16, head_channels=(8, 4)))
        weights[impl] = load_weights(tmp_path / impl)
    for key in ("best_val_dice", "best_epoch"):
        assert metrics["fast"][key] == pytest.approx(metrics["literal"][key], rel=1e-3, abs=1e-4), key
    # a conv bias right before a per-image norm has no effect and gradient 0 up to rounding, which Adam
    # turns into steps of the learning rate's size in either direction: those two are not compared
    for name, w in weights["literal"].items():
        if name in ("classifier.0.bias", "classifier.3.bias"):
            continue
        torch.testing.assert_close(weights["fast"][name], w, rtol=1e-3, atol=1e-4, msg=name)
