"""predict --images: many images batched through one Predictor give evaluate's masks; a rerun writes nothing;
an interrupted run resumes; bad images are named (and skipped with --skip-bad); outputs never collide."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pipeline
import train.inference.batch as batch
from common.errors import OptionError
from cache.store import FeatureStore
from extract.datasets import DatasetError, read_image
from train.evaluate import evaluate
from train.fit import FitConfig, fit
from train.inference.predictor import Predictor
from train.inference.batch import PREDICTIONS, predict_batch

from helpers import quiet, tiny_store

SIZE = 32
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny store (6 test images, 4 UNet samples per forward), a run fitted on it and evaluated, and its
    test images written out as PNGs with a texts table."""
    root = tmp_path_factory.mktemp("batch")
    store = tiny_store(tiny_unet, root / "cache", counts={"train": 4, "val": 2, "test": 6}, batch_size=4)
    run = root / "run"
    fit(FitConfig.flat(cache=store, out=run, epochs=2, dim=16, head_channels=(8, 4)), console=quiet())
    evaluate(run, overlays=False, console=quiet())
    opened = FeatureStore.open(store)
    images = root / "images"
    images.mkdir()
    ids, texts = opened.ids("test"), opened.texts("test")
    for i, image_id in enumerate(ids):
        pixels = np.asarray(opened.images("test")[i, 0].compute()).transpose(1, 2, 0)
        Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(images / f"{image_id}.png")
    table = root / "texts.csv"
    write_table(table, [{"image": f"{i}.png", "text": t} for i, t in zip(ids, texts)])
    return {"root": root, "store": store, "run": run, "images": images, "texts": table, "ids": ids,
            "text": dict(zip(ids, texts)), "pred": np.load(run / "eval-test" / "predictions.npz")}


def write_table(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def mask(folder: Path, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(folder / f"{image_id}_mask.png"))


def test_batched_stage_one_equals_one_by_one(tiny: dict) -> None:
    """Six images through the UNet four samples at a time (the store's shape): each one's features are bitwise
    the ones it gets alone, and the store's."""
    p = Predictor.from_run(tiny["run"], device="cpu")
    imgs = np.stack([read_image(tiny["images"] / f"{i}.png", SIZE)[0] for i in tiny["ids"]])
    together = p.features(imgs)
    store = FeatureStore.open(tiny["store"])
    for k in range(len(imgs)):
        for b, (got, alone) in enumerate(zip(together, p.features(imgs[k]))):
            assert torch.equal(got[k:k + 1], alone)
            cached = np.concatenate([store.features("test", s, (4, 8)[b])[k, 0].compute() for s in (50, 250)])
            assert torch.equal(got[k], torch.from_numpy(cached).float())


def test_folder_gives_evaluate_masks_and_a_rerun_writes_nothing(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = runner.invoke(pipeline.app, ["predict", str(tiny["run"]), "--images", str(tiny["images"]), "--texts",
                                       str(tiny["texts"]), "--out", str(out), "--probabilities", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(out / PREDICTIONS)
    pred = tiny["pred"]
    assert list(pred["ids"]) == tiny["ids"]
    p = Predictor.from_run(tiny["run"], device="cpu")
    rows = read_rows(out / PREDICTIONS)
    assert [r["image"] for r in rows] == sorted(f"{i}.png" for i in tiny["ids"])  # a folder: by name
    for row in rows:
        image_id = row["image"].removesuffix(".png")
        got = mask(out, image_id)
        assert got.shape == (SIZE, SIZE) and set(np.unique(got)) <= {0, 255}
        np.testing.assert_array_equal(got != 0, pred["pred"][tiny["ids"].index(image_id)], err_msg=image_id)
        assert row["text"] == tiny["text"][image_id] and row["truncated"] == "False" and not row["error"]
        assert float(row["foreground_fraction"]) == pytest.approx((got != 0).mean(), abs=1e-6)
        prob = np.load(out / f"{image_id}_prob.npy")
        assert prob.dtype == np.float16 and prob.shape == (SIZE, SIZE) and row["probabilities"] == f"{image_id}_prob.npy"
        alone = p.probabilities(read_image(tiny["images"] / row["image"], SIZE)[0], row["text"])[1]
        np.testing.assert_allclose(prob.astype(np.float32), alone, atol=1e-3)
    before = snapshot(out)
    again = predict_batch(tiny["run"], tiny["images"], out, tiny["texts"], probabilities=True, device="cpu",
                          console=quiet())
    assert (again.written, again.kept, again.skipped) == (0, len(tiny["ids"]), [])
    assert snapshot(out) == before  # not one file rewritten


def test_interrupted_run_resumes_to_the_same_outputs(tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """Groups of 2 images; an interrupt after the 3rd image's files leaves complete files and a table of them;
    the rerun computes the rest only and ends where an uninterrupted run does."""
    monkeypatch.setattr(Predictor, "group_size", lambda self: 2)
    whole = predict_batch(tiny["run"], tiny["images"], tmp_path / "whole", tiny["texts"], device="cpu",
                          console=quiet())
    assert whole.written == 6
    real, calls = batch._write_outputs, []

    def dies_after_three(*args, **kwargs):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch, "_write_outputs", dies_after_three)
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        predict_batch(tiny["run"], tiny["images"], out, tiny["texts"], device="cpu", console=quiet())
    assert [r["image"] for r in read_rows(out / PREDICTIONS)] == calls  # the rows of the files written
    assert sorted(p.name for p in out.glob("*_mask.png")) == sorted(f"{Path(c).stem}_mask.png" for c in calls)
    monkeypatch.setattr(batch, "_write_outputs", real)
    resumed = predict_batch(tiny["run"], tiny["images"], out, tiny["texts"], device="cpu", console=quiet())
    assert (resumed.written, resumed.kept) == (3, 3)
    assert (out / PREDICTIONS).read_text() == (tmp_path / "whole" / PREDICTIONS).read_text()
    for image_id in tiny["ids"]:
        np.testing.assert_array_equal(mask(out, image_id), mask(tmp_path / "whole", image_id))
    assert not list(out.glob("*.tmp"))


def test_changed_text_missing_output_or_row_is_redone(tiny: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    predict_batch(tiny["run"], tiny["images"], out, tiny["texts"], device="cpu", console=quiet())
    first, second, third = tiny["ids"][:3]
    rows = read_rows(tiny["texts"])
    other = next(t for t in tiny["text"].values() if t != tiny["text"][first])
    changed = write_table(tmp_path / "texts.csv", [{**r, "text": other} if r["image"] == f"{first}.png" else r
                                                   for r in rows])
    (out / f"{second}_mask.png").unlink()
    write_table(out / PREDICTIONS, [r for r in read_rows(out / PREDICTIONS) if r["image"] != f"{third}.png"])
    res = predict_batch(tiny["run"], tiny["images"], out, changed, device="cpu", console=quiet())
    assert (res.written, res.kept) == (3, 3)  # a mask without its row (a kill between the two) is redone too
    row = next(r for r in read_rows(out / PREDICTIONS) if r["image"] == f"{first}.png")
    assert row["text"] == other
    with pytest.raises(OptionError, match="original_size"):  # other settings into the same folder: refused
        predict_batch(tiny["run"], tiny["images"], out, changed, original_size=True, device="cpu", console=quiet())


def test_bad_image_is_named_and_skipped_with_skip_bad(tiny: dict, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    for image_id in tiny["ids"][:3]:
        (images / f"{image_id}.png").write_bytes((tiny["images"] / f"{image_id}.png").read_bytes())
    broken = images / "zz_broken.png"  # sorted last: the others are written before it is reached
    broken.write_bytes((tiny["images"] / f"{tiny['ids'][0]}.png").read_bytes()[:60])
    out = tmp_path / "out"
    args = ["predict", str(tiny["run"]), "--images", str(images), "--texts", str(tiny["texts"]), "--out", str(out)]
    res = runner.invoke(pipeline.app, args)
    lines = res.output.strip().splitlines()
    assert res.exit_code == 1 and lines[-1].startswith("error: ") and "zz_broken.png" in lines[-1], res.output
    assert "--skip-bad" in lines[-1]
    assert not (out / "zz_broken_mask.png").exists()
    res = runner.invoke(pipeline.app, [*args, "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert any(line.startswith("skipped") and "zz_broken.png" in line for line in res.output.splitlines())
    rows = {r["image"]: r for r in read_rows(out / PREDICTIONS)}
    assert len(rows) == 4 and "cannot read image" in rows["zz_broken.png"]["error"] and not rows["zz_broken.png"]["mask"]
    assert all(not r["error"] and r["mask"] for name, r in rows.items() if name != "zz_broken.png")
    gone = write_table(tmp_path / "list.csv", [{"image": "images/nowhere.png"}, {"image": f"images/{tiny['ids'][0]}.png"}])
    with pytest.raises(DatasetError, match="nowhere.png"):  # a missing file: named before any model loads
        predict_batch(tiny["run"], gone, tmp_path / "out2", device="cpu", console=quiet())
    assert not (tmp_path / "out2").exists()


def test_table_of_paths_texts_by_stem_and_original_size(tiny: dict, tmp_path: Path) -> None:
    """--images TABLE: paths relative to its folder, in its order; --texts rows matched by stem; an image
    without one gets the empty text; --original-size: masks and probabilities at the image's size."""
    sub = tmp_path / "scans"
    sub.mkdir()
    a, b = tiny["ids"][:2]
    Image.open(tiny["images"] / f"{a}.png").resize((48, 40), Image.Resampling.BILINEAR).save(sub / f"{a}.png")
    Image.open(tiny["images"] / f"{b}.png").save(sub / f"{b}.png")
    listing = write_table(tmp_path / "list.csv", [{"image": f"scans/{b}.png"}, {"image": f"scans/{a}.png"}])
    texts = write_table(tmp_path / "texts.csv", [{"image": a, "text": tiny["text"][a]}])
    out = tmp_path / "out"
    res = predict_batch(tiny["run"], listing, out, texts, original_size=True, probabilities=True, device="cpu",
                        console=quiet())
    assert res.written == 2
    rows = read_rows(out / PREDICTIONS)
    assert [(r["image"], r["text"]) for r in rows] == [(f"scans/{b}.png", ""), (f"scans/{a}.png", tiny["text"][a])]
    assert mask(out, a).shape == (40, 48) and np.load(out / f"{a}_prob.npy").shape == (40, 48)
    p = Predictor.from_run(tiny["run"], device="cpu")
    single = p(sub / f"{a}.png", tiny["text"][a], tmp_path / "single.png", original_size=True)
    np.testing.assert_array_equal(mask(out, a), single * 255)  # the one-image form's mask


def test_collisions_and_option_mixes_are_refused(tiny: dict, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    first = tiny["images"] / f"{tiny['ids'][0]}.png"
    (images / "scan.png").write_bytes(first.read_bytes())
    Image.open(first).save(images / "scan.tif")
    with pytest.raises(OptionError, match="scan.png, scan.tif"):
        predict_batch(tiny["run"], images, tmp_path / "out", device="cpu", console=quiet())
    assert not (tmp_path / "out").exists()
    with pytest.raises(OptionError, match="images folder"):
        predict_batch(tiny["run"], tiny["images"], tiny["images"], device="cpu", console=quiet())
    run = str(tiny["run"])
    for args, says in ((["--image", str(first), "--images", str(images)], "--image FILE (one image) or --images"),
                       ([], "--image FILE (one image) or --images"),
                       (["--image", str(first), "--texts", str(tiny["texts"])], "--texts goes with --images DIR"),
                       (["--images", str(images), "--text", "two lesions"], "--text goes with --image FILE")):
        res = runner.invoke(pipeline.app, ["predict", run, *args, "--out", str(tmp_path / "o")])
        assert res.exit_code == 1 and says in res.output.strip().splitlines()[-1], res.output


def test_no_text_run_needs_no_texts(tiny: dict, tmp_path: Path) -> None:
    run = tmp_path / "notext"
    fit(FitConfig.flat(cache=tiny["store"], out=run, epochs=1, dim=16, head_channels=(8, 4), fusion="none"),
        console=quiet())
    out = tmp_path / "out"
    res = predict_batch(run, tiny["images"], out, device="cpu", console=quiet())
    assert res.written == len(tiny["ids"])
    assert all(r["text"] == "" and r["truncated"] == "False" for r in read_rows(out / PREDICTIONS))


def test_qata_twenty_images_give_evaluate_masks(tiny_unet: Path, qata_root: Path, tmp_path: Path) -> None:
    """20 QaTa-COV19 test X-rays (32 px, the tiny UNet): `predict --images` from the raw files gives the masks
    `evaluate` saved from the store; a broken file is named (and skipped with --skip-bad); a rerun writes nothing."""
    from extract.datasets import open_dataset
    from extract.run import ExtractConfig, run_extract

    store = run_extract(ExtractConfig(dataset="qata", data_root=qata_root, unet=str(tiny_unet / "adm_tiny.pt"),
                                      unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=32,
                                      steps=(50, 250), blocks=(4, 8), cache_dir=tmp_path / "cache", limit=20),
                        console=quiet())
    run = tmp_path / "run"
    fit(FitConfig.flat(cache=store, out=run, epochs=1, dim=16, head_channels=(8, 4)), console=quiet())
    evaluate(run, overlays=False, console=quiet())
    saved = np.load(run / "eval-test" / "predictions.npz")
    items = open_dataset("qata", qata_root).head(20).by_split("test")
    assert [it.id for it in items] == list(saved["ids"]) and len(items) == 20
    folder = tmp_path / "xrays"
    folder.mkdir()
    for it in items:
        (folder / it.image_path.name).write_bytes(it.image_path.read_bytes())
    (folder / "broken.png").write_bytes(items[0].image_path.read_bytes()[:100])
    listing = write_table(tmp_path / "list.csv", [{"image": f"xrays/{it.image_path.name}"} for it in items]
                          + [{"image": "xrays/broken.png"}])  # the store's order; the broken file last
    texts = write_table(tmp_path / "texts.csv", [{"image": it.image_path.name, "text": it.text} for it in items])
    out = tmp_path / "out"
    args = ["predict", str(run), "--images", str(listing), "--texts", str(texts), "--out", str(out), "--device", "cpu"]
    res = runner.invoke(pipeline.app, args)
    assert res.exit_code == 1 and "broken.png" in res.output.strip().splitlines()[-1], res.output
    res = runner.invoke(pipeline.app, [*args, "--skip-bad"])
    assert res.exit_code == 0, res.output
    rows = read_rows(out / PREDICTIONS)
    assert [r["image"] for r in rows] == [f"xrays/{it.image_path.name}" for it in items] + ["xrays/broken.png"]
    assert rows[-1]["error"] and not any(r["error"] for r in rows[:-1])
    for k, it in enumerate(items):
        np.testing.assert_array_equal(mask(out, it.image_path.stem) != 0, saved["pred"][k], err_msg=it.id)
    assert 0 < saved["pred"].mean() < 1
    before = snapshot(out)
    res = runner.invoke(pipeline.app, [*args, "--skip-bad"])
    assert res.exit_code == 0 and "0 image(s) segmented, 20 already done, 1 skipped" in res.output, res.output
    assert snapshot(out) == before


def test_a_batch_with_tta_gives_evaluate_tta_masks_and_records_it(tiny: dict, tmp_path: Path) -> None:
    from train.config import EvaluateConfig

    evaluate(tiny["run"], config=EvaluateConfig(overlays=False, tta="flips"), console=quiet())
    want = np.load(tiny["run"] / "eval-test-tta-flips" / "predictions.npz")
    out = tmp_path / "tta"
    predict_batch(tiny["run"], tiny["images"], out, tiny["texts"], device="cpu", tta="flips", console=quiet())
    assert json.loads((out / "predict.json").read_text())["tta"] == "flips"
    for image_id, pred in zip(want["ids"], want["pred"]):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"{image_id}_mask.png")) > 0, pred)
