"""Extraction: overhead over the bare UNet, the truncated forward, bf16 autocast, the compute floor.

    python bench/extract.py [--quick] [--out runs/bench]

* overhead = ``pipeline extract`` wall time (in process: dataset, text encoder, UNet load, reads,
  resizing, noising, zarr writes; a fresh cache folder each run) over the bare forward passes of the
  same UNet on the same samples, batch and dtype (inputs already in memory). Medians of ``--repeats``.
  Split in two by timing both on n/2 and n images (batch n/2, so every batch is full): the per-image
  cost is the slope, (T(n) − T(n/2)) / (n/2), and ``per_image_overhead`` = extraction's slope over the
  bare forwards'; the fixed cost per run = T(n) − n × slope (dataset, models, store creation, checks).
* truncated = a forward that stops after the deepest chosen block (QaTa's {4,6,8,12}) vs the full model.
* bf16 = CPU autocast: speed and the features' relative error against float32.
* floor = UNet FLOPs (torch.utils.flop_counter) over this machine's measured float32 matmul rate.
* On a GPU, the paper's configuration (ADM-256 flags, random weights, 256 px, fp16): images/s.
"""

from __future__ import annotations

import itertools
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_parser, median_time, random_unet_dir, report, setup_path, work_dir  # noqa: I001 (before setup_path)

setup_path()

import numpy as np
import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from extract.checkpoints import PRESETS
from extract.datasets import open_dataset
from extract.diffusion import shared_noise
from extract.features import FeatureExtractor
from extract.pretrain import PRETRAIN_PRESETS
from extract.run import ExtractConfig, run_extract
from extract.shared import to_unit_range
from extract.unet import load_unet

STEPS = (50, 150, 250)
QATA_BLOCKS = (4, 6, 8, 12)


def bare_forwards(extractor: FeatureExtractor, x0: torch.Tensor, blocks: tuple[int, ...], batch: int,
                  full: bool = False) -> None:
    """The UNet work of an extraction: every (image, step) sample, ``batch`` at a time, padded."""
    samples = [(i, s) for i in range(len(x0)) for s in STEPS]
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        xb = x0[[i for i, _ in chunk]]
        t = torch.tensor([s for _, s in chunk])
        if full:
            extractor.samples(xb, t, [len(extractor.unet.output_blocks) - 1], pad_to=batch)
        else:
            extractor.samples(xb, t, blocks, pad_to=batch)


def forward_flops(extractor: FeatureExtractor, size: int, blocks: tuple[int, ...], full: bool = False) -> float:
    """FLOPs of one sample's (truncated or full) forward pass."""
    x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter:
        last = len(extractor.unet.output_blocks) - 1
        extractor.samples(x, torch.tensor([50]), [last] if full else blocks)
    return float(counter.get_total_flops())


def matmul_rate(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of an n×n product on this machine (the current torch threads)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = min(median_time(lambda: torch.mm(a, b), 1)[0] for _ in range(repeats))
    return 2 * n ** 3 / best


def rel_error(a: dict[int, torch.Tensor], b: dict[int, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


def gpu_paper_config(n_batches: int) -> list[list]:
    """The paper's UNet (ADM-256 flags, random weights) at 256 px on the GPU, fp16 autocast."""
    from extract.unet import create_unet

    rows = []
    unet = create_unet(**PRESETS["adm-imagenet-256"].flags)
    for autocast in (False, True):
        ex = FeatureExtractor(unet, shared_noise(256), device="cuda", autocast=autocast)
        x0 = torch.rand(8, 3, 256, 256) * 2 - 1

        def run(ex: FeatureExtractor = ex, x0: torch.Tensor = x0) -> None:
            for _ in range(n_batches):
                ex.samples(x0, torch.tensor([50] * 8), (6, 8, 12, 16))
            torch.cuda.synchronize()

        med, _ = median_time(run, 3)
        samples_per_s = 8 * n_batches / med
        rows.append(["fp16 autocast" if autocast else "float32", samples_per_s, samples_per_s / len(STEPS)])
    return rows


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--images", type=int, help="training images extracted [quick 8, full 32]")
    ap.add_argument("--size", type=int, help="[quick 128, full 256]")
    ap.add_argument("--batch-size", type=int, help="[half the images]")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    n = args.images or (8 if args.quick else 32)
    size = args.size or (128 if args.quick else 256)
    half = n // 2
    batch = args.batch_size or half
    flags = PRETRAIN_PRESETS["gpu-256"]  # ADM-256's layout (18 output blocks) at a quarter of its width
    quiet = Console(stderr=True, quiet=True)
    work = work_dir()
    unet_dir = random_unet_dir(flags, work / "unet", channels=args.unet_channels)

    cfg = ExtractConfig(dataset="qata", data_root=args.data_root, unet=str(unet_dir), text_encoder="minilm",
                        size=size, steps=STEPS, blocks=QATA_BLOCKS, splits=("train",), limit=n,
                        batch_size=batch, cache_dir=work / "cache", device="cpu")
    runs = itertools.count()

    def extract_once(images: int) -> None:
        run_extract(replace(cfg, limit=images, cache_dir=work / f"cache{next(runs)}"), console=quiet)

    ds = open_dataset("qata", args.data_root, splits=("train",)).head(n)
    x0 = torch.from_numpy(to_unit_range(np.stack([ds.load_image_uint8(it, size) for it in ds.by_split("train")])))
    unet = load_unet(unet_dir / "model.pt", unet_dir / "flags.json")
    ex32 = FeatureExtractor(unet, shared_noise(size), device="cpu")
    ex16 = FeatureExtractor(unet, shared_noise(size), device="cpu", autocast=True)

    # one process, interleaved: extract, bare (n and n/2 images), full, bf16 — each `repeats` times after a warm-up
    jobs = {"extract": lambda: extract_once(n), "bare": lambda: bare_forwards(ex32, x0, QATA_BLOCKS, batch),
            "extract half": lambda: extract_once(half), "bare half": lambda: bare_forwards(ex32, x0[:half], QATA_BLOCKS, batch),
            "full": lambda: bare_forwards(ex32, x0, QATA_BLOCKS, batch, full=True),
            "bf16": lambda: bare_forwards(ex16, x0, QATA_BLOCKS, batch)}
    timings: dict[str, list[float]] = {k: [] for k in jobs}
    for fn in jobs.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in jobs.items():
            t0 = time.perf_counter()
            fn()
            timings[name].append(time.perf_counter() - t0)
    med = {k: float(np.median(v)) for k, v in timings.items()}

    probe = x0[:2].repeat(3, 1, 1, 1)[:batch]
    t = torch.tensor(([50, 150, 250] * batch)[: len(probe)])
    bf16_err = rel_error(ex16.samples(probe, t, QATA_BLOCKS), ex32.samples(probe, t, QATA_BLOCKS))

    flops_trunc = forward_flops(ex32, size, QATA_BLOCKS)
    flops_full = forward_flops(ex32, size, QATA_BLOCKS, full=True)
    rate = matmul_rate()
    floor = flops_trunc * n * len(STEPS) / rate
    overhead = med["extract"] / med["bare"]
    slope = {k: (med[k] - med[f"{k} half"]) / (n - half) for k in ("extract", "bare")}
    per_image = slope["extract"] / slope["bare"]
    fixed = med["extract"] - n * slope["extract"]

    tables = {
        "Extraction vs the bare UNet (QaTa train images, blocks 4,6,8,12 × steps 50,150,250)": (
            ["what", "median s", "all runs s", "per image ms", "× bare"],
            [[k, med[k], " / ".join(f"{v:.2f}" for v in timings[k]), 1000 * med[k] / n, med[k] / med["bare"]]
             for k in jobs]),
        f"Fixed and per-image costs (slopes between {half} and {n} images)": (
            ["what", "fixed s per run", "per image ms", "per image × bare"],
            [["extract", fixed, 1000 * slope["extract"], per_image],
             ["bare", med["bare"] - n * slope["bare"], 1000 * slope["bare"], 1.0]]),
        "Compute floor": (
            ["FLOPs / sample (truncated)", "FLOPs / sample (full)", "matmul GFLOP/s", "floor s", "extract / floor",
             "bare / floor"],
            [[f"{flops_trunc / 1e9:.2f} G", f"{flops_full / 1e9:.2f} G", rate / 1e9, floor, med["extract"] / floor,
              med["bare"] / floor]]),
        "bf16 autocast on the CPU": (
            ["speed vs float32", "max relative error of a block's features"],
            [[med["bare"] / med["bf16"], bf16_err]]),
    }
    result = {"overhead": overhead, "per_image_overhead": per_image, "fixed_s": fixed, "truncated_gain": med["full"] / med["bare"], "bf16_speedup":
              med["bare"] / med["bf16"], "bf16_rel_err": bf16_err, "extract_over_floor": med["extract"] / floor}
    if torch.cuda.is_available():
        rows = gpu_paper_config(2 if args.quick else 10)
        tables["GPU: the paper's UNet (ADM-256 flags, random weights), 256 px, blocks 6,8,12,16"] = (
            ["dtype", "samples/s", "images/s (3 steps)"], rows)
        result["gpu_images_per_s"] = rows[-1][2]
    meta = {"unet_channels": args.unet_channels, "images": n, "size": size, "batch_size": batch, "flags": flags, "blocks": QATA_BLOCKS,
            "steps": STEPS, "repeats": args.repeats, "timings": timings}
    report("extract", mode, args.out, tables, result, meta)


if __name__ == "__main__":
    main()
