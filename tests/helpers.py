"""Builders shared by the stage-two tests: a tiny store from the fixture UNet, a quiet console."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from rich.console import Console

from extract.run import ExtractConfig, run_extract

TINY_COUNTS = {"train": 4, "val": 2, "test": 3}


def quiet() -> Console:
    """A console that prints nowhere (progress bars and notes stay out of the test output)."""
    return Console(file=io.StringIO(), width=200)


def tiny_store(adm: Path, cache_dir: Path, counts: dict[str, int] | None = None, unet: Path | None = None,
               **options: Any) -> Path:
    """A synthetic store at 32 px, steps 50/250, blocks 4/8, from the fixture UNet (or a copy at ``unet``)."""
    cfg = ExtractConfig(dataset="synthetic", unet=str(unet or adm / "adm_tiny.pt"),
                        unet_flags=adm / "adm_tiny_flags.json", text_encoder="minilm", size=32, steps=(50, 250),
                        blocks=(4, 8), cache_dir=cache_dir, dataset_options={"counts": counts or TINY_COUNTS},
                        **options)
    return run_extract(cfg, console=quiet())
