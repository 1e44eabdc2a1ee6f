"""Every benchmark's quick mode runs end to end at a tiny size and ends with its RESULT line, in the default
suite, so that no bench can rot unseen (a bench patches library internals: a moved name fails here). Their UNets are
narrowed to 32 channels (same layout and blocks): the code paths are the same, at a fraction of the suite's time."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "extract": ["--images", "2", "--size", "64", "--repeats", "1"],
    "fit": ["--images", "2", "--size", "64", "--epochs", "1", "--dim", "32", "--unet-flags", "gpu-256"],
    "cache": ["--images", "2", "--size", "64"],
    "memory": ["--counts", "2,4", "--size", "32", "--memory-budget-gb", "0.001"],
    "cluster": ["--images", "8", "--size", "32", "--repeats", "1"],
    "head": ["--dim", "16", "--repeats", "1", "--size", "64", "--unet-flags", "gpu-256"],
}


def test_every_bench_is_tested() -> None:
    assert sorted(TINY) == sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name", sorted(TINY))
def test_benchmark_runs_and_reports(name: str, qata_root: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / f"{name}.py"), "--quick", "--data-root",
                           str(qata_root), "--out", str(tmp_path), "--unet-channels", "32", *TINY[name]],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    result = dict(kv.split("=") for kv in last.removeprefix("RESULT ").split())
    payload = json.loads((tmp_path / f"{name}-quick.json").read_text())
    assert set(result) == set(payload["result"]) and payload["machine"]["cores"] >= 1
    assert all(math.isfinite(float(v)) for v in result.values())
    # at a tiny size a fixed cost or a per-image slope (each a difference of two timings, here of 1 and 2 images)
    # or a count may be zero or below: CI's failure of stop 32 was such a slope on a loaded machine
    loose = ("largest_in_memory", "local1_overhead_s", "data_wait", "fixed_s", "per_image_overhead")
    assert all(float(v) > 0 for k, v in result.items() if k not in loose)


def test_unet_channels_narrow_the_width_and_keep_the_blocks(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from bench.common import random_unet_dir
    from extract.pretrain import PRETRAIN_PRESETS
    from extract.unet import load_unet

    flags = PRETRAIN_PRESETS["gpu-256"]
    narrow = random_unet_dir(flags, tmp_path / "narrow", channels=32)
    written = json.loads((narrow / "flags.json").read_text())
    assert written["num_channels"] == 32 and written["num_head_channels"] == 32
    assert {k: v for k, v in written.items() if k not in ("num_channels", "num_head_channels")} == \
        {k: v for k, v in flags.items() if k not in ("num_channels", "num_head_channels")}
    assert len(load_unet(narrow / "model.pt", narrow / "flags.json").output_blocks) == 18
    with pytest.raises(SystemExit, match="multiple of 32"):
        random_unet_dir(flags, tmp_path / "odd", channels=48)
