"""Same inputs and seed → the same bytes: every file of a store (zarr and HDF5), and a fit's summary."""

from __future__ import annotations

from pathlib import Path

import pytest

from train.runs.rundir import WEIGHTS
from tests.reliability.conftest import cli, digest, extract_args, mini_monuseg, stores


@pytest.mark.parametrize("fmt", ["zarr", "h5"])
def test_two_extracts_write_identical_bytes(fmt: str, tmp_path: Path) -> None:
    root = mini_monuseg(tmp_path / "monuseg")
    made = []
    for name in ("a", "b"):
        res = cli(extract_args(root, tmp_path / name, "--store-format", fmt))
        assert res.code == 0, res.stderr
        made.append(stores(tmp_path / name)[0])
    assert made[0].name == made[1].name
    a, b = digest(made[0]), digest(made[1])
    assert len(a) >= (100 if fmt == "zarr" else 1) and a == b


def test_two_fits_write_identical_results(tmp_path: Path) -> None:
    root = mini_monuseg(tmp_path / "monuseg")
    assert cli(extract_args(root, tmp_path / "cache")).code == 0
    store = stores(tmp_path / "cache")[0]
    outputs = []
    for name in ("a", "b"):
        run = tmp_path / name
        res = cli(["fit", "--cache", str(store), "--out", str(run), "--epochs", "4", "--dim", "16",
                   "--train-count", "2", "--subset-seed", "1"])
        assert res.code == 0, res.stderr
        assert cli(["evaluate", str(run), "--no-overlays"]).code == 0
        outputs.append(run)
    a, b = outputs
    assert (a / "eval-test" / "summary.json").read_bytes() == (b / "eval-test" / "summary.json").read_bytes()
    assert (a / WEIGHTS).read_bytes() == (b / WEIGHTS).read_bytes()
    assert (a / "eval-test" / "per_image.csv").read_bytes() == (b / "eval-test" / "per_image.csv").read_bytes()
