"""`pipeline pretrain`: the loss goes down, the result feeds `extract`, resume is the same run."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.store import FeatureStore
from extract.datasets import Dataset
from extract.diffusion import p_sample_loop, spaced_timesteps
from extract.pretrain import PRETRAIN_PRESETS, PretrainConfig, _batch, load_images, pretrain
from extract.run import ExtractConfig, run_extract
from extract.shared import dihedral, to_unit_range
from extract.unet import create_unet, load_unet
from helpers import quiet

TINY = {"image_size": 32, "num_channels": 32, "num_res_blocks": 1, "channel_mult": "1,2",
        "attention_resolutions": "8", "num_head_channels": 16, "learn_sigma": False}
COUNTS = {"train": 6, "val": 2, "test": 2}


@pytest.fixture()
def cfg(tmp_path: Path) -> PretrainConfig:
    flags = tmp_path / "tiny.json"
    flags.write_text(json.dumps(TINY))
    return PretrainConfig(dataset="synthetic", out=tmp_path / "pre", size=32, flags=str(flags), iterations=12,
                          batch_size=4, lr=1e-3, checkpoint_every=4, samples=4, sample_steps=5,
                          dataset_options={"counts": COUNTS})


def losses(run: Path) -> list[float]:
    with (run / "train_log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_loss_goes_down_and_outputs_are_written(cfg: PretrainConfig) -> None:
    out = pretrain(replace(cfg, iterations=40), console=quiet())
    assert sorted(p.name for p in out.iterdir()) == ["flags.json", "model.pt", "samples.png", "state.pt",
                                                    "train_log.csv"]
    loss = losses(out)
    assert len(loss) == 40
    assert np.mean(loss[-8:]) < 0.7 * np.mean(loss[:4]), (loss[:4], loss[-8:])
    grid = np.asarray(Image.open(out / "samples.png"))
    assert grid.shape == (64, 64, 3) and grid.std() > 0  # 4 samples in a 2 x 2 grid of 32 px
    sd = torch.load(out / "model.pt", weights_only=True)  # guided-diffusion's plain state_dict format
    assert set(sd) == set(create_unet(**json.loads((out / "flags.json").read_text())).state_dict())


def test_checkpoint_round_trips_through_extract(cfg: PretrainConfig, tmp_path: Path) -> None:
    out = pretrain(cfg, console=quiet())
    model = load_unet(out / "model.pt", out / "flags.json")
    assert model.output_block_shapes(32)[-1] == (32, 32, 32)
    store = run_extract(ExtractConfig(dataset="synthetic", unet=str(out), text_encoder="minilm", size=32,
                                      steps=(50,), blocks=(1, 3), cache_dir=tmp_path / "cache",
                                      dataset_options={"counts": COUNTS}), console=quiet())
    fs = FeatureStore.open(store)
    assert fs.info()["splits"]["test"]["complete"] == 2
    assert fs.key["unet"]["flags"]["num_channels"] == 32
    assert np.isfinite(fs.features("train", 50, 3).compute()).all()


def test_resume_continues_the_same_run(cfg: PretrainConfig, tmp_path: Path) -> None:
    whole = pretrain(replace(cfg, out=tmp_path / "whole"), console=quiet())
    part = replace(cfg, out=tmp_path / "part", iterations=8)
    pretrain(part, console=quiet())
    with pytest.raises(ValueError, match="resume=True"):
        pretrain(replace(part, iterations=12), console=quiet())
    resumed = pretrain(replace(part, iterations=12, resume=True), console=quiet())
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (whole, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(whole) == losses(resumed)


def test_images_only_train_split_no_masks(cfg: PretrainConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_masks(*_a, **_k):
        raise AssertionError("pretraining must never read a mask")

    monkeypatch.setattr(Dataset, "load_mask", no_masks)
    assert load_images(cfg).shape == (6, 3, 32, 32)
    assert load_images(replace(cfg, splits=("train", "test"))).shape == (8, 3, 32, 32)
    pretrain(replace(cfg, iterations=2), console=quiet())


def test_random_crops_are_windows_of_the_views(cfg: PretrainConfig, tmp_path: Path) -> None:
    images = np.arange(2 * 3 * 8 * 8, dtype=np.uint8).reshape(2, 3, 8, 8)
    batch = _batch(images, np.random.default_rng(0), 32, crop=4)
    assert batch.shape == (32, 3, 4, 4)
    views = [torch.from_numpy(to_unit_range(dihedral(im, v))) for im in images for v in range(8)]
    windows = [w[:, y:y + 4, x:x + 4] for w in views for y in range(5) for x in range(5)]
    assert all(any(torch.equal(b, w) for w in windows) for b in batch)  # every sample is a window of a view
    assert len({tuple(b.flatten().tolist()) for b in batch}) > 16       # and they vary

    out = pretrain(replace(cfg, size=64, crop=32, iterations=4), console=quiet())
    assert np.asarray(Image.open(out / "samples.png")).shape == (64, 64, 3)  # samples at the crop size
    with pytest.raises(ValueError, match="crop"):
        pretrain(replace(cfg, size=64, crop=16, iterations=8, resume=True), console=quiet())
    with pytest.raises(ValueError, match="crop 48 must be"):
        pretrain(replace(cfg, out=tmp_path / "x", size=32, crop=48), console=quiet())


def test_presets_and_sampler() -> None:
    cpu = create_unet(**PRETRAIN_PRESETS["cpu-64"])
    assert len(cpu.output_blocks) == 12 and cpu.output_block_shapes(64)[8] == (32, 64, 64)
    with torch.device("meta"):
        gpu = create_unet(**PRETRAIN_PRESETS["gpu-256"])
    assert len(gpu.output_blocks) == 18 and gpu.output_block_shapes(256)[16][1:] == (256, 256)
    assert list(spaced_timesteps(5)) == [0, 250, 500, 749, 999] and len(spaced_timesteps(1000)) == 1000
    model = create_unet(**TINY).eval()
    a = p_sample_loop(model, (2, 3, 32, 32), 4, torch.Generator().manual_seed(0))
    b = p_sample_loop(model, (2, 3, 32, 32), 4, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.abs().max() <= 1.0 + 1e-6


def test_sampler_recovers_the_image_of_an_oracle_noise_predictor() -> None:
    """With the true ε (for a known x0), respaced ancestral sampling lands exactly on x0."""
    from extract.diffusion import sqrt_alphas_cumprod

    sa, s1 = sqrt_alphas_cumprod()
    target = torch.linspace(-0.8, 0.8, 3 * 8 * 8).view(1, 3, 8, 8)

    class Oracle(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a = torch.from_numpy(sa[t.numpy()]).float().view(-1, 1, 1, 1)
            b = torch.from_numpy(s1[t.numpy()]).float().view(-1, 1, 1, 1)
            return (x - a * target) / b

    out = p_sample_loop(Oracle(), (2, 3, 8, 8), 50, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), rtol=0, atol=1e-6)


def test_resume_state_holds_only_tensors_and_plain_values(cfg: PretrainConfig, tmp_path: Path) -> None:
    out = pretrain(replace(cfg, out=tmp_path / "p", iterations=4), console=quiet())
    state = torch.load(out / "state.pt", weights_only=True)  # nothing in it can run code when loaded
    assert state["iteration"] == 4 and isinstance(state["numpy_rng"], str)
    state["numpy_rng"] = Path("not plain")  # e.g. a file written by something else
    torch.save(state, out / "state.pt")
    with pytest.raises(ValueError, match=r"state\.pt: holds a pathlib\.\w*Path, not only tensors"):
        pretrain(replace(cfg, out=out, iterations=8, resume=True), console=quiet())
