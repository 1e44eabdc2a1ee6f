"""Dataset readers: real MoNuSeg / QaTa layouts, the folder layout, pixel conversions, errors, synthetic."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from extract.datasets import (OBJECT_RGB, REGIONS, Dataset, DatasetError, Item, open_dataset, preprocessing,
                              resize_mask, synthetic_sample)
from extract.datasets.decoding import cv2_linear_u8


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _write_xlsx(path: Path, rows: list[list[str]]) -> None:
    import openpyxl
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(row)
    wb.save(path)


def _sample_rgb(i: int = 0, size: int = 64) -> np.ndarray:
    return np.array(synthetic_sample(7, "train", i, size).image)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Flat folder layout: 4 images (2 train, 1 val, 1 test), masks {0,255}, texts.csv with a split column."""
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = [["image", "text", "split"]]
    for i, split in enumerate(["train", "train", "valid", "test"]):
        s = synthetic_sample(7, "train", i, 64)
        Image.fromarray(np.array(s.image)).save(root / "images" / f"case{i}.png")
        Image.fromarray(np.array(s.mask) * 255).save(root / "masks" / f"case{i}.png")
        rows.append([f"case{i}.png" if i % 2 else f"case{i}", s.text, split])
    _write_csv(root / "texts.csv", rows)
    return root


def _file_dataset(root: Path, image: Path, mask: Path | None = None) -> tuple[Dataset, Item]:
    item = Item("x", "train", "t", image, mask)
    return Dataset("folder", root, [item], (6, 8, 12, 16), []), item


# --------------------------------------------------------------------------- real data

def test_monuseg_real(monuseg_root: Path) -> None:
    ds = open_dataset("monuseg", monuseg_root)
    assert [len(ds.by_split(s)) for s in ds.splits()] == [24, 6, 14]
    assert ds.default_blocks == (6, 8, 12, 16) and ds.skipped == []
    assert [it.split for it in ds.items] == ["train"] * 24 + ["val"] * 6 + ["test"] * 14
    assert [it.id for it in ds.by_split("train")] == sorted(it.id for it in ds.by_split("train"))
    val = {it.id: it for it in ds.by_split("val")}
    assert val["TCGA-18-5592-01Z-00-DX1"].text == "The nuclei density in the left is high."
    test = ds.by_split("test")[0]
    assert test.image_path.suffix == ".tif" and test.mask_path.suffix == ".png"
    img = ds.load_image(test, 32)
    assert img.shape == (3, 32, 32) and img.dtype == np.float32 and -1 <= img.min() < img.max() <= 1
    np.testing.assert_array_equal(ds.load_image(test, 32, "bgr"), img[::-1])
    mask = ds.load_mask(test, 32)
    assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}

    only_val = open_dataset("monuseg", monuseg_root, splits=["val"])
    assert only_val.splits() == ["val"] and len(only_val.items) == 6
    fp = only_val.fingerprint()
    json.dumps(fp)
    assert fp["name"] == "monuseg" and len(fp["files"]) == 6 * 2 + 1
    assert "Val_Folder/Val_text.xlsx" in fp["files"] and fp == open_dataset("monuseg", monuseg_root,
                                                                                splits=["val"]).fingerprint()


def test_qata_sgseg_real(qata_root: Path) -> None:
    ds = open_dataset("qata", qata_root)
    assert ds.layout == "sgseg" and ds.default_blocks == (4, 6, 8, 12)
    assert [len(ds.by_split(s)) for s in ds.splits()] == [600, 150, 500]
    ann = json.loads((qata_root / "prompts" / "annotation.json").read_text())
    first = ann["valid"][0]
    item = next(it for it in ds.by_split("val") if f"mask_{it.id}.png" == first["image_path"])
    assert item.text == first["caption"] and not item.id.startswith("mask_")
    img = ds.load_image(item, 24)  # grayscale → three equal channels
    np.testing.assert_array_equal(img[0], img[1])
    np.testing.assert_array_equal(img[0], img[2])


def test_qata_lvit_layout_matches_sgseg(qata_root: Path, tmp_path: Path) -> None:
    sg = open_dataset("qata", qata_root, splits=["train", "test"])
    picks = {"train": sg.by_split("train")[:3], "test": sg.by_split("test")[:2]}
    for split, folder in (("train", "Train"), ("test", "Test")):
        d = tmp_path / f"{folder}_Folder"
        (d / "img").mkdir(parents=True)
        (d / "labelcol").mkdir()
        rows = [["Image", "Description"]]
        for it in picks[split]:
            shutil.copy(it.image_path, d / "img" / it.image_path.name)
            shutil.copy(it.mask_path, d / "labelcol" / it.mask_path.name)
            rows.append([it.mask_path.name, it.text])
        _write_xlsx(d / f"{folder}_text.xlsx", rows)
    lv = open_dataset("qata", tmp_path)
    assert lv.layout == "lvit" and lv.splits() == ["train", "test"]
    for a, b in zip(lv.items, picks["train"] + picks["test"]):
        assert (a.id, a.split, a.text) == (b.id, b.split, b.text)
        np.testing.assert_array_equal(lv.load_image(a, 16), sg.load_image(b, 16))
        np.testing.assert_array_equal(lv.load_mask(a, 16), sg.load_mask(b, 16))


def test_qata_sgseg_problems(qata_root: Path, tmp_path: Path) -> None:
    src = qata_root / "images" / "train"
    ann = json.loads((qata_root / "prompts" / "annotation.json").read_text())["train"][:3]
    (tmp_path / "prompts").mkdir()
    for sub in ("images", "masks"):
        (tmp_path / "images" / "train" / sub).mkdir(parents=True)
    for e in ann:
        name = e["image_path"].removeprefix("mask_")
        shutil.copy(src / "images" / name, tmp_path / "images" / "train" / "images" / name)
        shutil.copy(src / "masks" / e["image_path"], tmp_path / "images" / "train" / "masks" / e["image_path"])
    (tmp_path / "prompts" / "annotation.json").write_text(json.dumps({"train": ann[1:]}))
    with pytest.raises(DatasetError, match=r"annotation\.json"):
        open_dataset("qata", tmp_path)
    ds = open_dataset("qata", tmp_path, skip_bad=True)
    lost = ann[0]["image_path"].removeprefix("mask_")
    assert len(ds.items) == 2 and ds.skipped == [(f"images/train/images/{lost}", ds.skipped[0][1])]
    assert "no text for this image" in ds.skipped[0][1]
    with pytest.raises(DatasetError, match="missing split folder"):
        open_dataset("qata", tmp_path, splits=["val"])


# --------------------------------------------------------------------------- folder layout and pixels

def test_folder_flat(folder: Path) -> None:
    ds = open_dataset("folder", folder)
    assert ds.layout == "flat" and [(it.split, it.id) for it in ds.items] == [
        ("train", "case0"), ("train", "case1"), ("val", "case2"), ("test", "case3")]
    s = synthetic_sample(7, "train", 2, 64)
    val = ds.by_split("val")[0]
    assert val.text == s.text
    np.testing.assert_array_equal(ds.load_mask(val, 64), s.mask)
    img = ds.load_image(val, 64)
    np.testing.assert_array_equal(np.rint((img.transpose(1, 2, 0) + 1) * 127.5).astype(np.uint8), s.image)
    assert open_dataset("folder", folder, splits=["test"]).splits() == ["test"]


def test_folder_per_split_xlsx_and_no_split_column(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "per_split"
    for split, cases in (("train", [0, 1]), ("val", [2])):
        d = root / split
        shutil.copytree(folder / "images", d / "images", ignore=lambda _d, names: [
            n for n in names if n not in {f"case{i}.png" for i in cases}])
        shutil.copytree(folder / "masks", d / "masks")  # extra masks are harmless
        _write_xlsx(d / "texts.xlsx", [["Image", "Text"]] + [[f"case{i}", f"text {i}"] for i in cases])
    ds = open_dataset("folder", root)
    assert ds.layout == "per-split" and [(it.split, it.id, it.text) for it in ds.items] == [
        ("train", "case0", "text 0"), ("train", "case1", "text 1"), ("val", "case2", "text 2")]
    _write_csv(folder / "texts.csv", [["image", "text"]] + [[f"case{i}", "t"] for i in range(4)])
    assert open_dataset("folder", folder).splits() == ["train"]


def test_image_modes(tmp_path: Path) -> None:
    rgb = _sample_rgb()
    grey = rgb[..., 1].copy()
    files = {"rgb.png": Image.fromarray(rgb), "grey.png": Image.fromarray(grey),
             "rgba.png": Image.fromarray(np.dstack([rgb, np.full(grey.shape, 7, np.uint8)])),
             "grey16.png": Image.fromarray(grey.astype(np.uint16) * 257),
             "palette.png": Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)}
    for name, im in files.items():
        im.save(tmp_path / name)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb.astype(np.uint16) * 257)
    ds, _ = _file_dataset(tmp_path, tmp_path / "rgb.png")
    load = lambda name, size=48: ds.load_image(Item("x", "train", "t", tmp_path / name, None), size)  # noqa: E731
    ref = load("rgb.png")
    np.testing.assert_array_equal(load("rgba.png"), ref)
    np.testing.assert_array_equal(load("rgb16.tif"), ref)
    g = load("grey.png")
    np.testing.assert_array_equal(g, np.stack([g[0]] * 3))
    np.testing.assert_array_equal(load("grey16.png"), g)
    pal = np.asarray(files["palette.png"].convert("RGB"))
    np.testing.assert_allclose(load("palette.png", 64), (pal / 127.5 - 1).transpose(2, 0, 1), atol=1e-6)


def test_mask_values(tmp_path: Path) -> None:
    m = np.array(synthetic_sample(7, "train", 0, 64).mask)
    cases = {"m01.png": m, "m255.png": m * 255, "zeros.png": m * 0, "ones.png": m * 0 + 255,
             "rgb.png": np.dstack([m * 255] * 3)}
    for name, a in cases.items():
        Image.fromarray(a).save(tmp_path / name)
    Image.fromarray(m.astype(bool)).save(tmp_path / "bits.png")
    ds, _ = _file_dataset(tmp_path, tmp_path / "m01.png")
    load = lambda name: ds.load_mask(Item("x", "train", "t", None, tmp_path / name), 64)  # noqa: E731
    for name in ("m01.png", "m255.png", "rgb.png", "bits.png"):
        np.testing.assert_array_equal(load(name), m)
    assert load("zeros.png").sum() == 0 and load("ones.png").all()
    assert load("m255.png").dtype == np.uint8 and load("m01.png").shape == (64, 64)
    assert ds.load_mask(Item("x", "train", "t", None, tmp_path / "m255.png"), 32).shape == (32, 32)

    grey = m * 128
    grey[0, :2] = 100, 228
    Image.fromarray(grey).save(tmp_path / "grey.png")
    with pytest.raises(DatasetError, match=r"grey\.png: mask values \{0, 100, 128, 228\}"):
        load("grey.png")
    Image.fromarray(np.dstack([m * 255, m * 0, m * 0])).save(tmp_path / "red.png")
    with pytest.raises(DatasetError, match=r"red\.png: mask is in colour"):
        load("red.png")


def test_preprocessing() -> None:
    p = preprocessing(64, "bgr")
    assert p["size"] == 64 and p["color_order"] == "bgr" and p["image_resize"] == "pil-bilinear"
    assert preprocessing(64) != p and json.dumps(p)
    with pytest.raises(ValueError, match="color_order"):
        preprocessing(64, "hsv")
    assert preprocessing(64)["masks"] == ["nearest", "authors"]  # a store keeps both (before format 3: one)
    assert "mask_resize" not in preprocessing(64)


def test_mask_resize_authors_by_hand() -> None:
    """cv2.resize (INTER_LINEAR: half-pixel centres, 11-bit weights, no antialiasing) of the 0/255 mask, > 0."""
    one = np.zeros((4, 4), np.uint8)
    one[0, 0] = 1
    # shrinking 4 → 2 averages 2×2 blocks: 255 / 4 → 64 at (0, 0); nearest samples pixels 1 and 3 and loses it
    np.testing.assert_array_equal(cv2_linear_u8(one * 255, 2), [[64, 0], [0, 0]])
    np.testing.assert_array_equal(resize_mask(one, 2, "authors"), [[1, 0], [0, 0]])
    np.testing.assert_array_equal(resize_mask(one, 2), [[0, 0], [0, 0]])
    # enlarging 2 → 4: output i samples 0.5 i - 0.25, weights 1, 3/4, 1/4, 0 on source pixel 0 (edges clamped)
    two = np.array([[1, 0], [0, 0]], np.uint8)
    np.testing.assert_array_equal(cv2_linear_u8(two * 255, 4), [[255, 191, 64, 0], [191, 143, 48, 0],
                                                                [64, 48, 16, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(resize_mask(two, 4, "authors"), [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0],
                                                                   [0, 0, 0, 0]])
    np.testing.assert_array_equal(resize_mask(two, 4), [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    # 65 → 64: output 0 samples 1/128: weight 16/2048 on pixel 1 along both axes. Exact bilinear gives
    # 255 · (16/2048)² > 0 at (0, 0); cv2's fixed point rounds it to 0 (and 255 · 2000·16/2048² to 2 at (0, 1))
    dot = np.zeros((65, 65), np.uint8)
    dot[1, 1] = 1
    np.testing.assert_array_equal(cv2_linear_u8(dot * 255, 64)[:3, :3], [[0, 2, 0], [2, 243, 0], [0, 0, 0]])
    assert resize_mask(dot, 64, "authors").sum() == 3


def test_mask_resize_authors_dilates(tmp_path: Path) -> None:
    """Loaded through a dataset: the authors' masks contain the nearest ones and hold more foreground."""
    m = np.array(synthetic_sample(7, "train", 0, 128).mask)
    Image.fromarray(m * 255).save(tmp_path / "m.png")
    ds, _ = _file_dataset(tmp_path, tmp_path / "m.png")
    item = Item("x", "train", "t", None, tmp_path / "m.png")
    near, authors = ds.load_mask(item, 48), ds.load_mask(item, 48, "authors")
    assert authors.dtype == np.uint8 and set(np.unique(authors)) == {0, 1}
    assert (authors >= near).all() and authors.sum() > 1.1 * near.sum()


def test_mask_resize_authors_on_monuseg(monuseg_root: Path) -> None:
    """MoNuSeg's 14 test masks at 256 px hold 0.221 foreground the authors' way, 0.197 nearest; PIL's nearest
    samples pixel centres as cv2's bilinear does, so its mask lies inside the authors' one: 94.3 Dice against it
    (a floor-aligned nearest, cv2 INTER_NEAREST or torch's, is shifted by 1.5 px and scores 84.2)."""
    ds = open_dataset("monuseg", monuseg_root, splits=["test"])
    near = np.stack([ds.load_mask(it, 256) for it in ds.items]).astype(bool)
    authors = np.stack([ds.load_mask(it, 256, "authors") for it in ds.items]).astype(bool)
    assert len(ds.items) == 14
    assert near.mean() == pytest.approx(0.197, abs=5e-4) and authors.mean() == pytest.approx(0.221, abs=5e-4)
    dice = [2 * (a & n).sum() / (a.sum() + n.sum()) for a, n in zip(authors, near)]
    assert (authors >= near).all() and np.mean(dice) == pytest.approx(0.943, abs=5e-4)


# --------------------------------------------------------------------------- errors

def _edit_csv(folder: Path, edit) -> None:
    with open(folder / "texts.csv", newline="") as f:
        rows = list(csv.reader(f))
    _write_csv(folder / "texts.csv", edit(rows))


@pytest.mark.parametrize("damage, culprit, reason, kept", [
    (lambda f: (f / "masks" / "case1.png").unlink(), "images/case1.png", "no mask case1", 3),
    (lambda f: (f / "images" / "case2.png").unlink(), "texts.csv", "row 4: no image with stem 'case2'", 3),
    (lambda f: _edit_csv(f, lambda r: r[:-1]), "images/case3.png", "no text for this image", 3),
    (lambda f: _edit_csv(f, lambda r: r + [["", "orphan", "train"]]), "texts.csv", "row 6: a text but no image", 4),
    (lambda f: _edit_csv(f, lambda r: r + [["case0", "again", "train"]]), "texts.csv", "already has a text (row 2)", 4),
    (lambda f: _edit_csv(f, lambda r: r[:2] + [["case1.png", "", "train"]] + r[3:]), "texts.csv", "empty text", 3),
    (lambda f: _edit_csv(f, lambda r: r[:2] + [["case1", "t", "holdout"]] + r[3:]), "texts.csv", "split 'holdout'", 3),
])
def test_structural_errors_and_skip_bad(folder: Path, damage, culprit: str, reason: str, kept: int) -> None:
    damage(folder)
    with pytest.raises(DatasetError) as e:
        open_dataset("folder", folder)
    assert str(folder / culprit) in str(e.value) and reason in str(e.value)
    ds = open_dataset("folder", folder, skip_bad=True)
    assert len(ds.items) == kept and len(ds.skipped) == 1
    assert ds.skipped[0][0] == culprit and reason in ds.skipped[0][1]


def test_problems_in_unread_splits_are_ignored(folder: Path) -> None:
    (folder / "masks" / "case3.png").unlink()  # the test item
    assert open_dataset("folder", folder, splits=["train", "val"]).splits() == ["train", "val"]
    with pytest.raises(DatasetError, match="no mask case3"):
        open_dataset("folder", folder)


def test_empty_table_and_missing_table(folder: Path) -> None:
    _write_csv(folder / "texts.csv", [["image", "text", "split"]])
    with pytest.raises(DatasetError, match=r"texts\.csv: text table is empty"):
        open_dataset("folder", folder, skip_bad=True)
    _write_csv(folder / "texts.csv", [["file", "text"], ["case0", "t"]])
    with pytest.raises(DatasetError, match=r"texts\.csv: no image column"):
        open_dataset("folder", folder)
    (folder / "texts.csv").unlink()
    with pytest.raises(DatasetError, match="texts.csv / texts.xlsx"):
        open_dataset("folder", folder)


def test_load_time_errors_name_the_file(folder: Path) -> None:
    ds = open_dataset("folder", folder, skip_bad=True)
    img = folder / "images" / "case0.png"
    img.write_bytes(img.read_bytes()[:400])  # truncated
    (folder / "masks" / "case1.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"case0\.png: cannot read image"):
        ds.load_image(ds.items[0], 32)
    with pytest.raises(DatasetError, match=r"masks/case1\.png: cannot read mask"):
        ds.load_mask(ds.items[1], 32)
    (folder / "images" / "case2.png").unlink()
    with pytest.raises(DatasetError, match=r"case2\.png: image file not found"):
        ds.load_image(ds.by_split("val")[0], 32)


def test_bad_names_and_options(folder: Path) -> None:
    with pytest.raises(DatasetError, match="unknown dataset"):
        open_dataset("imagenet", folder)
    with pytest.raises(DatasetError, match="unknown option"):
        open_dataset("monuseg", folder, seed=3)
    with pytest.raises(DatasetError, match="unknown split"):
        open_dataset("folder", folder, splits=["dev"])
    with pytest.raises(DatasetError, match="dataset folder not found"):
        open_dataset("folder", folder / "nope")
    with pytest.raises(DatasetError, match="Train_Folder"):
        open_dataset("monuseg", folder)


def test_fingerprint_follows_content(folder: Path) -> None:
    fp = open_dataset("folder", folder).fingerprint()
    assert set(fp["files"]) == {"texts.csv", *(f"{d}/case{i}.png" for d in ("images", "masks") for i in range(4))}
    assert open_dataset("folder", folder).fingerprint() == fp
    _edit_csv(folder, lambda r: r[:2] + [[r[2][0], r[2][1] + " Edited.", r[2][2]]] + r[3:])
    fp2 = open_dataset("folder", folder).fingerprint()
    assert fp2["texts_sha256"] != fp["texts_sha256"] and fp2["files"]["texts.csv"] != fp["files"]["texts.csv"]
    Image.fromarray(_sample_rgb(9)).save(folder / "images" / "case0.png")
    assert open_dataset("folder", folder).fingerprint()["files"]["images/case0.png"] != fp["files"]["images/case0.png"]


# --------------------------------------------------------------------------- synthetic

def _region(size: int) -> np.ndarray:
    """The four regions restated: the triangles cut by the diagonals, top 0, right 1, bottom 2, left 3."""
    c = (size - 1) / 2
    dy, dx = np.mgrid[:size, :size] - c
    out = np.full((size, size), 3)
    out[(dx > 0) & (np.abs(dx) > np.abs(dy))] = 1
    out[(dy < 0) & (np.abs(dy) >= np.abs(dx))] = 0
    out[(dy > 0) & (np.abs(dy) >= np.abs(dx))] = 2
    return out


def test_synthetic_deterministic() -> None:
    a, b = open_dataset("synthetic"), open_dataset("synthetic", seed=0)
    assert [len(a.by_split(s)) for s in a.splits()] == [32, 8, 16] and a.items == b.items
    assert a.items[0].id == "train-0000" and a.items[0].image_path is None and a.default_blocks == (4, 6, 8)
    np.testing.assert_array_equal(a.load_image(a.items[3], 64), b.load_image(b.items[3], 64))
    c = open_dataset("synthetic", seed=1)
    assert [it.text for it in c.items] != [it.text for it in a.items]
    assert not np.array_equal(a.load_image(a.items[3], 64), c.load_image(c.items[3], 64))
    fewer = open_dataset("synthetic", counts={"train": 2, "test": 16}, splits=["test"])
    assert fewer.items == a.by_split("test")  # each split seeded on its own
    fp = a.fingerprint()
    assert fp["name"] == "synthetic" and fp["counts"] == {"train": 32, "val": 8, "test": 16} and fp == b.fingerprint()
    assert fp != c.fingerprint() and fp["native_size"] == 128 and isinstance(fp["generator_version"], int)


def test_synthetic_text_is_necessary() -> None:
    ds = open_dataset("synthetic")
    region = _region(128)
    tints = np.zeros((len(ds.items), 4, 3))
    named_sets = set()
    for n, item in enumerate(ds.items):
        s = synthetic_sample(0, item.split, int(item.id[-4:]), 128)
        assert s.text == item.text
        objects = (s.image == OBJECT_RGB).all(axis=2)
        np.testing.assert_array_equal(objects, s.objects > 0)  # discs are exactly the pixels of that colour
        named_q = [REGIONS.index(r) for r in s.named]
        np.testing.assert_array_equal(s.mask, objects & np.isin(region, named_q))
        for q in range(4):
            in_q = objects & (region == q)
            assert 20 < in_q.sum() < 3 * np.pi * 8.5 ** 2  # 1-3 discs of radius 5-8 in every region
            assert (REGIONS[q] in item.text) == (q in named_q)
            tints[n, q] = s.image[(region == q) & ~objects].mean(axis=0)
        assert 1 <= len(named_q) <= 3
        named_sets.add(s.named)
        small = ds.load_mask(item, 64)  # every named disc survives the resize to 64
        assert all(small[_region(64) == q].any() for q in named_q)
        assert not small[~np.isin(_region(64), named_q)].any()
    assert len(named_sets) >= 8 and {len(n) for n in named_sets} == {1, 2, 3}
    # landmarks: each region's background tint is stable across images and far from the others'
    assert tints.std(axis=0).max() < 10
    mean = tints.mean(axis=0)
    assert min(np.abs(mean[i] - mean[j]).max() for i in range(4) for j in range(i + 1, 4)) > 50
