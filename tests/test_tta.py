"""Test-time augmentation: the mean probability over an image's dihedral views, each mapped back; the views'
features extracted once into the store's TTA companion; ``predict --tta`` equals ``evaluate --tta``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import extract.tta
from cache.store import FeatureStore
from extract.datasets.synthetic import synthetic_sample
from extract.shared import dihedral, to_unit_range
from train.config import TTA_VIEWS, EvaluateConfig
from train.data.readers import ImageSample
from train.evaluate import evaluate
from train.fit import FitConfig, fit
from train.inference.predictor import Predictor
from train.registry import probabilities, tta_probabilities, undo_view
from train.runs.rundir import eval_dir

from helpers import quiet, tiny_store_own_unet


@pytest.mark.parametrize("view", range(8))
def test_undo_view_inverts_each_dihedral_view(view: int) -> None:
    x = np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5)
    assert torch.equal(undo_view(torch.from_numpy(dihedral(x, view)), view), torch.from_numpy(x))


class Pixelwise(torch.nn.Module):
    """A view-equivariant model: each pixel's logits from its own colour alone."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.7, -1.3, 2.0]))

    def forward(self, image: torch.Tensor, out_size: int) -> torch.Tensor:
        fg = (image * self.w[None, :, None, None]).sum(1)
        return torch.stack([-fg, fg], 1)


@pytest.mark.parametrize("mode", ["flips", "d4"])
def test_a_view_invariant_model_averages_to_its_single_prediction(mode: str) -> None:
    """On a synthetic-set image: a model whose every pixel depends on that pixel alone."""
    img = np.ascontiguousarray(synthetic_sample(0, "test", 0, native_size=32).image.transpose(2, 0, 1))
    views = TTA_VIEWS[mode]
    target = torch.zeros(len(views), 32, 32, dtype=torch.long)
    stacked = torch.from_numpy(to_unit_range(np.stack([dihedral(img, v) for v in views])))
    averaged = tta_probabilities(Pixelwise(), ImageSample(stacked, target), 32, views)
    single = probabilities(Pixelwise(), ImageSample(stacked[:1], target[:1]), 32)
    torch.testing.assert_close(averaged, single, rtol=0, atol=1e-6)
    assert views == ((0, 2, 4, 6) if mode == "flips" else tuple(range(8)))


@pytest.fixture(scope="module")
def tiny(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tta")
    store, _ = tiny_store_own_unet(tiny_unet, root)
    run = root / "run"
    fit(FitConfig.flat(cache=store, out=run, epochs=2, dim=16, head_channels=(8, 4), train_count=None),
        console=quiet())
    return {"store": store, "run": run}


def test_evaluate_tta_extracts_the_views_once_and_records_them(tiny: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = evaluate(tiny["run"], split="val", overlays=False, console=quiet())
    summary = evaluate(tiny["run"], config=EvaluateConfig(split="val", overlays=False, tta="d4"), console=quiet())
    assert summary["tta"] == "d4" and summary["tta_views"] == list(range(8)) and "tta" not in plain
    folder = eval_dir(tiny["run"], "val", tta="d4")
    assert folder.name == "eval-val-tta-d4" and json.loads((folder / "summary.json").read_text()) == summary
    main = FeatureStore.open(tiny["store"])
    companion = extract.tta.tta_store(main, "val", (4, 8), (50, 250))
    assert companion.path == extract.tta.companion_path(main)  # found from the key alone
    assert companion.path != main.path and companion.layout("val").views == 8
    assert companion.key["preprocessing"]["tta_views"] == "d4"
    for s, b in main.pairs():  # view 0 of the companion is the store's own image, bit for bit
        np.testing.assert_array_equal(np.asarray(companion.features("val", s, b)[:, 0]),
                                      np.asarray(main.features("val", s, b)[:, 0]))
    monkeypatch.setattr(extract.tta, "run_extract", lambda *a, **k: pytest.fail("extracted the views again"))
    again = evaluate(tiny["run"], config=EvaluateConfig(split="val", overlays=False, tta="d4"), console=quiet())
    assert again == summary
    flips = evaluate(tiny["run"], config=EvaluateConfig(split="val", overlays=False, tta="flips"), console=quiet())
    assert flips["tta_views"] == [0, 2, 4, 6]


def test_predict_tta_equals_evaluate_tta_bit_for_bit(tiny: dict) -> None:
    evaluate(tiny["run"], config=EvaluateConfig(split="test", overlays=False, tta="d4"), console=quiet())
    saved = np.load(eval_dir(tiny["run"], "test", tta="d4") / "predictions.npz")
    store = FeatureStore.open(tiny["store"])
    predictor = Predictor.from_run(tiny["run"], device="cpu", tta="d4")
    plain = Predictor.from_run(tiny["run"], device="cpu")
    changed = 0
    for i, text in enumerate(store.texts("test")):
        img = np.asarray(store.images("test")[i, 0].compute())
        probs = predictor.probabilities(img, text)
        np.testing.assert_array_equal(probs.argmax(0) != 0, saved["pred"][i])
        changed += int((plain.probabilities(img, text).argmax(0) != probs.argmax(0)).sum())
    assert changed > 0  # the views' mean is not the single view's prediction


def test_tta_options_are_checked() -> None:
    with pytest.raises(ValueError, match="tta"):
        EvaluateConfig(tta="d8")


def test_an_images_reading_run_turns_its_images_and_needs_no_companion(tiny: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The U-Net baseline reads the images: its views are the image turned, no UNet features extracted; predict
    --tta still equals evaluate --tta."""
    run = tmp_path / "unet"
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=2, model="plain-unet", width=4, depth=2),
        console=quiet())
    monkeypatch.setattr(extract.tta, "run_extract", lambda *a, **k: pytest.fail("extracted features"))
    summary = evaluate(run, config=EvaluateConfig(split="test", overlays=False, tta="flips"), console=quiet())
    assert summary["tta_views"] == [0, 2, 4, 6]
    saved = np.load(eval_dir(run, "test", tta="flips") / "predictions.npz")["pred"]
    store = FeatureStore.open(tiny["store"])
    predictor = Predictor.from_run(run, device="cpu", tta="flips")
    for i, text in enumerate(store.texts("test")):
        img = np.asarray(store.images("test")[i, 0].compute())
        np.testing.assert_array_equal(predictor.probabilities(img, text).argmax(0) != 0, saved[i])
