"""The plain U-Net baseline: the classic 31 M-parameter net, trained like `fit` on the same subset,
scored by `evaluate` with the same outputs, usable by `predict`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import pipeline
from tests.helpers import tiny_store
from train.nets.plain_unet import PlainUNet

runner = CliRunner()


def cli(*args: str) -> str:
    res = runner.invoke(pipeline.app, list(args))
    assert res.exit_code == 0, res.output
    return res.stdout


@pytest.fixture(scope="module")
def store(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_store(tiny_unet, tmp_path_factory.mktemp("baseline"), counts={"train": 6, "val": 2, "test": 3})


def test_default_is_the_classic_31m_unet() -> None:
    net = PlainUNet()
    # 64-128-256-512-1024 channels, transposed-conv up-sampling: 31,037,698 parameters (Ronneberger et al.)
    assert sum(p.numel() for p in net.parameters()) == 31_037_698
    small = PlainUNet(width=8, depth=3)
    assert small(torch.zeros(2, 3, 32, 32)).shape == (2, 2, 32, 32)
    with pytest.raises(ValueError, match="divisible by 8"):
        small(torch.zeros(1, 3, 36, 36))


def test_baseline_trains_on_fits_subset_and_evaluates_alike(store: Path, tmp_path: Path) -> None:
    base, head = tmp_path / "unet", tmp_path / "textdiff"
    cli("baseline", "--cache", str(store), "--out", str(base), "--train-count", "3", "--subset-seed", "2",
        "--width", "8", "--depth", "3", "--epochs", "4")
    cli("fit", "--cache", str(store), "--out", str(head), "--train-count", "3", "--subset-seed", "2",
        "--epochs", "1", "--dim", "16")
    cfg_b, cfg_h = (json.loads((r / "config.json").read_text()) for r in (base, head))
    assert cfg_b["train_ids"] == cfg_h["train_ids"] and len(cfg_b["train_ids"]) == 3  # the same few labels
    assert cfg_b["val"] == cfg_h["val"]
    assert cfg_b["head"]["_class_name"] == "PlainUNet" and cfg_b["blocks"] == []
    losses = [float(r.split(",")[1]) for r in (base / "history.csv").read_text().splitlines()[1:]]
    assert losses[-1] < losses[0]  # it learns
    summaries = []
    for run in (base, head):
        summaries.append(json.loads(cli("evaluate", str(run))))
        assert (run / "eval-test" / "per_image.csv").is_file() and len(list((run / "eval-test" / "overlays").glob("*.png"))) == 3
    assert summaries[0].keys() == summaries[1].keys() and summaries[0]["n_images"] == 3
    assert 0 <= summaries[0]["dice"] <= 1


def test_predict_runs_a_baseline(store: Path, tmp_path: Path) -> None:
    run = tmp_path / "unet"
    cli("baseline", "--cache", str(store), "--out", str(run), "--width", "8", "--depth", "3", "--epochs", "1")
    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    cli("predict", str(run), "--image", str(image), "--out", str(tmp_path / "mask.png"))
    mask = np.asarray(Image.open(tmp_path / "mask.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) <= {0, 255}


def test_baseline_by_dataset_finds_its_store(store: Path, tmp_path: Path) -> None:
    """`--dataset NAME`: the newest complete store of that dataset in the cache folder, the same ids as `--cache`."""
    by_name, by_store = tmp_path / "by-name", tmp_path / "by-store"
    common = ("--train-count", "2", "--width", "8", "--depth", "3", "--epochs", "1")
    res = runner.invoke(pipeline.app, ["baseline", "--dataset", "synthetic", "--size", "32", "--cache-dir",
                                       str(store.parent), "--out", str(by_name), *common])
    assert res.exit_code == 0 and f"images of {store}" in res.stderr, res.output
    cli("baseline", "--cache", str(store), "--out", str(by_store), *common)
    cfg_n, cfg_s = (json.loads((r / "config.json").read_text()) for r in (by_name, by_store))
    assert cfg_n["train_ids"] == cfg_s["train_ids"] and cfg_n["cache"] == cfg_s["cache"]
    missing = runner.invoke(pipeline.app, ["baseline", "--dataset", "qata", "--cache-dir", str(store.parent),
                                           "--out", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "no complete store of qata" in missing.stderr
    assert "pipeline extract --dataset qata" in missing.stderr
    both = runner.invoke(pipeline.app, ["baseline", "--dataset", "synthetic", "--cache", str(store),
                                        "--out", str(tmp_path / "y")])
    assert both.exit_code == 2 and not (tmp_path / "y").exists()
