"""Cache size and read speed: native float16 chunks vs upsampled float32, codecs, store vs raw reads.

    python bench/cache.py [--quick] [--out runs/bench]

* The paper's configuration (ADM-256, 256 px, 3 steps) by arithmetic: values and bytes per image at the
  blocks' native sizes (what this store keeps) vs upsampled to 256² float32 (what per-pixel feature
  approaches hold).
* Measured on a store extracted here (QaTa, blocks 4,6,8,12 × steps 50,150,250, random weights of
  ADM-256's layout at a quarter width): bytes on disk per image, and each codec's ratio and speed on
  the same float16 chunks.
* Read throughput: every feature chunk through ``FeatureStore.features`` (dask, decoded float16), through
  zarr directly, and a raw read of the same chunk files' bytes; all from the page cache (warm), median of 3;
  and the CRC-32 check stage two runs on every row it loads (``SplitFeatures``), on the decoded rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_parser, median_time, random_unet_dir, report, setup_path, work_dir  # noqa: I001 (before setup_path)

setup_path()

import numcodecs
import numpy as np
import torch
import zarr
from rich.console import Console

from cache.checksums import checksum
from cache.store import FeatureStore
from extract.checkpoints import PRESETS
from extract.pretrain import PRETRAIN_PRESETS
from extract.run import ExtractConfig, run_extract
from extract.unet import create_unet

STEPS = (50, 150, 250)
PAPER_BLOCKS = {"MoNuSeg": (6, 8, 12, 16), "QaTa-COV19": (4, 6, 8, 12)}
MB = 1e6
CODECS = {
    "none": None,
    "blosc lz4 shuffle": numcodecs.Blosc("lz4", 5, numcodecs.Blosc.SHUFFLE),
    "blosc zstd-1 shuffle": numcodecs.Blosc("zstd", 1, numcodecs.Blosc.SHUFFLE),
    "blosc zstd-3 shuffle": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.SHUFFLE),
    "blosc zstd-3 bitshuffle (stores before 2026-11-30)": numcodecs.Blosc("zstd", 3, numcodecs.Blosc.BITSHUFFLE),
    "blosc lz4-9 bitshuffle (the store's)": numcodecs.Blosc("lz4", 9, numcodecs.Blosc.BITSHUFFLE),
    "blosc zstd-7 shuffle": numcodecs.Blosc("zstd", 7, numcodecs.Blosc.SHUFFLE),
    "zstd-3 (no shuffle)": numcodecs.Zstd(3),
}


def paper_sizes() -> list[list]:
    """Per image, ADM-256 at 256 px: native float16 vs upsampled-to-256² float32."""
    with torch.device("meta"):
        shapes = create_unet(**PRESETS["adm-imagenet-256"].flags).output_block_shapes(256)
    rows = []
    for name, blocks in PAPER_BLOCKS.items():
        native = len(STEPS) * sum(int(np.prod(shapes[b])) for b in blocks)
        upsampled = len(STEPS) * sum(shapes[b][0] * 256 * 256 for b in blocks)
        rows.append([name, str(blocks), f"{native / 1e6:.1f} M", f"{upsampled / 1e6:.1f} M", 2 * native / MB,
                     4 * upsampled / MB, (4 * upsampled) / (2 * native)])
    return rows


def codec_rows(chunks: list[np.ndarray]) -> list[list]:
    """Each codec on the same chunks: ratio, compress and decompress MB/s (of raw float16 bytes)."""
    raw = sum(c.nbytes for c in chunks)
    rows = []
    for name, codec in CODECS.items():
        if codec is None:
            rows.append([name, 1.0, "", ""])
            continue
        encoded = [codec.encode(c) for c in chunks]
        t_enc = median_time(lambda codec=codec: [codec.encode(c) for c in chunks], 3)[0]
        t_dec = median_time(lambda codec=codec, encoded=encoded: [codec.decode(e) for e in encoded], 3)[0]
        rows.append([name, raw / sum(len(e) for e in encoded), raw / t_enc / MB, raw / t_dec / MB])
    return rows


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--images", type=int, help="[quick 8, full 32]")
    ap.add_argument("--size", type=int, help="[quick 128, full 256]")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    n = args.images or (8 if args.quick else 32)
    size = args.size or (128 if args.quick else 256)
    flags = PRETRAIN_PRESETS["gpu-256"]
    work = work_dir()
    path = run_extract(ExtractConfig(dataset="qata", data_root=args.data_root,
                                     unet=str(random_unet_dir(flags, work / "unet", channels=args.unet_channels)), text_encoder="minilm",
                                     size=size, steps=STEPS, blocks=PAPER_BLOCKS["QaTa-COV19"], splits=("train",),
                                     limit=n, cache_dir=work / "cache", device="cpu"),
                       console=Console(stderr=True, quiet=True))
    store = FeatureStore.open(path)
    pairs = store.pairs()
    files = sorted(f for f in (path / "train" / "feat").rglob("*") if f.is_file() and f.name != "zarr.json")
    disk = sum(f.stat().st_size for f in files)
    arrays = {p: store.features("train", *p) for p in pairs}
    decoded = sum(a.nbytes for a in arrays.values())
    native_values = decoded // 2 // n
    upsampled_values = sum(a.shape[2] * size * size for a in arrays.values())

    def read_store() -> None:
        for a in arrays.values():
            a.compute()

    group = zarr.open_group(path, mode="r")
    zarrays = [group[f"train/feat/t{s}/b{b}"] for s, b in pairs]

    def read_zarr() -> None:
        for a in zarrays:
            for i in range(n):
                a[i]

    def read_raw() -> None:
        for f in files:
            f.read_bytes()

    t_store = median_time(read_store, 3)[0]
    t_zarr = median_time(read_zarr, 3)[0]
    t_raw = median_time(read_raw, 3)[0]
    loaded = [np.asarray(a.compute()) for a in arrays.values()]

    def check_rows() -> None:  # what stage two adds to a load: every row against its recorded CRC-32
        for a in loaded:
            for row in a:
                checksum(row)

    t_check = median_time(check_rows, 3)[0]
    chunks = [np.asarray(a[i, 0].compute()) for a in arrays.values() for i in range(min(n, 4))]
    tables = {
        "The paper's configuration, per image (ADM-256, 256 px, 3 steps), by arithmetic": (
            ["dataset", "blocks", "values native", "values upsampled", "MB native f16", "MB upsampled f32",
             "upsampled / native"], paper_sizes()),
        f"This store, per image ({n} QaTa images, {size} px, blocks 4,6,8,12 × 3 steps)": (
            ["values native", "MB native f16", "MB on disk (lz4-9 bitshuffle)", "MB upsampled f32",
             "upsampled f32 / on disk"],
            [[native_values, decoded / n / MB, disk / n / MB, 4 * upsampled_values / MB,
              4 * upsampled_values * n / disk]]),
        "Codecs on the same float16 feature chunks": (
            ["codec", "ratio", "compress MB/s", "decompress MB/s"], codec_rows(chunks)),
        "Reading every feature chunk (warm page cache)": (
            ["read", "seconds", "MB/s decoded", "MB/s of file bytes"],
            [["FeatureStore.features (dask, decode)", t_store, decoded / t_store / MB, disk / t_store / MB],
             ["zarr, one chunk at a time (no dask)", t_zarr, decoded / t_zarr / MB, disk / t_zarr / MB],
             ["raw read of the same chunk files", t_raw, "", disk / t_raw / MB],
             ["CRC-32 of every decoded row (fit's check of what it loads)", t_check, decoded / t_check / MB, ""]]),
    }
    result = {"mb_per_image_disk": disk / n / MB, "upsampled_over_disk": 4 * upsampled_values * n / disk,
              "compression": decoded / disk, "read_mb_s": decoded / t_store / MB,
              "store_over_raw_time": t_store / t_raw, "check_over_read_time": t_check / t_store}
    report("cache", mode, args.out, tables, result, {"images": n, "size": size, "flags": flags, "unet_channels": args.unet_channels,
                                              "pairs": pairs})


if __name__ == "__main__":
    main()
