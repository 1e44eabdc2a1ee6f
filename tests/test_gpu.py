"""CUDA checks (opt-in: ``pytest -m gpu``; skipped without CUDA): device placement, autocast, a fit →
evaluate → predict round trip, and resume, on the GPU."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import quiet, tiny_store

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FLAT = dict(epochs=3, dim=16, head_channels=(8, 4), lr=1e-3, device="cuda")


@pytest.fixture(scope="module")
def store_path(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tiny_unet, tmp_path_factory.mktemp("cache"), device="cuda")


def test_placement_and_autocast() -> None:
    from common.devices import precision_context, resolve_device

    device = resolve_device("auto")
    assert device.type == "cuda" and resolve_device("cuda:0") == torch.device("cuda:0")
    a = torch.randn(8, 8, device=device)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        with precision_context(device, precision):
            assert (a @ a).dtype == dtype


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_fit_evaluate_predict_round_trip(store_path: Path, tmp_path: Path, precision: str) -> None:
    from cache.store import FeatureStore
    from extract.datasets import read_image
    from train.evaluate import evaluate
    from train.fit import FitConfig, fit
    from train.inference.predictor import Predictor

    run = tmp_path / precision
    metrics = fit(FitConfig.flat(cache=store_path, out=run, precision=precision, **FLAT), console=quiet())
    config = json.loads((run / "config.json").read_text())
    assert config["device"].startswith("cuda") and config["fit"]["precision"] == precision
    assert np.isfinite(metrics["final_train_loss"])
    summary = evaluate(run, overlays=False, console=quiet(), device="cuda", precision=precision)
    on_cpu = evaluate(run, overlays=False, console=quiet(), device="cpu")
    assert abs(summary["dice"] - on_cpu["dice"]) < 0.02  # the same weights on either device
    store = FeatureStore.open(store_path)
    png = tmp_path / "x.png"
    Image.fromarray(np.asarray(store.images("test")[0, 0].compute()).transpose(1, 2, 0)).save(png)
    gpu = Predictor.from_run(run, device="cuda", precision=precision)
    cpu = Predictor.from_run(run, device="cpu")
    image, text = read_image(png, store.size)[0], store.texts("test")[0]
    np.testing.assert_allclose(gpu.probabilities(image, text), cpu.probabilities(image, text), atol=0.05)


def test_resume_on_cuda(store_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import train.runs.resume
    from train.fit import FitConfig, fit

    reference = fit(FitConfig.flat(cache=store_path, out=tmp_path / "whole", **FLAT), console=quiet())

    def stop(epoch: int) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train.runs.resume, "pause_after", stop)
    monkeypatch.setattr("train.fit.pause_after", stop)
    with pytest.raises(KeyboardInterrupt):
        fit(FitConfig.flat(cache=store_path, out=tmp_path / "cut", **FLAT), console=quiet())
    monkeypatch.undo()
    resumed = fit(FitConfig.flat(cache=store_path, out=tmp_path / "cut", resume=True, **FLAT), console=quiet())
    assert resumed["best_epoch"] >= 1 and abs(resumed["best_val_dice"] - reference["best_val_dice"]) < 0.02
    shutil.rmtree(tmp_path / "cut")


def test_a_mixed_batch_routes_on_cuda_as_on_the_cpu() -> None:
    """A head with a no-text classifier (``fit --text-dropout``): a batch with and without text gives on CUDA
    what it gives on the CPU, token mask on either device."""
    from train.nets.head import TextDiffHead

    torch.manual_seed(0)
    head = TextDiffHead([16, 32], text_dim=24, dim=32, heads=2, head_dim=8, head_channels=(8, 4),
                        no_text_classifier=True).eval()
    feats = [torch.randn(3, 16, 8, 8), torch.randn(3, 32, 16, 16)]
    tokens, mask = torch.randn(3, 5, 24), torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        want = head(feats, tokens, mask, out_size=16)
        head.cuda()
        for m in (mask, mask.cuda()):
            got = head([f.cuda() for f in feats], tokens.cuda(), m, out_size=16)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_the_feed_sends_float16_features_and_pins_on_the_fits_device(store_path: Path) -> None:
    from cache.store import FeatureStore
    from train.data.readers import SplitFeatures
    from train.data.feed import Feed

    data = SplitFeatures(FeatureStore.open(store_path), "train", (4, 8), (50, 250))
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # the last GPU: not the current one
    batches = [([0, 1], [0, 0]), ([2], [0])]
    for (rows, views), (sample, target) in zip(batches, Feed(data, batches, device)):
        want = data.batch(rows, views)
        for got, cpu in zip(sample.feats, want.feats):
            assert got.device == device and got.dtype == torch.float32 and torch.equal(got.cpu(), cpu)
        assert target.device == device


def test_a_fit_restores_the_determinism_settings_and_keeps_its_devices_random_state(
        store_path: Path, tmp_path: Path) -> None:
    from train.fit import FitConfig, fit

    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled())
    saved: list[dict] = []
    from train.runs import rundir

    real = rundir.save_checkpoint
    rundir.save_checkpoint = lambda run, state: (saved.append(state), real(run, state))[1]
    try:
        fit(FitConfig.flat(cache=store_path, out=tmp_path / "run", **{**FLAT, "epochs": 1}), console=quiet())
    finally:
        rundir.save_checkpoint = real
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled()) == before
    assert len(saved[-1]["cuda_rng"]) == 1  # one device's state, whatever the GPU count
