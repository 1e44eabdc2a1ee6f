"""The ``pipeline extract`` command printed for a store (by ``cache verify --repair`` and by a fit that asks
for missing pairs) rebuilds that very store: rendered, parsed back by the CLI and run, it lands on the same
key and path, and finds nothing new to compute."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from helpers import quiet
from PIL import Image
from typer.testing import CliRunner

from cache import FeatureStore, verify_store
from extract.command import extract_command
from extract.run import ExtractConfig, run_extract
from pipeline import app
from train.data.readers import MissingFeaturesError, resolve_selection

#: options of the stores made here: each one the old command dropped, and all of them together
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "autocast": {"autocast": True},
    "h5": {"store_format": "h5"},
    "limit": {"limit": 1},
    "skip-bad": {"skip_bad": True},
    "splits": {"splits": ("test",)},
    "all": {"autocast": True, "limit": 1, "skip_bad": True, "splits": ("test", "train"), "augment": "d4",
            "color_order": "bgr", "seed": 3, "max_length": 6, "batch_size": 3},
}


def _folder(root: Path, bad: bool) -> Path:
    """A folder dataset (64 px): two train images, one validation and one test image, and with ``bad`` a train
    image without its mask (which only ``skip_bad`` gets past)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    rows = [("a", "a mask on the left", "train"), ("b", "two masks", "train"), ("c", "the same mask", "test"),
            ("e", "a mask at the top", "val")]
    for name, _, _ in rows + ([("d", "", "")] if bad else []):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        if name != "d":
            Image.fromarray((rng.random((64, 64)) > 0.7).astype(np.uint8) * 255).save(root / "masks" / f"{name}.png")
    rows += [("d", "no mask at all", "train")] if bad else []
    (root / "texts.csv").write_text("image,text,split\n" + "".join(f"{n},{t},{s}\n" for n, t, s in rows))
    return root


def _make(tiny_unet: Path, tmp_path: Path, **options: Any) -> Path:
    """A tiny store of the folder dataset (32 px, step 50, block 4) made with ``options``."""
    root = _folder(tmp_path / "data", bad=bool(options.get("skip_bad")))
    cfg = ExtractConfig(dataset="folder", data_root=root, unet=str(tiny_unet / "adm_tiny.pt"),
                        unet_flags=tiny_unet / "adm_tiny_flags.json", text_encoder="minilm", size=32, steps=(50,),
                        blocks=(4,), cache_dir=tmp_path / "cache", **{"batch_size": 4, **options})
    return run_extract(cfg, console=quiet())


def _run(command: str) -> tuple[str, str]:
    """Run a rendered ``pipeline extract ...`` line through the CLI's parser; (the store path it prints, stderr)."""
    words = shlex.split(command)
    assert words[:2] == ["pipeline", "extract"], command
    res = CliRunner().invoke(app, words[1:])
    assert res.exit_code == 0, (command, res.output)
    return res.stdout.strip().splitlines()[-1], res.stderr


@pytest.mark.parametrize("options", CASES.values(), ids=CASES.keys())
def test_the_rendered_command_rebuilds_the_same_store(tiny_unet: Path, tmp_path: Path,
                                                      options: dict[str, Any]) -> None:
    path = _make(tiny_unet, tmp_path, **options)
    store = FeatureStore.open(path)
    printed, log = _run(extract_command(store))
    assert printed == str(path) and "nothing to do" in log, log
    assert FeatureStore.open(printed).key == store.key


def test_an_older_record_renders_what_it_knows(tiny_unet: Path, tmp_path: Path) -> None:
    """A store made before limit, skip_bad and splits were recorded: the splits it holds rows of are named,
    the rest is left out (nothing false)."""
    path = _make(tiny_unet, tmp_path, splits=("test",))
    attrs = zarr.open_group(path, mode="r+").attrs
    attrs["extract"] = {k: v for k, v in attrs["extract"].items()
                        if k not in ("limit", "skip_bad", "splits", "autocast", "store_format")}
    command = extract_command(FeatureStore.open(path))
    assert "--splits test " in command and "--limit" not in command and "--skip-bad" not in command
    printed, log = _run(command)
    assert printed == str(path) and "nothing to do" in log, log


def test_verify_repair_prints_the_store_s_own_command(tiny_unet: Path, tmp_path: Path) -> None:
    path = _make(tiny_unet, tmp_path, **CASES["all"])
    feats = zarr.open_group(path, mode="r+")["test/feat/t50/b4"]
    changed = feats[0].copy()
    changed.flat[0] += 1
    feats[0] = changed
    res = CliRunner().invoke(app, ["cache", "verify", "--repair", str(path)])
    assert res.exit_code == 1 and "repaired: 1 damaged row(s)" in res.output, res.output
    command = res.output.split("own command:\n", 1)[1].strip().splitlines()[0]
    assert command == extract_command(FeatureStore.open(path))
    printed, log = _run(command)
    assert printed == str(path) and "nothing to do" not in log and verify_store(path).ok


def test_the_missing_features_command_adds_them_to_the_same_store(tiny_unet: Path, tmp_path: Path) -> None:
    path = _make(tiny_unet, tmp_path, **CASES["all"])
    with pytest.raises(MissingFeaturesError) as e:
        resolve_selection(FeatureStore.open(path), [4, 8], [50])
    printed, _ = _run(str(e.value).split("add them with:\n", 1)[1].strip())
    assert printed == str(path)
    assert resolve_selection(FeatureStore.open(path), [4, 8], [50]) == ((4, 8), (50,))
