"""train's library surface: a run folder loads as a head, FitConfig's flat layout (old runs too), the
baseline's store choice, the demo as a function, the public names."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch

from train.config import FitConfig, PlainUNetArgs, TextDiffArgs
from train.fit import fit
from train.runs.loading import load_head, load_run, save_head
from train.data.stores import NoStoreError, baseline_store

from helpers import quiet

# config.json's "fit" keys before the registry (commit e7cf02c): the flat layout stays
OLD_FIT_KEYS = {"cache", "out", "blocks", "steps", "train_count", "subset_seed", "epochs", "batch_size", "lr",
                "lr_drop_epoch", "norm", "fusion", "dim", "head_channels", "pos_enc", "shared_block",
                "dice_on_logits", "attend_padding", "seed", "val_fraction", "memory_budget_gb", "augment",
                "model", "width", "depth", "extra"}


def test_a_run_folder_loads_as_a_head(store_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    fit(FitConfig(cache=store_path, out=run, epochs=1, model_args=TextDiffArgs(dim=16, head_channels=(8, 4))),
        console=quiet())
    _, model, _ = load_run(run)
    head = load_head(run)
    assert head.config == model.config
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), model.state_dict().values()))
    saved = save_head(head, tmp_path / "saved")  # and what save writes is a run folder's layout
    # the model's identity beside its constructor arguments, as a fit records it
    assert json.loads((saved / "config.json").read_text())["head"] == {"_class_name": "TextDiffHead", **head.config}
    assert json.loads((run / "config.json").read_text())["head"] == {"_class_name": "TextDiffHead", **head.config}
    assert load_head(saved).config == head.config


def test_fit_config_keeps_its_flat_layout_and_reads_old_ones(tmp_path: Path) -> None:
    cfg = FitConfig(cache=tmp_path, out=tmp_path / "r", model_args=TextDiffArgs(dim=32, fusion="none"))
    flat = cfg.to_json()
    newer = {"precision", "val_every", "view_text", "text_dropout", "dropout_classifier", "mask_resize", "text_gate"}  # since
    assert set(flat) == OLD_FIT_KEYS | newer
    assert flat["dim"] == 32 and flat["fusion"] == "none" and flat["model"] == "textdiff"
    assert FitConfig.from_json(flat) == dataclasses.replace(cfg, cache=str(tmp_path), out=str(tmp_path / "r"))
    assert FitConfig.flat(cache=tmp_path, out=tmp_path, dim=32, fusion="none").model_args == cfg.model_args
    old = {**flat, "model": "unet", "width": 8, "depth": 3}  # a baseline run written before the rename
    del old["attend_padding"], old["view_text"], old["text_dropout"], old["dropout_classifier"]  # and before the options existed
    del old["mask_resize"]
    back = FitConfig.from_json(old)
    assert back.model == "plain-unet" and back.model_args == PlainUNetArgs(width=8, depth=3)
    assert not back.attend_padding and back.view_text == "same" and back.text_dropout == 0.0
    assert back.dropout_classifier == "shared"  # the text head alone, as text dropout was before the option
    assert back.mask_resize == "nearest"  # (its reader takes the store's one mask: registry.reading_of)
    assert back.to_json()["model"] == "plain-unet"
    with pytest.raises(ValueError, match="dim"):
        FitConfig.flat(cache=tmp_path, out=tmp_path, model="plain-unet", dim=16)
    with pytest.raises(ValueError, match="PlainUNetArgs"):
        FitConfig(cache=tmp_path, out=tmp_path, model="plain-unet", model_args=TextDiffArgs())
    with pytest.raises(ValueError, match="fusion"):
        TextDiffArgs(fusion="sum")


@dataclasses.dataclass(frozen=True)
class Entry:  # cache.catalogue.StoreEntry's fields
    path: Path
    dataset: str
    size: int
    views: int
    complete: bool
    modified: float
    data_root: str | None = None


def test_baseline_store_prefers_complete_d4_then_newest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    entries: list[Entry] = []
    asked = []

    def matching_stores(cache_dir, dataset, data_root=None, size=None):
        asked.append((cache_dir, dataset, data_root, size))
        return entries

    monkeypatch.setitem(sys.modules, "cache.catalogue", types.SimpleNamespace(matching_stores=matching_stores))
    entries[:] = [Entry(Path("old-d4"), "qata", 64, 8, True, 1.0), Entry(Path("new"), "qata", 64, 1, True, 3.0),
                  Entry(Path("newest-d4-partial"), "qata", 64, 8, False, 9.0)]
    assert baseline_store(tmp_path, "qata", None, 64) == Path("old-d4")  # views first, complete only
    assert asked[-1] == (tmp_path, "qata", None, 64)
    entries[:] = [Entry(Path("a"), "qata", 64, 1, True, 1.0), Entry(Path("b"), "qata", 64, 1, True, 2.0)]
    assert baseline_store(tmp_path, "qata") == Path("b")  # then the newest
    entries[:] = [Entry(Path("partial"), "qata", 64, 8, False, 1.0)]
    with pytest.raises(NoStoreError) as info:
        baseline_store(tmp_path, "qata", size=64)
    msg = str(info.value)
    assert "no complete store of qata at 64 px" in msg and "pipeline extract --dataset qata" in msg
    assert "--cache" not in msg.replace("--cache-dir", "")  # the CLI adds its own flag


def test_demo_runs_end_to_end_at_a_tiny_size(tiny_unet: Path, store_path: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """run_demo with its two expensive stages stood in for: pretraining (the fixture UNet) and extraction
    (the tiny store); the fits, evaluations, denoising figure and report are the real ones."""
    import extract.pretrain
    import extract.run
    from train.demo.run import run_demo

    def pretrain(cfg, console=None):
        cfg.out.mkdir(parents=True)
        shutil.copyfile(tiny_unet / "adm_tiny.pt", cfg.out / "model.pt")
        shutil.copyfile(tiny_unet / "adm_tiny_flags.json", cfg.out / "flags.json")
        (cfg.out / "train_log.csv").write_text("iteration,loss\n1,1.0\n2,0.9\n")
        (cfg.out / "samples.png").write_bytes(b"")
        return cfg.out

    monkeypatch.setattr(extract.pretrain, "pretrain", pretrain)
    monkeypatch.setattr(extract.run, "run_extract", lambda cfg, console=None: store_path)
    report = run_demo(tmp_path / "demo", iterations=2, epochs=1, console=quiet())
    text = report.read_text()
    assert "| with text |" in text and "| no text |" in text and "denoising.png" in text
    assert "--iterations 2" in text and "expected, not a bug" in text
    for link in ("text/loss.png", "no-text/eval-test/overlays", "pretrain_loss.png", "denoising.png"):
        assert link in text
    from PIL import Image
    assert Image.open(tmp_path / "demo" / "denoising.png").size == (3 * 32, 3 * 32)  # 3 steps × (x_t | x̂0 | x0)


def test_public_names() -> None:
    import train

    for name in train.__all__:
        assert getattr(train, name) is not None, name
    assert callable(train.fit.fit) and callable(train.run_demo) and train.MODELS.keys() == {"textdiff", "plain-unet"}


def test_shell_scripts_ask_the_run_folder_owner(tmp_path: Path) -> None:
    """``python3 train/runs/rundir.py`` answers the scripts' questions (``-S``: no site-packages, so no torch)."""
    import subprocess

    from train.runs import rundir

    run = tmp_path / "run"
    (run / "eval-test").mkdir(parents=True)

    def ask(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-S", str(Path(rundir.__file__)), *args], capture_output=True,
                              text=True, env={"PYTHONPATH": ""})

    rundir.mark_incomplete(run)
    rundir.write_json(run / rundir.METRICS, {"best_val_dice": 0.71})
    assert ask("finished", str(run)).returncode == 1  # still marked INCOMPLETE
    rundir.mark_complete(run)
    assert ask("finished", str(run)).returncode == 0 and ask("evaluated", str(run), "test").returncode == 1
    (run / rundir.WEIGHTS).write_bytes(b"the weights")
    rundir.write_json(rundir.eval_dir(run, "test") / rundir.SUMMARY, {"dice": 0.5, "weights_sha256": "0" * 64})
    assert ask("evaluated", str(run), "test").returncode == 1  # it scored other weights
    rundir.write_json(rundir.eval_dir(run, "test") / rundir.SUMMARY,
                      {"dice": 0.5, "weights_sha256": rundir.weights_sha256(run)})
    assert ask("evaluated", str(run), "test").returncode == 0
    assert ask("value", str(run), "best_val_dice").stdout.strip() == "0.71"
    assert ask("value", str(run), "dice", "test").stdout.strip() == "0.5"
    assert ask("nonsense").returncode == 2
    assert json.loads((run / rundir.METRICS).read_text()) == {"best_val_dice": 0.71}


def test_a_models_identity_is_its_class_name_and_its_arguments() -> None:
    """As diffusers' ``_class_name`` + config: a run's ``head`` names its class; older runs' ``kind`` (the plain
    U-Net) or nothing (the TextDiff head) still read; the registry entry holds the reader and the new-image inputs."""
    from train.data.readers import SplitFeatures, SplitImages
    from train.registry import MODELS, spec_of
    from train.nets.plain_unet import PlainUNet

    assert spec_of({"head": {"_class_name": "PlainUNet", "width": 8}}).name == "plain-unet"
    assert spec_of({"head": {"kind": "plain-unet", "width": 8}}).name == "plain-unet"
    assert spec_of({"head": {"dim": 16}}).name == "textdiff"
    with pytest.raises(ValueError, match="'Other' is not registered"):
        spec_of({"head": {"_class_name": "Other"}})
    unet = MODELS["plain-unet"]
    assert unet.identity(PlainUNet(width=8, depth=2)) == {"_class_name": "PlainUNet", "width": 8, "depth": 2,
                                                          "in_channels": 3, "num_classes": 2}
    assert isinstance(unet.rebuild({"kind": "plain-unet", "width": 8, "depth": 2}), PlainUNet)
    assert unet.reader is SplitImages and MODELS["textdiff"].reader is SplitFeatures
    assert [spec.new_image_inputs().__name__ for spec in MODELS.values()] == ["FeatureInputs", "ImageInputs"]
