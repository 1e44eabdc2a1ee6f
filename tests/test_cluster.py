"""Extraction on a dask.distributed LocalCluster: the same store as a serial run, even when a worker dies."""

from __future__ import annotations

import os
import signal
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import pipeline
from cache.maintenance import verify_store
from extract.cluster import SchedulerError, check_scheduler, shards
from extract.datasets import Item
from extract.plan import Job
from extract.run import ExtractConfig, run_extract
from tests.helpers import quiet

pytest.importorskip("distributed")

COUNTS = {"train": 6, "val": 3, "test": 3}


def config(adm: Path, cache: Path | str, **kw) -> ExtractConfig:
    return ExtractConfig(dataset="synthetic", unet=str(adm / "adm_tiny.pt"), unet_flags=adm / "adm_tiny_flags.json",
                         text_encoder="minilm", size=32, steps=(50, 250), blocks=(4, 8), cache_dir=cache,
                         batch_size=2, dataset_options={"counts": COUNTS}, **kw)


def store_files(path: Path) -> dict[str, bytes]:
    """Every file of a store (data, done flags, checksums, metadata), by relative path."""
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def serial(tiny_unet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_extract(config(tiny_unet, tmp_path_factory.mktemp("serial")), console=quiet())


def test_local_cluster_writes_the_serial_store(tiny_unet: Path, tmp_path: Path) -> None:
    """The issue's check, through the CLI: --scheduler local:2 equals the serial store; cache verify passes."""
    a = tiny_unet
    runner = CliRunner()

    def extract(cache: Path, *extra: str) -> Path:
        res = runner.invoke(pipeline.app, [
            "extract", "--dataset", "synthetic", "--unet", str(a / "adm_tiny.pt"), "--unet-flags",
            str(a / "adm_tiny_flags.json"), "--text-encoder", "minilm", "--size", "32", "--steps", "50,250",
            "--blocks", "4,8", "--cache-dir", str(cache), *extra])
        assert res.exit_code == 0, res.output
        return Path(res.stdout.strip().splitlines()[-1])

    serial, local = extract(tmp_path / "serial"), extract(tmp_path / "local", "--scheduler", "local:2")
    assert local.name == serial.name
    got, want = store_files(local), store_files(serial)
    assert got.keys() == want.keys() and len(got) > 500
    assert [k for k in want if got[k] != want[k]] == []
    res = runner.invoke(pipeline.app, ["cache", "verify", str(local)])
    assert res.exit_code == 0 and "0 problem(s)" in res.output, res.output


def test_a_worker_killed_mid_run_has_its_images_redone(tiny_unet: Path, serial: Path, tmp_path: Path) -> None:
    killed: list[str] = []

    def kill_a_busy_worker(done: int, client) -> None:
        if killed:
            return
        busy = [w for w, keys in client.processing().items() if keys]
        if busy:
            killed.append(busy[0])
            pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
            os.kill(pid, signal.SIGKILL)

    # the store at an fsspec URL: the workers write through fsspec, as they would to object storage
    url = run_extract(replace(config(tiny_unet, f"file://{tmp_path}"), scheduler="local:2"), console=quiet(),
                      on_shard=kill_a_busy_worker)
    assert killed, "no worker was busy when the first shard finished"
    path = Path(str(url).removeprefix("file://"))
    got, want = store_files(path), store_files(serial)
    assert got.keys() == want.keys()
    assert [k for k in want if got[k] != want[k]] == []
    assert verify_store(path).ok


def job(split: str, i: int, pairs: list[tuple[int, int]]) -> Job:
    return Job(split, i, Item(f"{split}-{i}", split, "t", None, None), True, pairs)


def test_shards_fill_whole_batches() -> None:
    two = [(50, 4), (250, 4)]
    # test images: 1 view x 2 steps = 2 samples; batch 4 -> cut at 4 samples (2 images) ... 8 is >= 2 batches
    jobs = [job("test", i, two) for i in range(9)]
    assert [len(s) for s in shards(jobs, {"test": 1}, 4)] == [4, 4, 1]
    # d4 train images: 8 views x 2 steps = 16 samples each, >= 2 batches of 4 already
    assert [len(s) for s in shards([job("train", i, two) for i in range(3)], {"train": 8}, 4)] == [1, 1, 1]
    # 3 samples per image, batch 4: whole batches at 12 samples = 4 images
    three = [(50, 4), (150, 4), (250, 4)]
    assert [len(s) for s in shards([job("test", i, three) for i in range(5)], {"test": 1}, 4)] == [4, 1]
    # base-only jobs (no features missing) ride along with their neighbours
    assert sum(map(len, shards([job("val", i, []) for i in range(3)], {"val": 1}, 4))) == 3


@pytest.mark.parametrize("spec", ["local:0", "local", "localhost:8786", "2"])
def test_malformed_schedulers_are_refused(spec: str) -> None:
    with pytest.raises(SchedulerError, match="^scheduler"):
        check_scheduler(spec)
    check_scheduler("tcp://10.0.0.1:8786")
    check_scheduler("local:4")
