"""predict: a new image through the run's own UNet + text encoder gives what the head gives on the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.store import FeatureStore
from extract.text import load_text_encoder
from train.data.readers import SplitFeatures
from train.fit import FitConfig, fit
from train.runs.loading import load_run
from train.registry import probabilities as head_predict
from extract.datasets import read_image
from train.inference.predictor import Predictor, predict
from train.runs.stage_one import WeightsMismatchError

SIZE = 32

from helpers import tiny_store_own_unet


@pytest.fixture(scope="module")
def tiny(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny store made from a copy of the fixture UNet (so a test can alter its bytes), and a run fitted on it."""
    root = tmp_path_factory.mktemp("predict")
    store, ckpt = tiny_store_own_unet(tiny_unet, root)
    run = root / "run"
    fit(FitConfig.flat(cache=store, out=run, epochs=2, dim=16, head_channels=(8, 4), train_count=None))
    return {"root": root, "store": store, "run": run, "ckpt": ckpt}


@pytest.fixture(scope="module")
def predictor(tiny: dict) -> Predictor:
    return Predictor.from_run(tiny["run"], device="cpu")


def _write_png(store: FeatureStore, split: str, i: int, path: Path) -> Path:
    """The stored (RGB, size²) image of row i as a PNG file."""
    img = np.asarray(store.images(split)[i, 0].compute())
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0)), "RGB").save(path)
    return path


def test_stored_image_gives_the_cached_prediction(tiny: dict, predictor: Predictor, tmp_path: Path) -> None:
    config, head, store = load_run(tiny["run"])
    data = SplitFeatures(store, "test", config["blocks"], config["steps"])
    for i in range(len(data)):
        png = _write_png(store, "test", i, tmp_path / f"{data.ids[i]}.png")
        img, hw = read_image(png, SIZE)
        np.testing.assert_array_equal(img, store.images("test")[i, 0].compute())  # same pixels in
        assert hw == (SIZE, SIZE)
        sample = data.batch([i])
        # the store's forward batch shape and float16 rounding: bitwise the cached features and tokens
        feats = predictor.features(img)
        for got, want in zip(feats, sample.feats):
            assert got.shape == want.shape and torch.equal(got, want)
        tokens, token_mask = predictor.tokens(data.texts[i])
        assert torch.equal(tokens, sample.tokens)
        assert torch.equal(token_mask, sample.token_mask)
        want = head_predict(head, sample, SIZE)[0].numpy()
        got = predictor.probabilities(img, data.texts[i])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        out = tmp_path / f"{data.ids[i]}_mask.png"
        mask = predictor(png, data.texts[i], out)
        np.testing.assert_array_equal(mask, want.argmax(0))
        saved = np.asarray(Image.open(out))
        assert saved.shape == (SIZE, SIZE) and set(np.unique(saved)) <= {0, 255}
        np.testing.assert_array_equal(saved, mask * 255)


def test_text_matters_and_original_size(tiny: dict, predictor: Predictor, tmp_path: Path) -> None:
    """The one-shot ``predict`` writes the store's size; ``original_size`` the input's (nearest)."""
    store = FeatureStore.open(tiny["store"])
    png = _write_png(store, "test", 0, tmp_path / "a.png")
    img, _ = read_image(png, SIZE)
    texts = store.texts("test")
    other = next(t for t in texts if t != texts[0])
    assert not np.allclose(predictor.probabilities(img, texts[0]), predictor.probabilities(img, other), atol=1e-6)
    big = tmp_path / "big.png"
    Image.open(png).resize((48, 40), Image.Resampling.BILINEAR).save(big)
    small = predict(tiny["run"], big, texts[0], tmp_path / "small.png", device="cpu")
    full = predictor(big, texts[0], tmp_path, original_size=True)
    assert small.shape == (SIZE, SIZE) and full.shape == (40, 48)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "big_mask.png")), full * 255)
    want = np.asarray(Image.fromarray(small).resize((48, 40), Image.Resampling.NEAREST))
    np.testing.assert_array_equal(full, want)


def test_missing_image_is_named(tiny: dict, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "scan.png"
    with pytest.raises(FileNotFoundError, match="scan.png"):
        predict(tiny["run"], missing, "two lesions", tmp_path / "m.png")


def test_checkpoint_with_other_bytes_is_refused(tiny: dict, tmp_path: Path) -> None:
    ckpt: Path = tiny["ckpt"]
    original = ckpt.read_bytes()
    try:
        ckpt.write_bytes(original + b"\0")  # the path the store recorded now holds other bytes
        with pytest.raises(WeightsMismatchError, match="would not match") as info:
            Predictor.from_run(tiny["run"], device="cpu")
        assert str(ckpt) in str(info.value)
    finally:
        ckpt.write_bytes(original)
    altered = tmp_path / "other.pt"  # an explicit --unet with other bytes: refused too, named
    altered.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(WeightsMismatchError, match="other.pt"):
        Predictor.from_run(tiny["run"], device="cpu", unet=str(altered))


def test_text_encoder_with_other_tokenizer_is_refused(tiny: dict, tmp_path: Path) -> None:
    source = Path(load_text_encoder("minilm").source)
    copy = tmp_path / "minilm-edited"
    copy.mkdir()
    for f in source.iterdir():
        if f.is_file():
            (copy / f.name).symlink_to(f)
    config = copy / "tokenizer_config.json"
    text = config.read_text()
    config.unlink()
    config.write_text(text.rstrip().removesuffix("}") + ', "edited": true}\n')
    with pytest.raises(WeightsMismatchError, match="tokenizer"):
        Predictor.from_run(tiny["run"], device="cpu", text_encoder=str(copy))


def test_no_text_run_needs_no_text(tiny: dict, tmp_path: Path) -> None:
    run = tmp_path / "run-notext"
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=1, dim=16, head_channels=(8, 4), fusion="none"))
    config, head, store = load_run(run)
    sample = SplitFeatures(store, "test", config["blocks"], config["steps"]).batch([1])
    png = _write_png(store, "test", 1, tmp_path / "b.png")
    p = Predictor.from_run(run, device="cpu")
    assert p.encoder is None
    want = head_predict(head, sample, SIZE)[0].numpy()
    np.testing.assert_allclose(p.probabilities(read_image(png, SIZE)[0], ""), want, rtol=0, atol=1e-6)


def test_an_image_without_text_gets_the_same_mask_through_every_path(tiny: dict, tmp_path: Path) -> None:
    """"No text" means one thing: ``predict --image`` with an empty text, ``predict --images`` without a texts
    row, and ``evaluate --text none`` withhold every token alike, and give the same masks (with a note saying
    that the run was not fitted with text dropout)."""
    from typer.testing import CliRunner

    import pipeline
    from train.runs import rundir
    from train.evaluate import evaluate
    from helpers import quiet

    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    evaluate(run, split="test", text="none", overlays=False, console=quiet())
    saved = np.load(rundir.eval_dir(run, "test", "none") / rundir.PREDICTIONS)
    store = FeatureStore.open(tiny["store"])
    folder = tmp_path / "images"
    folder.mkdir()
    pngs = [_write_png(store, "test", i, folder / f"{image_id}.png") for i, image_id in enumerate(saved["ids"])]
    runner = CliRunner()
    res = runner.invoke(pipeline.app, ["predict", str(run), "--images", str(folder), "--out", str(tmp_path / "many"),
                                       "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert f"{len(pngs)} image(s) have no text" in res.stderr and "not fitted with text dropout" in res.stderr
    for png, want in zip(pngs, saved["pred"]):
        one = tmp_path / f"{png.stem}-one.png"
        res = runner.invoke(pipeline.app, ["predict", str(run), "--image", str(png), "--text", "", "--out", str(one),
                                           "--device", "cpu"])
        assert res.exit_code == 0 and "1 image(s) have no text" in res.stderr, res.output
        assert np.array_equal(np.asarray(Image.open(one)) > 0, want)
        assert np.array_equal(np.asarray(Image.open(tmp_path / "many" / f"{png.stem}_mask.png")) > 0, want)


def test_text_dropout_run_predicts_without_text(tiny: dict, predictor: Predictor, tmp_path: Path) -> None:
    """An empty (or blank) text is the head with every token withheld (``evaluate --text none``), for a run
    fitted with text dropout as for one fitted without."""
    from helpers import quiet

    run = tmp_path / "dropout"
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=2, dim=16, head_channels=(8, 4), text_dropout=0.5),
        console=quiet())
    config, head, store = load_run(run)
    data = SplitFeatures(store, "test", config["blocks"], config["steps"])
    p = Predictor.from_run(run, device="cpu")
    assert "was fitted with text dropout" in p.inputs.no_text_note(["", "a text"])
    assert "not fitted with text dropout" in predictor.inputs.no_text_note([" "])
    assert p.inputs.no_text_note(["a text"]) is None
    for i in range(len(data)):
        image = read_image(_write_png(store, "test", i, tmp_path / f"{data.ids[i]}.png"), SIZE)[0]
        want = head_predict(head, data.batch([i]).withhold_text(), SIZE)[0].numpy()
        np.testing.assert_allclose(p.probabilities(image, ""), want, rtol=0, atol=1e-4)
        np.testing.assert_allclose(p.probabilities(image, " \t"), want, rtol=0, atol=1e-4)
        assert not np.allclose(p.probabilities(image, data.texts[i]), want, rtol=0, atol=1e-4)
    tokens, mask = predictor.tokens(["", data.texts[0]])
    assert not mask[0].any() and not tokens[0].any() and mask[1].any()


def test_cli(tiny: dict, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    import pipeline

    store = FeatureStore.open(tiny["store"])
    png = _write_png(store, "test", 2, tmp_path / "c.png")
    text = store.texts("test")[2]
    res = CliRunner().invoke(pipeline.app, ["predict", str(tiny["run"]), "--image", str(png), "--text", text,
                                            "--out", str(tmp_path / "masks"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    saved = np.asarray(Image.open(tmp_path / "masks" / "c_mask.png"))
    assert saved.shape == (SIZE, SIZE) and set(np.unique(saved)) <= {0, 255}
    res = CliRunner().invoke(pipeline.app, ["predict", str(tiny["run"]), "--image", str(tmp_path / "gone.png"), "--text", text,
                                            "--out", str(tmp_path / "m.png")])
    assert res.exit_code == 1 and "gone.png" in res.output


FORWARD_OPTIONS = {
    "attend-padding": {"attend_padding": True},
    "norm-batch": {"norm": "batch"},
    "pos-enc": {"pos_enc": True},
    "fusion-concat": {"fusion": "concat"},
    "no-text": {"fusion": "none"},
    "per-scale-blocks": {"shared_block": False},
    "plain-unet": {"model": "plain-unet", "width": 4, "depth": 2},
}


@pytest.mark.parametrize("option", list(FORWARD_OPTIONS))
def test_predict_equals_evaluate(tiny: dict, tmp_path: Path, option: str) -> None:
    """Every fit option that changes the forward pass: a new image through predict gives the probabilities
    evaluate computes from the cache, and the masks evaluate saved."""
    from train.evaluate import evaluate
    from train.registry import open_split, reading_of, spec_of

    from helpers import quiet

    run = tmp_path / option
    flat = dict(FORWARD_OPTIONS[option])
    if flat.get("model") != "plain-unet":
        flat.update(dim=16, head_channels=(8, 4))
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=2, **flat), console=quiet())
    evaluate(run, overlays=False, console=quiet())
    saved = np.load(run / "eval-test" / "predictions.npz")["pred"]
    config, model, store = load_run(run)
    data = open_split(spec_of(config), store, "test", reading_of(config))
    p = Predictor.from_run(run, device="cpu")
    for i in range(len(data)):
        png = _write_png(store, "test", i, tmp_path / f"{data.ids[i]}.png")
        want = head_predict(model, data.batch([i]), SIZE)[0].numpy()
        got = p.probabilities(read_image(png, SIZE)[0], data.texts[i])
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4, err_msg=f"{option}: {data.ids[i]}")
        clear = np.abs(want[1] - want[0]) > 1e-3  # away from a tie, the masks agree exactly
        np.testing.assert_array_equal((got.argmax(0) != 0)[clear], saved[i][clear])


def test_precision_and_device_reach_evaluate_and_predict(tiny: dict, tmp_path: Path) -> None:
    """bf16 autocast gives the fp32 probabilities to bf16's precision, in predict and in evaluate; a device
    this machine lacks is one error line, before anything is written."""
    from typer.testing import CliRunner

    import pipeline
    from train.evaluate import evaluate

    from helpers import quiet

    store = FeatureStore.open(tiny["store"])
    png = _write_png(store, "test", 0, tmp_path / "x.png")
    image, text = read_image(png, SIZE)[0], store.texts("test")[0]
    fp32 = Predictor.from_run(tiny["run"], device="cpu").probabilities(image, text)
    bf16 = Predictor.from_run(tiny["run"], device="cpu", precision="bf16").probabilities(image, text)
    assert bf16.dtype == np.float32 and not np.array_equal(fp32, bf16)  # autocast did run
    np.testing.assert_allclose(bf16, fp32, atol=0.05)
    run = tmp_path / "run"
    shutil.copytree(tiny["run"], run)
    a = evaluate(run, overlays=False, console=quiet(), device="cpu")
    b = evaluate(run, overlays=False, console=quiet(), device="cpu", precision="bf16")
    assert abs(a["dice"] - b["dice"]) < 0.05
    if not torch.cuda.is_available():
        result = CliRunner().invoke(pipeline.app, ["evaluate", str(run), "--device", "cuda"])
        assert result.exit_code == 1 and result.output.strip().splitlines()[-1].startswith(
            "error: --device 'cuda': no CUDA device is available here"), result.output
