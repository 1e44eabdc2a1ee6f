"""The frozen extractor: truncated forward equals the full one; batching images × steps is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from extract.diffusion import q_sample
from extract.features import FeatureExtractor
from extract.unet import load_unet


@pytest.fixture(scope="module")
def tiny(tiny_unet: Path):
    return load_unet(tiny_unet / "adm_tiny.pt", tiny_unet / "adm_tiny_flags.json")


def test_truncated_forward_equals_full_forward_and_fixture(adm_fixtures: Path) -> None:
    # the reference blocks were computed with the fixture's own weights: this test loads them
    tiny = load_unet(adm_fixtures / "adm_tiny.pt", adm_fixtures / "adm_tiny_flags.json")
    io = np.load(adm_fixtures / "adm_tiny_io.npz")
    noise = torch.from_numpy(io["noise"][:1])
    ex = FeatureExtractor(tiny, noise, device="cpu")
    calls: list[int] = []
    hooks = [b.register_forward_hook(lambda *_a, k=k: calls.append(k)) for k, b in enumerate(tiny.output_blocks)]
    out_calls: list[int] = []
    hooks.append(tiny.out.register_forward_hook(lambda *_a: out_calls.append(1)))
    feats = ex(torch.from_numpy(io["x0"]), steps=[50, 150, 250], blocks=[4, 6, 8])
    for h in hooks:
        h.remove()
    assert max(calls) == 8 and not out_calls, "the pass must stop after the deepest requested block"
    for t in (50, 150, 250):
        for k in (4, 6, 8):
            ref = io[f"block{k}_t{t}"]
            got = feats[(t, k)].numpy()
            assert got.shape == ref.shape
            assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-5
    # and exactly our own full forward (same batch: images x steps), read by hooks
    x0 = torch.from_numpy(io["x0"])
    t = torch.tensor([50, 50, 150, 150, 250, 250])
    captured: dict[int, torch.Tensor] = {}
    hooks = [tiny.output_blocks[k].register_forward_hook(lambda _m, _i, o, k=k: captured.__setitem__(k, o))
             for k in (4, 6, 8)]
    with torch.no_grad():
        full = tiny(q_sample(x0.repeat(3, 1, 1, 1), t, noise), t)
    for h in hooks:
        h.remove()
    assert full.shape == (6, 6, 64, 64)
    for i, step in enumerate((50, 150, 250)):
        for k in (4, 6, 8):
            assert torch.equal(feats[(step, k)], captured[k][2 * i:2 * i + 2])


def test_block_shapes_and_range(tiny) -> None:
    ex = FeatureExtractor(tiny, torch.zeros(1, 3, 64, 64), device="cpu")
    assert ex.block_shapes()[8] == (32, 64, 64)
    with pytest.raises(ValueError, match="out of range"):
        ex(torch.zeros(1, 3, 64, 64), [50], [12])


def test_bf16_autocast_is_close_to_float32(tiny) -> None:
    torch.manual_seed(0)
    x0 = torch.rand(1, 3, 64, 64) * 2 - 1
    noise = torch.randn(1, 3, 64, 64)
    f32 = FeatureExtractor(tiny, noise, device="cpu")(x0, [50], [6])[(50, 6)]
    bf16 = FeatureExtractor(tiny, noise, device="cpu", autocast=True)(x0, [50], [6])[(50, 6)]
    assert bf16.dtype == torch.float32
    err = float((bf16 - f32).norm() / f32.norm())
    assert 0 < err < 0.05
