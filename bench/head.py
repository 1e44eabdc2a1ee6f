"""The TextDiff head at the paper's sizes: literal vs fast forward, fp32 vs bf16, against the compute floor.

    python bench/head.py [--quick] [--out runs/bench]

One training step = forward + backward + Adam on one image (batch 1) of random features with the
paper's shapes, text fusion by cross-attention (12 tokens), output 256 px; eval forward = the same
forward under ``torch.no_grad``. Configurations: MoNuSeg (blocks 6,8,12,16 of ADM-256: 512@32,
512@64, 256@128, 256@256 × 3 steps) and QaTa (blocks 4,6,8,12: 1024@16, 512@32, 512@64, 256@128),
width 768. FLOPs per step come from ``torch.utils.flop_counter``; the floor is FLOPs over the rate of a
large fp32 matmul timed on the same machine, and ``over_floor`` = step time / floor.
fast_speedup = literal fp32 step / fast fp32 step (MoNuSeg, medians of the same run).

The allocator: the fp32 training steps are first timed with glibc's default malloc (every tensor over
32 MiB a fresh, page-faulted ``mmap``), then the rest with :func:`common.devices.keep_freed_memory`,
which every CPU stage of textdiff turns on (``TEXTDIFF_MALLOC=system`` turns it off); minor page faults
per step are counted for both. ``data_wait``: a streamed fit (``memory_budget_gb=0``: every batch read
from the store by the background feed) at the paper's MoNuSeg configuration — a store extracted from
MoNuSeg images at 256 px by a random-weight ADM-256 (the paper's flags), blocks 6,8,12,16, steps
50,150,250, width 768 — as the sum of its history's ``data_wait_seconds`` over its epochs' ``seconds``.
"""

from __future__ import annotations

import csv
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import SHARED_DATA, base_parser, median_time, random_unet_dir, report, setup_path, work_dir

setup_path()

import torch
from rich.console import Console
from torch.utils.flop_counter import FlopCounterMode

from extract.checkpoints import PRESETS
from extract.pretrain import PRETRAIN_PRESETS
from common.devices import keep_freed_memory
from extract.run import ExtractConfig, run_extract
from train.fit import FitConfig, fit
from train.nets.head import TextDiffHead, count_parameters
from train.runs.rundir import HISTORY

CONFIGS = {"MoNuSeg": ([1536, 1536, 768, 768], [32, 64, 128, 256]),
           "QaTa": ([3072, 1536, 1536, 768], [16, 32, 64, 128])}
SIZE, TOKENS, TEXT_DIM = 256, 12, 768
UNETS = {"paper": PRESETS["adm-imagenet-256"].flags, "gpu-256": PRETRAIN_PRESETS["gpu-256"]}


def matmul_rate(n: int = 2048, repeats: int = 3) -> float:
    """FLOP/s of an n×n fp32 matmul (median of ``repeats``)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds, _ = median_time(lambda: a @ b, repeats)
    return 2 * n**3 / seconds


def make(config: str, dim: int, size: int = SIZE) -> tuple[TextDiffHead, list[torch.Tensor], torch.Tensor]:
    """A seeded head of ``config``'s channels and random features of its shapes for ``size`` px images."""
    torch.manual_seed(0)
    channels, sizes = CONFIGS[config]
    head = TextDiffHead(channels, text_dim=TEXT_DIM, dim=dim)
    head.init_weights()
    feats = [torch.randn(1, c, s * size // SIZE, s * size // SIZE) for c, s in zip(channels, sizes)]
    return head, feats, torch.randn(1, TOKENS, TEXT_DIM)


def step_fn(head: TextDiffHead, feats: list[torch.Tensor], tokens: torch.Tensor, impl: str, bf16: bool,
            train: bool, size: int = SIZE) -> Callable[[], None]:
    """One training step (forward, cross-entropy, backward, Adam) or one eval forward."""
    opt = torch.optim.Adam(head.parameters(), lr=1e-4)
    target = torch.randint(0, 2, (1, size, size))

    def run() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.set_grad_enabled(train):
            logits = head(feats, tokens, out_size=size, impl=impl)
            loss = torch.nn.functional.cross_entropy(logits.float(), target)
        if train:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return run


def flops(head: TextDiffHead, feats: list[torch.Tensor], tokens: torch.Tensor, impl: str, size: int = SIZE) -> int:
    """FLOPs of one training step's forward and backward."""
    counter = FlopCounterMode(display=False)
    with counter:
        head.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(head(feats, tokens, out_size=size, impl=impl),
                                          torch.zeros(1, size, size, dtype=torch.long)).backward()
    return counter.get_total_flops()


def faulted_time(fn: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and its minor page faults per call (one untimed warm-up first)."""
    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    seconds, _ = median_time(fn, repeats, warmup=0)
    return seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeats


def streamed_fit(data_root: Path, train_images: int, epochs: int, dim: int, size: int = SIZE,
                 unet_flags: str = "paper", unet_channels: int | None = None) -> tuple[float, float, float]:
    """(data_wait fraction, fit seconds, seconds per training step) of a streamed fit at the paper's MoNuSeg shapes."""
    work, quiet = work_dir(), Console(stderr=True, quiet=True)
    unet = random_unet_dir(UNETS[unet_flags], work / "unet", channels=unet_channels)
    store = run_extract(ExtractConfig(dataset="monuseg", data_root=data_root, unet=str(unet), text_encoder="minilm",
                                      size=size, steps=(50, 150, 250), blocks=(6, 8, 12, 16), splits=("train", "val"),
                                      limit=train_images, cache_dir=work / "cache", device="cpu"), console=quiet)
    out = work / "fit"
    t0 = time.perf_counter()
    fit(FitConfig.flat(cache=store, out=out, epochs=epochs, dim=dim, memory_budget_gb=0.0), console=quiet)
    seconds = time.perf_counter() - t0
    with open(out / HISTORY, newline="") as f:
        rows = list(csv.DictReader(f))
    wait = sum(float(r["data_wait_seconds"]) for r in rows) / sum(float(r["seconds"]) for r in rows)
    step = sum(float(r["train_seconds"]) for r in rows) / (epochs * train_images)
    return wait, seconds, step


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--dim", type=int, default=768, help="head width [768, the paper's]")
    ap.add_argument("--repeats", type=int, help="timed repeats per measurement [quick: 3 for the fp32 training "
                                                "step, 1 otherwise; full: 3]")
    ap.add_argument("--monuseg", type=Path, default=SHARED_DATA / "MoNuSeg", help="MoNuSeg for the streamed fit")
    ap.add_argument("--size", type=int, default=SIZE, help="image size: the output and the feature maps scale "
                                                           "with it [256, the paper's]")
    ap.add_argument("--unet-flags", choices=sorted(UNETS), default="paper",
                    help="the streamed fit's random UNet: paper (ADM-256's flags) or gpu-256 (a quarter of the width)")
    args = ap.parse_args()
    size = args.size
    mode = "quick" if args.quick else "full"
    configs = ["MoNuSeg"] if args.quick else list(CONFIGS)
    rate = matmul_rate()
    rows, flop_rows, malloc_rows, res = [], [], [], {}
    head, feats, tokens = make("MoNuSeg", args.dim, size)
    for allocator in ("glibc default", "keep_freed_memory"):  # the default first: the switch is one-way
        if allocator != "glibc default" and not keep_freed_memory():
            break
        for impl in ("literal", "fast"):
            med, faults = faulted_time(step_fn(head, feats, tokens, impl, False, True, size), args.repeats or 3)
            print(f"MoNuSeg fp32 {impl} train, {allocator}: median {med:.2f} s, {faults:.0f} page faults",
                  file=sys.stderr, flush=True)
            malloc_rows.append(["MoNuSeg", impl, allocator, med, faults])
            res[("malloc", allocator, impl)] = med
    for config in configs:
        head, feats, tokens = make(config, args.dim, size)
        for impl in ("literal", "fast"):
            f = flops(head, feats, tokens, impl, size)
            flop_rows.append([config, impl, count_parameters(head), f / 1e9, f / rate])
            res[(config, impl, "flops")] = f
        for precision in ("fp32", "bf16"):
            for impl in ("literal", "fast"):
                row = [config, precision, impl]
                for train in (True, False):
                    main_case = precision == "fp32" and train
                    reps = args.repeats or (3 if main_case or not args.quick else 1)
                    t0 = time.perf_counter()
                    med, _ = median_time(step_fn(head, feats, tokens, impl, precision == "bf16", train, size), reps)
                    print(f"{config} {precision} {impl} {'train' if train else 'eval'}: median {med:.2f} s "
                          f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
                    res[(config, precision, impl, train)] = med
                    row.append(med)
                rows.append(row)
        for precision in ("fp32", "bf16"):
            rows.append([config, precision, "literal / fast",
                         res[(config, precision, "literal", True)] / res[(config, precision, "fast", True)],
                         res[(config, precision, "literal", False)] / res[(config, precision, "fast", False)]])
    step = res[("MoNuSeg", "fp32", "fast", True)]
    speedup = res[("MoNuSeg", "fp32", "literal", True)] / step
    over = step / (res[("MoNuSeg", "fast", "flops")] / rate)
    default = ("malloc", "glibc default")
    speedup_default = res[(*default, "literal")] / res[(*default, "fast")]
    n_stream, e_stream = (1, 2) if args.quick else (5, 3)
    wait, fit_s, stream_step = streamed_fit(args.monuseg, n_stream, e_stream, args.dim, size, args.unet_flags,
                                           args.unet_channels)
    print(f"streamed fit: {fit_s:.0f} s, data wait {wait:.3f}", file=sys.stderr, flush=True)
    tables = {
        f"Steps (batch 1, width {args.dim}, output {size} px; median seconds)": (
            ["config", "precision", "head", "training step s", "eval forward s"], rows),
        f"FLOPs per training step (forward + backward) and the floor at {rate / 1e9:.1f} GFLOP/s (fp32 matmul)": (
            ["config", "head", "parameters", "GFLOP", "floor s"], flop_rows),
        "The allocator (fp32 training step, width 768; median seconds, minor page faults per step)": (
            ["config", "head", "malloc", "training step s", "page faults"], malloc_rows),
        f"A streamed fit ({n_stream} train + {n_stream} val MoNuSeg images at {size} px, {e_stream} epochs, "
        f"width {args.dim}, features read from the store by the background feed)": (
            ["fit s", "training step s", "data wait / wall"], [[fit_s, stream_step, wait]]),
    }
    meta = {"dim": args.dim, "size": size, "unet_flags": args.unet_flags, "unet_channels": args.unet_channels, "tokens": TOKENS, "configs": {c: CONFIGS[c] for c in configs},
            "matmul_gflops": rate / 1e9, "repeats": args.repeats}
    report("head", mode, args.out, tables, {"fast_speedup": speedup, "data_wait": wait, "step_s": step,
                                            "over_floor": over, "fast_speedup_default_malloc": speedup_default,
                                            "literal_step_s": res[("MoNuSeg", "fp32", "literal", True)],
                                            "matmul_gflops": rate / 1e9}, meta)


if __name__ == "__main__":
    main()
