"""The HDF5 store: the same arrays as zarr, read unchanged by fit, evaluate, cache info and verify;
`cache export` between the formats, resumable."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline
from cache.export import export_store
from cache import FeatureStore, StoreError, list_stores
from extract.run import ExtractConfig, run_extract
from tests.helpers import arrays, assert_same, quiet, tiny_store

runner = CliRunner()


def cli(*args: str) -> str:
    res = runner.invoke(pipeline.app, list(args))
    assert res.exit_code == 0, res.output
    return res.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def both(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny extraction as a zarr folder and as an HDF5 file."""
    cache = tmp_path_factory.mktemp("formats")
    return tiny_store(tiny_unet, cache), tiny_store(tiny_unet, cache, store_format="h5")


def test_h5_store_holds_the_zarr_arrays(both: tuple[Path, Path]) -> None:
    zarr_path, h5_path = both
    assert h5_path.is_file() and h5_path.suffix == ".h5" and h5_path.stem == zarr_path.stem
    assert_same(arrays(h5_path), arrays(zarr_path))
    info_z, info_h = (json.loads(runner.invoke(pipeline.app, ["cache", "info", str(p)]).stdout) for p in both)
    assert info_h["format"] == "h5" and info_z["format"] == "zarr"
    assert info_h["splits"] == info_z["splits"] and info_h["arrays"] == info_z["arrays"]
    assert cli("cache", "verify", str(h5_path)).startswith("OK ")
    assert {r["format"] for r in list_stores(h5_path.parent)} == {"zarr", "h5"}
    assert "would remove 1 store(s)" in cli("cache", "rm", str(h5_path), "--dry-run") and h5_path.is_file()


def test_fit_and_evaluate_read_h5_unchanged(both: tuple[Path, Path], tmp_path: Path) -> None:
    scores = []
    for path in both:
        run = tmp_path / path.suffix[1:]
        cli("fit", "--cache", str(path), "--out", str(run), "--epochs", "2", "--dim", "32", "--train-count", "3")
        cli("evaluate", str(run), "--no-overlays")
        summary = json.loads((run / "eval-test" / "summary.json").read_text())
        scores.append((summary["dice"], summary["iou"]))
    assert scores[0] == scores[1]


def test_export_both_ways_and_resume(both: tuple[Path, Path], tmp_path: Path) -> None:
    zarr_path, _ = both
    rows = 0

    def interrupt() -> None:
        nonlocal rows
        rows += 1
        if rows == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        export_store(zarr_path, "h5", tmp_path / "x.h5", progress=interrupt)
    partial = FeatureStore.open(tmp_path / "x.h5")
    assert 0 < partial.rows_done() < FeatureStore.open(zarr_path).rows_done()  # valid, partly copied
    partial.close()
    h5 = Path(cli("cache", "export", str(zarr_path), "--format", "h5", "--out", str(tmp_path / "x.h5")))
    assert_same(arrays(h5), arrays(zarr_path))
    back = Path(cli("cache", "export", str(h5), "--format", "zarr"))
    assert back == tmp_path / "x.zarr"
    assert_same(arrays(back), arrays(zarr_path))
    assert FeatureStore.open(back).attrs["exported_from"]["path"] == str(h5)
    with pytest.raises(StoreError, match="must end in .h5"):
        export_store(zarr_path, "h5", tmp_path / "y.zarr")


def test_h5_has_one_writer(tiny_unet: Path, both: tuple[Path, Path]) -> None:
    _, h5_path = both
    cfg = ExtractConfig(dataset="synthetic", unet=str(tiny_unet / "adm_tiny.pt"), text_encoder="minilm",
                        unet_flags=tiny_unet / "adm_tiny_flags.json", store_format="h5", scheduler="local:2")
    with pytest.raises(ValueError, match="scheduler needs a zarr store"):
        run_extract(cfg, console=quiet())
    writer = FeatureStore.open(h5_path, "r+")  # another process cannot open it meanwhile
    try:
        res = subprocess.run([sys.executable, "-c", f"from cache.store import FeatureStore; "
                              f"FeatureStore.open({str(h5_path)!r})"], capture_output=True, text=True)
    finally:
        writer.close()
    assert res.returncode != 0 and "another process may be writing it" in res.stderr


def test_zarr_store_at_an_fsspec_url(tiny_unet: Path, both: tuple[Path, Path], tmp_path: Path) -> None:
    zarr_path, _ = both
    url = tiny_store(tiny_unet, f"file://{tmp_path}/remote")  # type: ignore[arg-type]
    assert isinstance(url, str) and url == f"file://{tmp_path}/remote/{zarr_path.name}"
    assert_same(arrays(url), arrays(zarr_path))
    assert cli("cache", "verify", url).startswith("OK ")
    mem = export_store(zarr_path, "zarr", "memory://textdiff-test/s.zarr")  # object-store semantics: no rename
    assert_same(arrays(mem), arrays(zarr_path))
    with pytest.raises(StoreError, match="only zarr stores can live at a URL"):
        export_store(zarr_path, "h5", "memory://textdiff-test/s.h5")


def test_listing_a_url_cache_is_refused_clearly() -> None:
    for command in (["cache", "ls", "--cache-dir", "memory://bucket/cache"],
                    ["cache", "gc", "--cache-dir", "memory://bucket/cache", "--keep", "1", "--dry-run"]):
        res = runner.invoke(pipeline.app, command)
        assert res.exit_code == 1 and "local folders only" in " ".join(res.output.split()), res.output
