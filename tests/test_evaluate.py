"""evaluate: the files it writes, metrics recomputed from its saved predictions, the cache-key refusal; plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cache.store import FeatureStore
from extract.run import ExtractConfig, run_extract
from train.data.readers import SplitFeatures
from train.evaluate import PER_IMAGE_COLUMNS, SUMMARY_KEYS, evaluate
from train.fit import FitConfig, fit
from train.runs.loading import load_run
from train.registry import probabilities as predict
from train.runs.rundir import CacheMismatchError
from train.metrics import dice_iou
from train.plots import GT_COLOR, PRED_COLOR, heatmap_png, loss_curve_png, overlay_dims, overlay_image, panel_size

from helpers import quiet
from helpers import tiny_store as make_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
COUNTS = {"train": 4, "val": 2, "test": 3}


def tiny_store(adm: Path, cache_dir: Path, seed: int = 40) -> Path:
    return make_store(adm, cache_dir, COUNTS, seed=seed)


@pytest.fixture(scope="module")
def store_path(tiny_unet, tmp_path_factory) -> Path:
    return tiny_store(tiny_unet, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def run(store_path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    fit(FitConfig.flat(cache=store_path, out=out, epochs=2, dim=16, head_channels=(8, 4)), console=quiet())
    return out


@pytest.fixture(scope="module")
def evaluated(run) -> dict:
    return evaluate(run, console=quiet())


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- files and summary

def test_writes_every_file_with_exact_summary_keys(run, evaluated, store_path):
    out = run / "eval-test"
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "summary.json", "predictions.npz", "overlays"}
    summary = json.loads((out / "summary.json").read_text())
    assert tuple(summary) == SUMMARY_KEYS
    assert summary == evaluated
    store = FeatureStore.open(store_path)
    assert summary["split"] == "test" and summary["n_images"] == COUNTS["test"]
    assert "run" not in summary  # path-free: identical fits give identical summaries
    metrics = json.loads((run / "metrics.json").read_text())
    assert summary["cache_key_hash"] == store.key_hash == metrics["cache_key_hash"]
    for key in ("dice", "iou", "dice_std", "iou_std", "global_dice"):
        assert 0.0 <= summary[key] <= 1.0  # fractions, not %


def test_per_image_rows_follow_the_split(run, evaluated, store_path):
    rows = read_rows(run / "eval-test" / "per_image.csv")
    store = FeatureStore.open(store_path)
    assert list(rows[0]) == list(PER_IMAGE_COLUMNS)
    assert len(rows) == COUNTS["test"] == len(store.ids("test"))
    assert [r["id"] for r in rows] == store.ids("test")
    assert [r["text"] for r in rows] == store.texts("test")


def test_summary_recomputed_from_per_image(run, evaluated):
    rows = read_rows(run / "eval-test" / "per_image.csv")
    dice = np.array([float(r["dice"]) for r in rows])
    iou = np.array([float(r["iou"]) for r in rows])
    inter, p, g = (np.array([int(r[k]) for r in rows]) for k in ("intersection", "pred_area", "target_area"))
    assert evaluated["dice"] == pytest.approx(dice.mean(), abs=1e-12)
    assert evaluated["iou"] == pytest.approx(iou.mean(), abs=1e-12)
    assert evaluated["dice_std"] == pytest.approx(dice.std(), abs=1e-12)
    assert evaluated["iou_std"] == pytest.approx(iou.std(), abs=1e-12)
    expected_global = 1.0 if p.sum() + g.sum() == 0 else 2 * inter.sum() / (p.sum() + g.sum())
    assert evaluated["global_dice"] == pytest.approx(expected_global, abs=1e-12)
    # the smoothed per-image formulas, from the counts
    for d, i, n, pa, ga in zip(dice, iou, inter, p, g):
        assert d == pytest.approx((2 * n + 1e-5) / (pa + ga + 1e-5), rel=1e-9)
        assert i == pytest.approx((n + 1e-5) / (pa + ga - n + 1e-5), rel=1e-9)


def test_metrics_recomputed_from_saved_predictions(run, evaluated, store_path):
    saved = np.load(run / "eval-test" / "predictions.npz")
    store = FeatureStore.open(store_path)
    assert saved["ids"].tolist() == store.ids("test")
    masks = store.masks("test")[:, 0].compute()
    assert saved["pred"].shape == masks.shape == (COUNTS["test"], 32, 32) and saved["pred"].dtype == bool
    rows = read_rows(run / "eval-test" / "per_image.csv")
    for pred, mask, row in zip(saved["pred"], masks, rows):
        d, i = dice_iou(pred, mask)
        assert float(row["dice"]) == pytest.approx(d, rel=1e-12) and float(row["iou"]) == pytest.approx(i, rel=1e-12)
        assert int(row["pred_area"]) == pred.sum() and int(row["target_area"]) == mask.sum()
        assert int(row["intersection"]) == (pred & (mask != 0)).sum()
    # and the saved masks are the head's argmax, predicted independently here
    config, head, _ = load_run(run)
    data = SplitFeatures(store, "test", config["blocks"], config["steps"])
    again = predict(head, data.batch(list(range(len(data)))), store.size).argmax(1).numpy() != 0
    np.testing.assert_array_equal(again, saved["pred"])


def test_features_are_read_as_the_head_was_trained(store_path, tmp_path, monkeypatch):
    """A run fitted with the authors' padding attention is evaluated with it too."""
    import train.data.readers

    run = tmp_path / "padding"
    fit(FitConfig.flat(cache=store_path, out=run, epochs=1, dim=16, head_channels=(8, 4), attend_padding=True),
        console=quiet())
    seen = []

    class Spy(SplitFeatures):
        def __init__(self, store, split, blocks, steps, indices=None, memory_budget=0.0, attend_padding=False,
                     view_tokens=False, mask_resize=None):
            super().__init__(store, split, blocks, steps, indices, memory_budget, attend_padding, view_tokens,
                             mask_resize)
            seen.append(attend_padding)

    import dataclasses

    import train.registry

    spec = dataclasses.replace(train.registry.MODELS["textdiff"], reader=Spy)
    monkeypatch.setitem(train.registry.MODELS, "textdiff", spec)  # evaluate builds its data with the spec's reader
    evaluate(run, overlays=False, console=quiet())
    assert seen == [True]
    config, head, store = load_run(run)
    data = SplitFeatures(store, "test", config["blocks"], config["steps"], attend_padding=True)
    again = predict(head, data.batch(list(range(len(data)))), store.size).argmax(1).numpy() != 0
    np.testing.assert_array_equal(again, np.load(run / "eval-test" / "predictions.npz")["pred"])


def test_overlays_are_pngs_of_the_expected_size(run, evaluated, store_path):
    store = FeatureStore.open(store_path)
    files = sorted((run / "eval-test" / "overlays").iterdir())
    assert [f.name for f in files] == [f"{i}.png" for i in store.ids("test")]
    for f, text in zip(files, store.texts("test")):
        assert f.read_bytes()[:8] == PNG_MAGIC
        with Image.open(f) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            assert im.size == overlay_dims(32, text)
            assert im.size[0] == 3 * panel_size(32) + 32 and panel_size(32) == 256  # 32 px upscaled ×8


def test_other_split_and_no_overlays(run, evaluated):
    summary = evaluate(run, split="val", overlays=False, console=quiet())
    out = run / "eval-val"
    assert summary["split"] == "val" and summary["n_images"] == COUNTS["val"]
    assert {p.name for p in out.iterdir()} == {"per_image.csv", "summary.json", "predictions.npz"}
    assert (run / "eval-test" / "summary.json").is_file()  # the test evaluation is untouched


def test_store_with_another_key_is_refused(run, evaluated, store_path, tiny_unet, tmp_path):
    other = tiny_store(tiny_unet, tmp_path / "cache", seed=41)  # another noise seed: another key
    ours, theirs = FeatureStore.open(store_path).key_hash, FeatureStore.open(other).key_hash
    assert ours != theirs
    before = (run / "eval-test" / "summary.json").read_text()
    with pytest.raises(CacheMismatchError) as info:
        evaluate(run, cache=other, console=quiet())
    assert isinstance(info.value, ValueError)
    assert ours[:12] in str(info.value) and theirs[:12] in str(info.value)
    assert (run / "eval-test" / "summary.json").read_text() == before  # nothing overwritten


def test_incomplete_run_is_refused(run, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "INCOMPLETE").write_text("")
    with pytest.raises(ValueError, match="incomplete"):
        evaluate(broken, console=quiet())


# ---------------------------------------------------------------- plots

def test_overlay_panels_paint_truth_green_and_prediction_red():
    s = 16
    image = np.full((3, s, s), 100, np.uint8)
    target = np.zeros((s, s), bool)
    target[4:12, 4:12] = True
    pred = np.zeros((s, s), bool)
    pred[0:8, 0:8] = True
    im = np.asarray(overlay_image(image, target, pred, "x"))
    p, k = panel_size(s), panel_size(s) // s
    assert p == 256 and k == 16
    top = 26  # TITLE_H

    def panel(i: int) -> np.ndarray:
        return im[top:top + p, 8 + i * (p + 8): 8 + i * (p + 8) + p]

    np.testing.assert_array_equal(panel(0), 100)                       # the image, untouched
    assert tuple(panel(1)[4 * k, 8 * k]) == GT_COLOR                    # truth contour
    assert tuple(panel(1)[0, 0]) == (100, 100, 100)                     # outside the truth
    inside = panel(1)[8 * k, 8 * k].astype(int)                         # tinted towards green
    assert inside[1] > 100 and inside[0] < 100
    assert tuple(panel(2)[0, 4 * k]) == PRED_COLOR                      # prediction contour (image border)
    assert tuple(panel(2)[12 * k, 12 * k]) == (100, 100, 100)
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(image, target[:8], pred, "x")
    with pytest.raises(ValueError, match="uint8"):
        overlay_image(image.astype(np.float32), target, pred, "x")


def test_overlay_text_wraps_and_is_cut():
    short, long = overlay_dims(64, "one line"), overlay_dims(64, "word " * 500)
    assert short[0] == long[0] == 3 * 256 + 32
    assert long[1] - short[1] == 3 * 17  # 4 lines at most (one for the short text)
    assert overlay_dims(64, None)[1] == short[1] - 17
    assert panel_size(300) == 300 and panel_size(100) == 300


def test_heatmap_and_loss_curve_write_pngs(tmp_path, run):
    table = np.array([[70.0, 65.2], [np.nan, 50.0]])
    path = heatmap_png(table, ["b6", "t50"], ["with text", "without text"], tmp_path / "h.png", "title")
    assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError, match="labels"):
        heatmap_png(table, ["b6"], ["a", "b"], tmp_path / "bad.png", "t")
    curve = loss_curve_png(run / "history.csv", tmp_path / "loss.png")
    assert curve.read_bytes()[:8] == PNG_MAGIC
    with Image.open(curve) as im:
        assert im.size == (768, 432)  # 6.4 × 3.6 in at 120 dpi


def test_monuseg_fit_evaluate_is_sane_and_repeatable(tiny_unet: Path, monuseg_root: Path, tmp_path: Path) -> None:
    """Real MoNuSeg at 64 px (3 images per split): every output written, sane values, same bytes twice."""
    store = run_extract(ExtractConfig(dataset="monuseg", data_root=monuseg_root, unet=str(tiny_unet / "adm_tiny.pt"),
                                      unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm",
                                      size=64, blocks=(4, 6, 8), limit=3, cache_dir=tmp_path / "cache"),
                        console=quiet())
    summaries = []
    for name in ("a", "b"):
        run = tmp_path / name
        metrics = fit(FitConfig.flat(cache=store, out=run, epochs=3, dim=16, head_channels=(8, 4)), console=quiet())
        assert metrics["n_train"] == 3 and metrics["val_split"] == "val"  # the paper's 5 > the 3 available
        evaluate(run, console=quiet())
        summaries.append((run / "eval-test" / "summary.json").read_bytes())
        assert len(list((run / "eval-test" / "overlays").glob("*.png"))) == 3
    assert summaries[0] == summaries[1]
    summary = json.loads(summaries[0])
    assert summary["n_images"] == 3 and 0.05 < summary["dice"] <= 1 and 0 < summary["iou"] <= summary["dice"]
