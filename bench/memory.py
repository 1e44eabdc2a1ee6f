"""Peak memory of `fit` as the training set grows: in memory up to the budget, then streamed, bounded.

    python bench/memory.py [--quick] [--out runs/bench]

One store (QaTa, ``cpu-64`` flags with random weights, blocks 4,6,8 × steps 50,150,250) is extracted
once; then ``fit`` (1 epoch) runs in a fresh process for each training-set size, and that process's peak
RSS (``VmHWM``) is recorded, with whether the training features were held in memory or streamed.
``--memory-budget-gb`` is set low enough that the switch happens inside the sweep (the default, 4 GB,
would hold every size here in memory).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import base_parser, random_unet_dir, report, setup_path, work_dir

setup_path()

STEPS = (50, 150, 250)
BLOCKS = (4, 6, 8)


def peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM; ``ru_maxrss`` would include the parent's, kept across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(store: str, count: int, budget_gb: float, out: str) -> None:
    """Run one fit in this process and print its peak RSS (MB) and whether training data was in memory."""
    from rich.console import Console

    import train.fit as fit_module
    from dataclasses import replace

    from train.data.readers import SplitFeatures
    from train.registry import MODELS

    seen = {}

    class Recorded(SplitFeatures):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            seen.setdefault(self.split, (self.in_memory, self.nbytes))

    MODELS["textdiff"] = replace(MODELS["textdiff"], reader=Recorded)  # fit opens its splits with the spec's reader
    before = peak_rss_mb()
    fit_module.fit(fit_module.FitConfig.flat(cache=Path(store), out=Path(out), epochs=1, dim=64, train_count=count,
                                        memory_budget_gb=budget_gb), console=Console(stderr=True, quiet=True))
    peak = peak_rss_mb()
    print(json.dumps({"peak_mb": peak, "after_imports_mb": before, "train_in_memory": seen["train"][0],
                      "train_feature_mb": seen["train"][1] / 1e6}))


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--counts", help="training-set sizes [quick 5,50,150; full 5,50,150,600]")
    ap.add_argument("--size", type=int, help="[64]")
    ap.add_argument("--memory-budget-gb", type=float, help="fit's in-memory limit [quick 0.1, full 0.25]")
    ap.add_argument("--child", nargs=4, metavar=("STORE", "COUNT", "BUDGET", "OUT"), help="(internal: run one fit and print its peak RSS)")
    args = ap.parse_args()
    if args.child:
        store, count, budget, out = args.child
        child(store, int(count), float(budget), out)
        return

    from rich.console import Console

    from extract.pretrain import PRETRAIN_PRESETS
    from extract.run import ExtractConfig, run_extract

    mode = "quick" if args.quick else "full"
    counts = [int(c) for c in (args.counts or ("5,50,150" if args.quick else "5,50,150,600")).split(",")]
    size = args.size or 64
    budget = args.memory_budget_gb if args.memory_budget_gb is not None else (0.1 if args.quick else 0.25)
    work = work_dir()
    flags = PRETRAIN_PRESETS["cpu-64"]
    store = run_extract(ExtractConfig(dataset="qata", data_root=args.data_root,
                                      unet=str(random_unet_dir(flags, work / "unet", channels=args.unet_channels)), text_encoder="minilm",
                                      size=size, steps=STEPS, blocks=BLOCKS, splits=("train", "val"),
                                      limit=max(counts), cache_dir=work / "cache", device="cpu"),
                        console=Console(stderr=True))
    rows, peaks = [], {}
    for count in counts:
        proc = subprocess.run([sys.executable, __file__, "--child", str(store), str(count), str(budget),
                               str(work / f"fit-{count}")], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        peaks[count] = r["peak_mb"]
        rows.append([count, r["train_feature_mb"], "in memory" if r["train_in_memory"] else "streamed",
                     r["after_imports_mb"], r["peak_mb"]])
    streamed = [row[0] for row in rows if row[2] == "streamed"]
    in_mem = [row[0] for row in rows if row[2] == "in memory"]
    tables = {f"fit, 1 epoch, QaTa at {size} px, budget {budget} GB (peak RSS of the fit's process)": (
        ["training images", "their features MB", "held", "RSS after imports MB", "peak RSS MB"], rows)}
    result = {"peak_mb_smallest": peaks[counts[0]], "peak_mb_largest": peaks[counts[-1]],
              "largest_in_memory": max(in_mem) if in_mem else 0, "smallest_streamed": min(streamed) if streamed else 0}
    report("memory", mode, args.out, tables, result, {"size": size, "unet_channels": args.unet_channels, "budget_gb": budget, "counts": counts,
                                                     "blocks": BLOCKS, "steps": STEPS, "flags": flags})


if __name__ == "__main__":
    main()
