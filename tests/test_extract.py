"""Stage one end to end: complete stores, nothing recomputed, incremental blocks, resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline
from PIL import Image

from cache.schema import StoreError
from cache.store import FeatureStore
from extract.checkpoints import UNetSource
from extract.command import extract_command
from extract.datasets import open_dataset
from extract.diffusion import shared_noise
from extract.features import FeatureExtractor
from extract.run import ExtractConfig, run_extract
from extract.shared import dihedral
from extract.unet import load_unet
from tests.helpers import arrays, assert_same
from train.data.readers import SplitFeatures

SYN = {"counts": {"train": 4, "val": 2, "test": 2}}


@pytest.fixture()
def cfg(tiny_unet: Path, tmp_path: Path) -> ExtractConfig:
    return ExtractConfig(dataset="synthetic", unet=str(tiny_unet / "adm_tiny.pt"),
                         unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=32,
                         steps=(50, 250), blocks=(4, 8), cache_dir=tmp_path / "cache", batch_size=4,
                         dataset_options=SYN)


def test_store_holds_exactly_the_extractor_features(cfg: ExtractConfig, tiny_unet: Path) -> None:
    path = run_extract(cfg)
    store = FeatureStore.open(path)
    info = store.info()
    assert {s: v["complete"] for s, v in info["splits"].items()} == {"train": 4, "val": 2, "test": 2}
    assert store.pairs() == [(50, 4), (50, 8), (250, 4), (250, 8)]
    # recompute one image by hand: dataset → extractor → float16
    ds = open_dataset("synthetic", **SYN)
    item = ds.by_split("val")[1]
    x0 = torch.from_numpy(ds.load_image(item, 32))[None]
    unet = load_unet(tiny_unet / "adm_tiny.pt", tiny_unet / "adm_tiny_flags.json")
    # the extraction's batch shape (batch_size 4, zero-padded) makes the float32 result bitwise reproducible
    feats = FeatureExtractor(unet, shared_noise(32, 40), device="cpu").samples(x0, torch.tensor([250]), [8], pad_to=4)
    got = store.features("val", 250, 8)[1, 0].compute()
    assert got.dtype == np.float16 and got.shape == (32, 32, 32)
    np.testing.assert_array_equal(got, feats[8][0].numpy().astype(np.float16))  # numpy's rounding, exactly
    np.testing.assert_array_equal(store.masks("val")[1, 0].compute(), ds.load_mask(item, 32))
    assert store.texts("val")[1] == item.text and store.ids("val")[1] == item.id
    assert store.token_mask("val")[1].sum() > 3


def test_float16_rounding_on_the_device_is_numpys() -> None:
    """samples(dtype=float16) rounds in torch; the store (and every earlier store) holds numpy's rounding:
    the same IEEE round-to-nearest-even, ties, subnormals, overflow to inf and NaN included."""
    tiny = np.float32(2.0 ** -24)  # the smallest float16 subnormal
    special = np.array([0.0, -0.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0, 65520.0, 1e6, -1e6, tiny / 2,
                        tiny * 1.5, 6.1e-5, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([special, np.random.default_rng(0).standard_normal(100_000).astype(np.float32)
                        * 10.0 ** np.random.default_rng(1).integers(-9, 6, 100_000)]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)
    got = torch.from_numpy(x).to(torch.float16).numpy()
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()


def test_rerun_computes_nothing(cfg: ExtractConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    first = run_extract(cfg)
    before = arrays(first)

    def no_unet(*_a, **_k):
        raise AssertionError("the UNet must not be loaded when the store is complete")

    monkeypatch.setattr(UNetSource, "load", no_unet)
    assert run_extract(cfg) == first
    assert_same(arrays(first), before)


def chunk_files(path: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(path)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in path.rglob("*") if p.is_file() and "/c/" in p.as_posix()}


def test_adding_a_block_computes_only_that_block(cfg: ExtractConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    path = run_extract(cfg)
    before = chunk_files(path)
    asked: list[tuple] = []
    real_samples = FeatureExtractor.samples

    def spy(self, x0, t, blocks, **kwargs):
        asked.append(tuple(blocks))
        return real_samples(self, x0, t, blocks, **kwargs)

    monkeypatch.setattr(FeatureExtractor, "samples", spy)
    assert run_extract(replace(cfg, blocks=(4, 8, 2))) == path
    assert asked and all(blocks == (2,) for blocks in asked)
    after = chunk_files(path)
    assert all(after[k] == v for k, v in before.items()), "existing chunks must not be rewritten"
    new = {k for k in after if k not in before}
    assert new and all("b2" in k for k in new)
    assert FeatureStore.open(path).info()["splits"]["train"]["done"]["t250_b2"] == 4


def test_interrupted_run_resumes_to_identical_arrays(cfg: ExtractConfig, tmp_path: Path) -> None:
    small = replace(cfg, batch_size=3)  # batches straddle images: a crash leaves half-assembled ones
    reference = arrays(run_extract(replace(small, cache_dir=tmp_path / "ref")))

    def crash(n_done: int) -> None:
        if n_done >= 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_extract(small, on_batch=crash)
    path = run_extract(small)
    assert_same(arrays(path), reference)


def test_d4_views_are_the_dihedral_images(cfg: ExtractConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    from extract.text import TextEncoder
    from extract.textviews import rewrite_text

    encoded: list[str] = []
    real = TextEncoder.encode
    monkeypatch.setattr(TextEncoder, "encode", lambda self, texts, *a, **k: (encoded.extend(texts),
                                                                               real(self, texts, *a, **k))[1])
    path = run_extract(replace(cfg, augment="d4", dataset_options={"counts": {"train": 2, "test": 1}}))
    store = FeatureStore.open(path)
    # each view keeps its own text (the image's, rewritten for the view) and its tokens; the encoder ran once
    # per distinct text
    texts, view_texts = store.texts("train"), store.view_texts("train")
    assert view_texts == [[rewrite_text(t, v, "synthetic") for v in range(8)] for t in texts]
    assert store.view_texts("test") is None and store.key["preprocessing"]["view_text"] == "textviews-1"
    assert sorted(encoded) == sorted({*texts, *store.texts("test"), *(t for row in view_texts for t in row)})
    tokens, view_tokens = store.tokens("train").compute(), store.view_tokens("train").compute()
    np.testing.assert_array_equal(view_tokens[:, 0], tokens)
    for i in range(2):
        for v in range(8):
            same = view_texts[i][v] == texts[i]
            assert np.array_equal(view_tokens[i, v], tokens[i]) == same, (i, v, view_texts[i][v])
    imgs = store.images("train").compute()
    assert imgs.shape == (2, 8, 3, 32, 32) and store.images("test").shape[1] == 1
    for v in range(8):
        np.testing.assert_array_equal(imgs[1, v], dihedral(imgs[1, 0], v))
    assert len({imgs[1, v].tobytes() for v in range(8)}) == 8
    f = store.features("train", 50, 4).compute()
    assert f.shape[:2] == (2, 8) and not np.allclose(f[0, 0], f[0, 1])


def _hand_made_folder(root: Path) -> np.ndarray:
    """A folder dataset of one train and one test image (64 px), both with the same hand-made 64 px mask:
    single pixels at even and odd positions and a 6 × 5 rectangle; returns the mask."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((64, 64), np.uint8)
    mask[[2, 10, 11, 40], [4, 20, 51, 40]] = 1
    mask[21:27, 33:38] = 1
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{name}.png")
    (root / "texts.csv").write_text("image,text,split\na,a mask,train\nb,the same mask,test\n")
    return mask


def test_one_store_holds_the_masks_under_both_resizings(cfg: ExtractConfig, tmp_path: Path) -> None:
    """At 64 → 32 px cv2's bilinear averages 2 × 2 blocks, so the authors' mask (then > 0) is each block's maximum;
    PIL's nearest keeps every block's lower-right pixel (odd rows and columns). One extraction keeps both: a
    reader of either mode gets the same features, only its targets differ."""
    mask = _hand_made_folder(tmp_path / "data")
    store = FeatureStore.open(run_extract(replace(cfg, dataset="folder", data_root=tmp_path / "data",
                                                  dataset_options={})))
    blocks = mask.reshape(32, 2, 32, 2).max(axis=(1, 3))
    assert store.version == 3 and store.mask_resizes == ("nearest", "authors")
    for split in ("train", "test"):
        np.testing.assert_array_equal(store.masks(split)[0, 0].compute(), mask[1::2, 1::2])
        np.testing.assert_array_equal(store.masks(split, "authors")[0, 0].compute(), blocks)
    # 4 pixels in 4 blocks, the rectangle (rows 21-26, columns 33-37) in 4 × 3; nearest: 1 pixel, 3 × 3
    assert blocks.sum() == 4 + 4 * 3 and mask[1::2, 1::2].sum() == 1 + 3 * 3
    assert store.key["preprocessing"]["masks"] == ["nearest", "authors"]
    assert "mask_resize" not in store.key["preprocessing"] and "--mask-resize" not in extract_command(store)
    near, authors = (SplitFeatures(store, "test", (4, 8), (50, 250), mask_resize=m) for m in ("nearest", "authors"))
    a, b = near.batch([0]), authors.batch([0])
    assert all(torch.equal(x, y) for x, y in zip(a.feats, b.feats)) and torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.target[0], torch.from_numpy(mask[1::2, 1::2]).long())
    assert torch.equal(b.target[0], torch.from_numpy(blocks).long())
    with pytest.raises(StoreError, match="mask resizing must be one of"):
        store.masks("test", "area")


def test_bad_arguments_are_refused_clearly(cfg: ExtractConfig) -> None:
    with pytest.raises(ValueError, match=r"^blocks \[12\] out of range.*0\.\.11"):
        run_extract(replace(cfg, blocks=(4, 12)))
    with pytest.raises(ValueError, match="^splits"):
        run_extract(replace(cfg, splits=("nope",)))


def test_cli_errors_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEXTDIFF_MODELS_DIR", str(tmp_path))
    res = CliRunner().invoke(pipeline.app, ["extract", "--dataset", "synthetic", "--text-encoder", "minilm",
                                            "--cache-dir", str(tmp_path)])
    assert res.exit_code == 1
    assert "256x256_diffusion_uncond.pt" in res.output and "Traceback" not in res.output


def cli_args(adm: Path, root: Path, dataset: str, cache: Path, blocks: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["extract", "--dataset", dataset, "--data-root", str(root), "--unet", str(adm / "adm_tiny.pt"),
            "--unet-flags", str(adm / "adm_tiny_flags.json"), "--text-encoder", "minilm", "--size", "64",
            "--steps", "50,150,250", "--blocks", blocks, "--cache-dir", str(cache), *extra]


def test_monuseg_issue_check(tiny_unet: Path, monuseg_root: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(pipeline.app, cli_args(tiny_unet, monuseg_root, "monuseg", tmp_path, "4,6,8"))
    assert res.exit_code == 0, res.output
    path = Path(res.stdout.strip().splitlines()[-1])
    info = json.loads(runner.invoke(pipeline.app, ["cache", "info", str(path)]).stdout)
    assert {s: (v["complete"], v["total"]) for s, v in info["splits"].items()} == {
        "train": (24, 24), "val": (6, 6), "test": (14, 14)}
    assert info["arrays"]["test/feat/t150/b8"]["shape"] == [14, 1, 32, 64, 64]
    assert info["arrays"]["test/feat/t150/b8"]["dtype"] == "float16"
    t0 = time.perf_counter()
    again = runner.invoke(pipeline.app, cli_args(tiny_unet, monuseg_root, "monuseg", tmp_path, "4,6,8"))
    assert again.exit_code == 0 and again.stdout.strip().splitlines()[-1] == str(path)
    assert "nothing to do" in again.output and time.perf_counter() - t0 < 10
    ls = runner.invoke(pipeline.app, ["cache", "ls", "--cache-dir", str(tmp_path)], env={"COLUMNS": "250"})
    row = next(line for line in ls.stdout.splitlines() if path.name in line)
    assert "44 / 44" in row and "t 50,150,250 × b 4,6,8" in row


def test_qata_few_images(tiny_unet: Path, qata_root: Path, tmp_path: Path) -> None:
    cfg = ExtractConfig(dataset="qata", data_root=qata_root, unet=str(tiny_unet / "adm_tiny.pt"),
                        unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=64,
                        blocks=(4, 6, 8), cache_dir=tmp_path, limit=3)
    store = FeatureStore.open(run_extract(cfg))
    assert {s: v["complete"] for s, v in store.info()["splits"].items()} == {"train": 3, "val": 3, "test": 3}
    assert "infect" in " ".join(store.texts("train")) or "lung" in " ".join(store.texts("train"))
    img = store.images("test")[0, 0].compute()
    assert np.array_equal(img[0], img[1]), "grayscale X-rays are replicated to RGB"


# MoNuSeg's kill and resume is tests/reliability/test_kills.py's (three seeded kills, file for file): opt-in here
@pytest.mark.parametrize("dataset", [pytest.param("monuseg", marks=pytest.mark.slow), "qata"])
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_unet: Path, shared_dir: Path, tmp_path: Path,
                                                           dataset: str) -> None:
    root = shared_dir / "data" / ("MoNuSeg" if dataset == "monuseg" else "QaTa-COV19")
    extra = ("--batch-size", "3", "--limit", "4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline", *cli_args(tiny_unet, root, dataset, tmp_path / "k", "4,8", extra)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill once some, but not all, images are committed
        if list((tmp_path / "k").glob("*.zarr/train/done/t250_b8/c/*")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    ref_cmd = [sys.executable, "-m", "pipeline", *cli_args(tiny_unet, root, dataset, tmp_path / "r", "4,8", extra)]
    ref = subprocess.run(ref_cmd, env=env, capture_output=True, text=True, check=True)
    resumed_path = Path(resumed.stdout.strip().splitlines()[-1])
    assert resumed_path.name == Path(ref.stdout.strip().splitlines()[-1]).name
    assert_same(arrays(resumed_path), arrays(Path(ref.stdout.strip().splitlines()[-1])))
