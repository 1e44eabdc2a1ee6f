"""The ablation study, from the cache vs the authors' way (the UNet re-run for every image, every epoch).

    python bench/fit.py [--quick] [--out runs/bench]

Four fits (full model, --no-text, --fusion concat, two blocks) × E epochs on the same QaTa images:

* ours    = ``pipeline extract`` once (train + val) + the four fits reading the store;
* authors = the same four fits, where every batch's features are recomputed by the UNet (the same
  truncated forward, all steps of an image in one pass), for training and validation images, in every
  epoch of every fit — what the authors' code does, as it has no cache.

speedup = authors / ours. Also the first fit alone, including its extraction. The UNet has the paper's
flags (ADM-256, random weights: the same FLOPs) at 64 px by default, so that the authors' side fits in
minutes on a CPU; one untimed warm-up extraction and fit first (imports, file cache).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_parser, random_unet_dir, report, setup_path, work_dir

setup_path()

import numpy as np
import torch
from rich.console import Console

import train.fit as fit_module
from cache.store import FeatureStore
from extract.checkpoints import PRESETS
from extract.diffusion import shared_noise
from extract.features import FeatureExtractor
from extract.pretrain import PRETRAIN_PRESETS
from extract.run import ExtractConfig, run_extract
from extract.shared import to_unit_range
from extract.unet import load_unet
from train.data.readers import SplitFeatures
from train.registry import MODELS

STEPS = (50, 150, 250)
BLOCKS = (4, 6, 8, 12)
UNETS = {"paper": PRESETS["adm-imagenet-256"].flags, "gpu-256": PRETRAIN_PRESETS["gpu-256"]}
CONFIGS = {"full": {}, "no-text": {"fusion": "none"}, "concat": {"fusion": "concat"}, "two blocks": {"blocks": (6, 8)}}


def recomputing_split(extractor: FeatureExtractor) -> type[SplitFeatures]:
    """A SplitFeatures whose features come from the UNet at every batch (the authors' data loader)."""

    class Recomputed(SplitFeatures):
        def __init__(self, store: FeatureStore, split: str, blocks: Sequence[int], steps: Sequence[int],
                     indices=None, memory_budget: float = 0, attend_padding: bool = False,
                     view_tokens: bool = False, mask_resize: str | None = None):
            super().__init__(store, split, blocks, steps, indices, 0, attend_padding,  # nothing preloaded
                             view_tokens=view_tokens, mask_resize=mask_resize)
            self._images = store.images(split)

        def features(self, rows: Sequence[int], views: Sequence[int]) -> list[torch.Tensor]:
            imgs = np.stack([np.asarray(self._images[int(self.indices[k]), v].compute()) for k, v in zip(rows, views)])
            feats = extractor(torch.from_numpy(to_unit_range(imgs)), self.steps, self.blocks)
            return [torch.cat([feats[(s, b)] for s in self.steps], dim=1) for b in self.blocks]

    return Recomputed


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--images", type=int, help="train images, and as many validation images [quick 4, full 8]")
    ap.add_argument("--size", type=int, help="[64]")
    ap.add_argument("--epochs", type=int, help="[quick 2, full 5]")
    ap.add_argument("--dim", type=int, default=128, help="head width (the paper's is 768)")
    ap.add_argument("--unet-flags", choices=sorted(UNETS), default="paper",
                    help="paper: ADM-256's flags (552 M parameters, random weights); gpu-256: the same layout "
                         "at a quarter of the width")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    n = args.images or (4 if args.quick else 8)
    size = args.size or 64
    epochs = args.epochs or (2 if args.quick else 5)
    flags = UNETS[args.unet_flags]
    quiet = Console(stderr=True, quiet=True)
    work = work_dir()
    unet_dir = random_unet_dir(flags, work / "unet", channels=args.unet_channels)

    cfg = ExtractConfig(dataset="qata", data_root=args.data_root, unet=str(unet_dir), text_encoder="minilm",
                        size=size, steps=STEPS, blocks=BLOCKS, splits=("train", "val"), limit=n,
                        cache_dir=work / "cache", device="cpu")
    warm = run_extract(replace(cfg, limit=1, cache_dir=work / "warm-up"), console=quiet)  # imports, file cache
    fit_module.fit(fit_module.FitConfig.flat(cache=warm, out=work / "warm-up-fit", epochs=1, dim=args.dim), console=quiet)
    t0 = time.perf_counter()
    store = run_extract(cfg, console=quiet)
    t_extract = time.perf_counter() - t0
    extractor = FeatureExtractor(load_unet(unet_dir / "model.pt", unet_dir / "flags.json"), shared_noise(size),
                                 device="cpu")

    def one_fit(name: str, how: str) -> tuple[float, float]:
        cfg = fit_module.FitConfig.flat(cache=store, out=work / f"{how}-{name}", epochs=epochs, dim=args.dim,
                                   **CONFIGS[name])
        recomputed = replace(MODELS["textdiff"], reader=recomputing_split(extractor))
        patch = (mock.patch.dict(MODELS, {"textdiff": recomputed}) if how == "authors" else contextlib.nullcontext())
        t = time.perf_counter()
        with patch:
            metrics = fit_module.fit(cfg, console=quiet)
        return time.perf_counter() - t, metrics["best_val_dice"]

    rows, totals = [], {"ours": t_extract, "authors": 0.0}
    first: dict[str, float] = {}
    for name in CONFIGS:
        for how in ("ours", "authors"):
            seconds, dice = one_fit(name, how)
            totals[how] += seconds
            first.setdefault(how, seconds + (t_extract if how == "ours" else 0.0))
            rows.append([name, how, seconds, dice])
    speedup = totals["authors"] / totals["ours"]
    first_ratio = first["authors"] / first["ours"]
    tables = {
        f"Fits ({n} train + {n} val QaTa images, {size} px, {epochs} epochs, dim {args.dim}; UNet: "
        f"{args.unet_flags} flags)": (
            ["config", "features", "fit s", "best val Dice"], rows),
        "Totals": (["what", "ours s", "authors s", "authors / ours"],
                   [["extraction", t_extract, 0.0, ""],
                    ["first fit (ours: with its extraction)", first["ours"], first["authors"], first_ratio],
                    [f"{len(CONFIGS)} fits (ours: with the one extraction)", totals["ours"], totals["authors"],
                     speedup]]),
    }
    meta = {"unet_flags": args.unet_flags, "unet_channels": args.unet_channels, "images": n, "size": size, "epochs": epochs, "dim": args.dim, "flags": flags, "blocks": BLOCKS,
            "steps": STEPS, "configs": CONFIGS}
    report("fit", mode, args.out, tables, {"speedup": speedup, "first_fit_speedup": first_ratio,
                                           "extract_s": t_extract}, meta)


if __name__ == "__main__":
    main()
