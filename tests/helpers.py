"""Builders shared by the stage-two tests: a tiny store from the tiny UNet (tests/conftest.py), a quiet console."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from cache.store import FeatureStore
from extract.run import ExtractConfig, run_extract

TINY_COUNTS = {"train": 4, "val": 2, "test": 3}


def quiet() -> Console:
    """A console that prints nowhere (progress bars and notes stay out of the test output)."""
    return Console(file=io.StringIO(), width=200)


def tiny_store(adm: Path, cache_dir: Path, counts: dict[str, int] | None = None, unet: Path | None = None,
               **options: Any) -> Path:
    """A synthetic store at 32 px, steps 50/250, blocks 4/8, from the tiny UNet in folder ``adm`` (the
    ``tiny_unet`` fixture) or a copy of its checkpoint at ``unet``."""
    cfg = ExtractConfig(dataset="synthetic", unet=str(unet or adm / "adm_tiny.pt"),
                        unet_flags=adm / "adm_tiny_flags.json", text_encoder="minilm", size=32, steps=(50, 250),
                        blocks=(4, 8), cache_dir=cache_dir, dataset_options={"counts": counts or TINY_COUNTS},
                        **options)
    return run_extract(cfg, console=quiet())


def tiny_store_own_unet(adm: Path, root: Path, **options: Any) -> tuple[Path, Path]:
    """A tiny store (batch 4) made from a copy of the tiny UNet's checkpoint in ``root/unet`` (so that a test
    can alter its bytes), under ``root/cache``; returns (store, checkpoint)."""
    ckpt = root / "unet" / "adm_tiny.pt"
    ckpt.parent.mkdir(parents=True)
    shutil.copyfile(adm / "adm_tiny.pt", ckpt)
    return tiny_store(adm, root / "cache", unet=ckpt, batch_size=4, **options), ckpt


def error_line(args: list[str]) -> str:
    """The one ``error:`` line of a failing ``pipeline`` command (exit 1, no traceback)."""
    from typer.testing import CliRunner

    import pipeline

    res = CliRunner().invoke(pipeline.app, args)
    assert res.exit_code == 1 and "Traceback" not in res.stderr, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store (either format), for equality checks."""
    store = FeatureStore.open(path)
    out: dict[str, np.ndarray] = {}
    for split in store.splits():
        out[f"{split}/image"] = store.images(split).compute()
        out[f"{split}/mask"] = store.masks(split).compute()
        out[f"{split}/tokens"] = store.tokens(split).compute()
        out[f"{split}/token_mask"] = store.token_mask(split)
        for s, b in store.pairs():
            out[f"{split}/t{s}/b{b}"] = store.features(split, s, b).compute()
        out[f"{split}/crc"] = store.checksums(split)
    store.close()
    return out


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
