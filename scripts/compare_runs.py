"""Paired comparison of two sets of evaluated runs: is A better than B beyond the subset-to-subset noise?

    python scripts/compare_runs.py --a runs/issue4/it20000/textdiff-{0,1,2} \\
                                   --b runs/results/monuseg-untrained/textdiff-{0,1,2}

Runs are paired by their training subset (``config.json``'s ``fit.subset_seed``) and, within a pair, images
by id (``eval-<split>/per_image.csv``), so each difference compares the same image segmented by heads
trained on the same labelled images. Prints the mean Dice of each side, the mean paired difference with a
95 % interval from a two-level bootstrap (subsets, then images within each subset), the per-subset
differences, and on how many images A is ahead.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file, by a bare python3 too
from train.runs import rundir  # noqa: E402  (the standard library only)


@dataclass(frozen=True)
class Comparison:
    """Per-subset paired Dice differences (A − B), one array per subset seed, and the two means."""

    seeds: list[int]
    diffs: list[np.ndarray]
    mean_a: float
    mean_b: float

    @property
    def mean_diff(self) -> float:
        """Mean over subsets of the per-subset mean difference (the difference of the tables' means)."""
        return float(np.mean([d.mean() for d in self.diffs]))

    def wins(self) -> tuple[int, int]:
        """(images where A is ahead, paired images in all)."""
        return sum(int((d > 0).sum()) for d in self.diffs), sum(d.size for d in self.diffs)

    def interval(self, n_boot: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
        """Bootstrap interval of ``mean_diff``: resample subsets with replacement, then images within each."""
        rng = np.random.default_rng(seed)
        means = np.empty(n_boot)
        for i in range(n_boot):
            picked = rng.integers(len(self.diffs), size=len(self.diffs))
            means[i] = np.mean([self.diffs[k][rng.integers(self.diffs[k].size, size=self.diffs[k].size)].mean()
                                for k in picked])
        lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        return float(lo), float(hi)


def read_run(run: Path, split: str) -> tuple[int, dict[str, float]]:
    """(subset seed, {image id: Dice}) of one evaluated run folder."""
    config, per_image = run / rundir.CONFIG, rundir.eval_dir(run, split) / rundir.PER_IMAGE
    for path in (config, per_image):
        if not path.is_file():
            raise SystemExit(f"{path}: missing (is {run} a fit run evaluated on {split}?)")
    seed = rundir.read_json(config)["fit"]["subset_seed"]
    with per_image.open(newline="") as f:
        return int(seed), {row["id"]: float(row["dice"]) for row in csv.DictReader(f)}


def compare(runs_a: list[Path], runs_b: list[Path], split: str = "test") -> Comparison:
    """Pair the runs of A and B by subset seed and their images by id."""
    a = dict(read_run(r, split) for r in runs_a)
    b = dict(read_run(r, split) for r in runs_b)
    if len(a) != len(runs_a) or len(b) != len(runs_b):
        raise SystemExit("two runs on one side share a subset seed; give one run per subset")
    seeds = sorted(a.keys() & b.keys())
    if not seeds:
        raise SystemExit(f"no subset seed in common: A has {sorted(a)}, B has {sorted(b)}")
    diffs = []
    for s in seeds:
        if a[s].keys() != b[s].keys():
            raise SystemExit(f"subset {s}: A and B were scored on different images "
                             f"({len(a[s])} vs {len(b[s])}; {len(a[s].keys() ^ b[s].keys())} differ)")
        ids = sorted(a[s])
        diffs.append(np.array([a[s][i] - b[s][i] for i in ids]))
    mean_a = float(np.mean([np.mean(list(a[s].values())) for s in seeds]))
    mean_b = float(np.mean([np.mean(list(b[s].values())) for s in seeds]))
    return Comparison(seeds, diffs, mean_a, mean_b)


def report(c: Comparison, n_boot: int = 10000) -> str:
    """The comparison as a few lines of text (Dice in %)."""
    lo, hi = c.interval(n_boot)
    won, total = c.wins()
    per_seed = ", ".join(f"{s}: {100 * d.mean():+.2f}" for s, d in zip(c.seeds, c.diffs))
    return "\n".join([
        f"A {100 * c.mean_a:.2f} vs B {100 * c.mean_b:.2f} mean Dice % over subsets {c.seeds}",
        f"A − B {100 * c.mean_diff:+.2f} points, 95 % bootstrap interval [{100 * lo:+.2f}, {100 * hi:+.2f}]",
        f"per subset: {per_seed}",
        f"A ahead on {won} of {total} paired images",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--a", type=Path, nargs="+", required=True, help="evaluated run folders of A")
    parser.add_argument("--b", type=Path, nargs="+", required=True, help="evaluated run folders of B")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n-boot", type=int, default=10000)
    args = parser.parse_args()
    print(report(compare(args.a, args.b, args.split), args.n_boot))


if __name__ == "__main__":
    main()
