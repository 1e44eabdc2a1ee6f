"""Extraction on a dask.distributed LocalCluster vs serial: images/s, start-up, and the store equality.

    python bench/cluster.py [--quick] [--out runs/bench]

The same QaTa images, UNet (gpu-256 flags, random weights) and blocks in every row, each into a fresh
cache folder; wall time of ``run_extract`` including the cluster's start-up (worker processes import
torch and load the models once each), and the steady rate once a quarter of the images are written
(start-up excluded: what a long run sees; slope of images written vs time over the last three
quarters, from the progress callbacks; 4-image shards, --batch-size 6). "threads" is torch's intra-op threads per process (the 1-thread rows only in a full run). A row
is "= serial" when its store's chunk files equal the serial run's byte for byte. Median of --repeats.

What it says about a real cluster: a worker's rate is its machine's serial rate; N workers add up
while the store's filesystem takes N x rate x (bytes per image) and the scheduler's per-shard cost
(milliseconds) stays small beside a shard's seconds. Both are printed, so the ceiling can be read off.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_parser, random_unet_dir, report, setup_path, work_dir  # noqa: I001 (before setup_path)

setup_path()

import statistics

import numpy as np
from rich.console import Console

from extract.pretrain import PRETRAIN_PRESETS
from extract.run import ExtractConfig, run_extract

BLOCKS = (4, 6, 8, 12)


def chunk_bytes(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*")
            if p.is_file() and p.name != "zarr.json"}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--images", type=int, default=None, help="QaTa test images [default: 32 quick, 96 full]")
    ap.add_argument("--size", type=int, default=None, help="[default: 64 quick, 128 full]")
    ap.add_argument("--repeats", type=int, default=None, help="[default: 1 quick, 3 full]")
    args = ap.parse_args()
    mode = "quick" if args.quick else "full"
    n_images = args.images or (32 if args.quick else 96)
    size = args.size or (64 if args.quick else 128)
    repeats = args.repeats or (1 if args.quick else 3)
    cores = os.cpu_count() or 1
    tmp = work_dir()
    unet = random_unet_dir(PRETRAIN_PRESETS["gpu-256"], tmp / "unet", channels=args.unet_channels)  # 18 output blocks at any size
    base = ExtractConfig(dataset="qata", data_root=args.data_root, unet=str(unet), text_encoder="minilm", size=size,
                         blocks=BLOCKS, splits=("test",), limit=n_images, batch_size=6)  # 4-image shards
    quiet = Console(quiet=True)
    # quick mode (the suite's smoke run) leaves out the 1-thread rows: every cluster start costs its workers' imports
    rows_cfg = [("serial", None, None), ("local:1", "local:1", None), (f"local:{cores}", f"local:{cores}", None)]
    if not args.quick:
        rows_cfg += [("serial", None, 1), (f"local:{cores}", f"local:{cores}", 1)]
    run_extract(replace(base, cache_dir=tmp / "warm"), console=quiet)  # imports, page cache
    rows, stores = [], {}
    for k, (label, scheduler, threads) in enumerate(rows_cfg):
        times, steady = [], []
        for r in range(repeats):
            cfg = replace(base, cache_dir=tmp / f"c{k}-{r}", scheduler=scheduler, threads=threads)
            marks: list[tuple[float, int]] = []  # (time, images written) as the run goes
            t0 = time.perf_counter()
            path = run_extract(cfg, console=quiet, on_batch=lambda n: marks.append((time.perf_counter(), n)),
                               on_shard=lambda n, _client: marks.append((time.perf_counter(), n)))
            times.append(time.perf_counter() - t0)
            late = np.array([m for m in marks if m[1] >= n_images // 4])  # past the start-up and first shards
            steady.append(float(np.polyfit(late[:, 0], late[:, 1], 1)[0]))  # images/s: slope of images vs time
            print(f"{label} threads={threads or 'default'}: {times[-1]:.1f} s, steady {steady[-1]:.2f} images/s",
                  file=sys.stderr, flush=True)
        stores[k] = chunk_bytes(Path(path))
        rows.append([label, threads or "default", statistics.median(times), statistics.median(steady)])
    serial_s, serial_rate = rows[0][2], rows[0][3]
    nbytes = sum(len(v) for v in stores[0].values()) / n_images
    at = {(label, threads or "default"): k for k, (label, _, threads) in enumerate(rows_cfg)}  # (run, threads) -> row
    serial_1 = at.get(("serial", 1), 0)
    table = []
    for k, (label, threads, wall, rate) in enumerate(rows):
        ref = serial_1 if threads == 1 else 0
        same = stores[k] == stores[ref]
        table.append([label, threads, round(wall, 2), round(n_images / wall, 3), round(serial_s / wall, 3),
                      round(rate, 3), round(rate / serial_rate, 3),
                      f"= serial ({'1 thread' if ref else 'default threads'})" if same else "differs"])
    many = f"local:{cores}"
    t_start = rows[at["local:1", "default"]][2] - serial_s  # start-up + scheduling
    result = {"serial_images_per_s": round(n_images / serial_s, 3),
              f"local{cores}_speedup": table[at[many, "default"]][4],
              "local1_overhead_s": round(t_start, 2), "bytes_per_image": int(nbytes)}
    if not args.quick:
        result.update({f"local{cores}_threads1_speedup": table[at[many, 1]][4],
                       f"local{cores}_threads1_steady_speedup": table[at[many, 1]][6]})
    report("cluster", mode, args.out, {
        f"Extraction of {n_images} QaTa images at {size} px, blocks {BLOCKS}, 3 steps (median of {repeats})":
            (["run", "threads", "wall s", "images/s", "vs serial", "steady images/s", "steady vs serial", "store"],
             table),
    }, result, {"images": n_images, "size": size, "blocks": BLOCKS, "repeats": repeats, "unet": "gpu-256 random",
                                      "unet_channels": args.unet_channels})


if __name__ == "__main__":
    main()
