"""The field's third text-annotated set (MosMedData+, LViT's layout) and nnU-Net's raw layout, on tiny hand-made
folders: read exactly (ids, splits, texts, masks), and their bad inputs refused in one line naming the file."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openpyxl
import pytest
from PIL import Image

from extract.datasets import DatasetError, check_files, open_dataset

LABELS = {"background": 0, "lesion": 1, "edema": 2}


def _png(path: Path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _label(i: int) -> np.ndarray:
    a = np.zeros((16, 16), np.uint8)
    a[2:6, 2:6] = 1
    a[8:12, 8 + i % 4:12] = 2
    return a


def _nnunet(root: Path) -> Path:
    """Dataset042_Tiny: three training cases (one marked val in the table), one labelled test case."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                   "numTraining": 3, "file_ending": ".png"}))
    for i, case in enumerate(["lung_001", "lung_002", "lung_003"]):
        _png(root / "imagesTr" / f"{case}_0000.png", np.full((16, 16), 40 * i, np.uint8))
        _png(root / "labelsTr" / f"{case}.png", _label(i))
    _png(root / "imagesTs" / "lung_101_0000.png", np.full((16, 16), 7, np.uint8))
    _png(root / "labelsTs" / "lung_101.png", _label(5))
    with open(root / "texts.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "text", "split"], ["lung_001", "lesion lower left", "train"],
                                 ["lung_002_0000.png", "edema upper right", "val"], ["lung_003", "no finding", ""],
                                 ["lung_101_0000.png", "small lesion", ""]])
    return root


def test_nnunet_reads_cases_splits_texts_and_masks(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset042_Tiny")
    ds = open_dataset("nnunet", root)
    assert [(it.split, it.id, it.text) for it in ds.items] == [
        ("train", "lung_001", "lesion lower left"), ("train", "lung_003", "no finding"),
        ("val", "lung_002", "edema upper right"), ("test", "lung_101", "small lesion")]
    assert ds.items[0].image_path == root / "imagesTr" / "lung_001_0000.png"
    np.testing.assert_array_equal(ds.decode_mask(ds.items[0].mask_path), (_label(0) > 0).astype(np.uint8))
    edema = open_dataset("nnunet", root, label="edema")
    np.testing.assert_array_equal(edema.decode_mask(edema.items[0].mask_path), (_label(0) == 2).astype(np.uint8))
    assert open_dataset("nnunet", root, label=2).labels == edema.labels
    assert ds.fingerprint() != edema.fingerprint()  # the foreground chosen is part of the store's key
    assert ds.default_blocks == (6, 8, 12, 16)
    check_files(ds)  # every declared value: no problem


def test_nnunet_test_images_without_labels_are_left_out(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset042_Tiny")
    for p in (root / "labelsTs").iterdir():
        p.unlink()
    (root / "labelsTs").rmdir()
    assert open_dataset("nnunet", root).splits() == ["train", "val"]


@pytest.mark.parametrize("damage, culprit, reason", [
    (lambda r: (r / "dataset.json").write_text(json.dumps({"labels": LABELS})), "dataset.json",
     "missing key(s) ['channel_names', 'file_ending']"),
    (lambda r: (r / "dataset.json").write_text(json.dumps({"modality": {"0": "CT"}, "labels": LABELS})),
     "dataset.json", "nnUNetv2_convert_old_nnUNet_dataset"),
    (lambda r: (r / "dataset.json").unlink(), "dataset.json", "not found"),
    (lambda r: _png(r / "imagesTr" / "lung_001_0001.png", np.zeros((16, 16), np.uint8)), "lung_001_0001.png",
     "a second channel file"),
    (lambda r: (r / "labelsTr" / "lung_003.png").unlink(), "lung_003_0000.png", "no mask lung_003"),
    (lambda r: _png(r / "imagesTr" / "extra_0000.png", np.zeros((16, 16), np.uint8)), "dataset.json",
     "numTraining is 3 but imagesTr holds 4"),
])
def test_nnunet_bad_layouts_are_one_line_naming_the_file(tmp_path: Path, damage, culprit: str, reason: str) -> None:
    root = _nnunet(tmp_path / "Dataset042_Tiny")
    damage(root)
    with pytest.raises(DatasetError) as e:
        open_dataset("nnunet", root)
    msg = str(e.value)
    assert culprit in msg and reason in msg and "\n" not in msg, msg


def test_nnunet_labels_outside_the_declared_ones_and_unknown_labels(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset042_Tiny")
    bad = _label(1)
    bad[0, 0] = 3
    _png(root / "labelsTr" / "lung_002.png", bad)
    ds = open_dataset("nnunet", root)
    with pytest.raises(DatasetError, match=r"lung_002.png: label values \[3\] are not declared in .*dataset.json"):
        check_files(ds)
    with pytest.raises(DatasetError, match="label 'tumour' is not a foreground label of .*dataset.json"):
        open_dataset("nnunet", root, label="tumour")


def _xlsx(path: Path, rows: list[list[str]]) -> None:
    wb = openpyxl.Workbook()
    for row in rows:
        wb.active.append(row)
    wb.save(path)


def _mosmed(root: Path, prefix: str = "") -> Path:
    """MosMedData+ in LViT's layout: Train/Val/Test_Folder with img/, labelcol/ and <Split>_text.xlsx."""
    for n, (folder, split) in enumerate([("Train_Folder", "Train"), ("Val_Folder", "Val"), ("Test_Folder", "Test")]):
        names = [f"study_{n}{k}.png" for k in range(2)]
        for k, name in enumerate(names):
            _png(root / folder / "img" / name, np.full((16, 16, 3), 30 * k, np.uint8))
            _png(root / folder / "labelcol" / f"{prefix}{name}", (_label(k) > 0).astype(np.uint8) * 255)
        _xlsx(root / folder / f"{split}_text.xlsx", [["Image", "Description"]] + [
            [f"{prefix}{name}", f"Bilateral pulmonary infection, {k + 1} infected areas."]
            for k, name in enumerate(names)])
    return root


@pytest.mark.parametrize("prefix", ["", "mask_"])
def test_mosmedplus_lvit_layout(tmp_path: Path, prefix: str) -> None:
    root = _mosmed(tmp_path / "MosMedDataPlus", prefix)
    ds = open_dataset("mosmedplus", root)
    assert [(it.split, it.id) for it in ds.items] == [("train", "study_00"), ("train", "study_01"),
                                                     ("val", "study_10"), ("val", "study_11"),
                                                     ("test", "study_20"), ("test", "study_21")]
    assert ds.items[1].text == "Bilateral pulmonary infection, 2 infected areas."
    assert ds.items[0].mask_path.name == f"{prefix}study_00.png" and ds.default_blocks == (4, 6, 8, 12)
    (root / "Val_Folder" / "labelcol" / f"{prefix}study_11.png").unlink()
    with pytest.raises(DatasetError, match="study_11.png: no mask"):
        open_dataset("mosmedplus", root)


def test_dataset_options_reach_the_reader_from_the_command_line(tmp_path: Path) -> None:
    from helpers import error_line

    root = _nnunet(tmp_path / "Dataset042_Tiny")
    line = error_line(["extract", "--dataset", "nnunet", "--data-root", str(root), "--dataset-options",
                       "label=tumour", "--unet", str(tmp_path / "none.pt")])
    assert "label 'tumour' is not a foreground label" in line
    import typer
    from cli_support import key_values

    assert key_values("label=2, layout=lvit", "--dataset-options") == {"label": 2, "layout": "lvit"}
    with pytest.raises(typer.BadParameter, match="'label' is not KEY=VALUE"):
        key_values("label", "--dataset-options")


def test_an_nnunet_folder_extracts_into_a_store(tmp_path: Path, tiny_unet: Path) -> None:
    from cache.store import FeatureStore
    from extract.config import ExtractConfig
    from extract.run import run_extract
    from helpers import quiet

    root = _nnunet(tmp_path / "Dataset042_Tiny")
    cfg = ExtractConfig(dataset="nnunet", data_root=root, unet=str(tiny_unet / "adm_tiny.pt"),
                        unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=32, steps=(50,),
                        blocks=(4,), cache_dir=tmp_path / "cache", dataset_options={"label": "edema"})
    store = FeatureStore.open(run_extract(cfg, console=quiet()))
    assert store.ids("val") == ["lung_002"] and store.texts("test") == ["small lesion"]
    want = (np.kron(_label(1), np.ones((2, 2), np.uint8)) == 2).astype(np.uint8)  # 16 → 32 px, nearest
    np.testing.assert_array_equal(np.asarray(store.masks("val")[0, 0]), want)
