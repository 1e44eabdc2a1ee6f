"""Stage one on a dask.distributed cluster: ``pipeline extract --scheduler local:N | tcp://HOST:PORT``.

The images the store lacks are cut into shards (a few forward batches each) and mapped over the
workers. Each worker process loads the UNet, the noise and the text encoder once per run (state kept
in the process, not per task) and writes its images' rows straight into the one store, exactly as a
serial run would: data, checksum, then the done flag, one chunk per image, so writers never share a
file. A shard first drops the rows already done, so a shard re-run after its worker died (dask
reschedules it) redoes only what was not committed. The client shows one progress bar.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from cache.backends import is_url
from extract.checkpoints import Source
from common.devices import dtype_named, resolve_device, set_malloc_thresholds
from extract.features import FeatureExtractor
from extract.config import ExtractConfig
from extract.execute import execute
from extract.plan import Job, Prepared, check_device_type, encode_tokens, open_source, replan
from common.progress import stage_progress
from extract.text import TextEncoder, load_text_encoder

_LOCAL = re.compile(r"local:(\d+)")
_ADDRESS = re.compile(r"[a-z][a-z0-9+.-]*://\S+")


class SchedulerError(RuntimeError):
    """``scheduler`` is malformed, unreachable, or the cluster gave up on a shard."""

    options = ("scheduler",)  # the keyword its messages may name (common.errors)


def check_scheduler(spec: str) -> None:
    """Refuse a malformed ``scheduler`` before any work starts."""
    match = _LOCAL.fullmatch(spec)
    if match and int(match.group(1)) < 1:
        raise SchedulerError(f"scheduler {spec}: need at least one local worker")
    if not match and not _ADDRESS.fullmatch(spec):
        raise SchedulerError(f"scheduler {spec!r}: expected local:N (N worker processes on this machine) "
                             "or a scheduler address such as tcp://HOST:8786")
    try:
        import distributed  # noqa: F401
    except ImportError as e:  # pragma: no cover - a dependency; only a broken environment lacks it
        raise SchedulerError(f"scheduler needs the 'distributed' package ({e})") from e


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker needs to rebuild the run's state: absolute paths only (workers have their own cwd)."""

    run_id: str
    cfg: ExtractConfig
    store: str
    unet: Source
    max_length: int
    batch: int
    views: dict[str, int]
    torch_threads: int | None


@dataclass
class _WorkerState:
    spec: WorkerSpec
    prepared: Prepared
    encoder: TextEncoder
    extractor: FeatureExtractor


_STATE: dict[str, _WorkerState] = {}
_STATE_LOCK = threading.Lock()
def _undo_malloc_trim() -> None:
    """dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536, which also pins glibc's mmap
    threshold at 128 kB: every large tensor is then mmap'ed and page-faulted anew, and the UNet runs
    1.5x slower (bench/cluster.py). Give glibc generous thresholds again (Linux only; else a no-op)."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        set_malloc_thresholds(mmap=32 * 2**20, trim=64 * 2**20)


def _state(spec: WorkerSpec) -> _WorkerState:
    """This process's state for the run: built by its first shard, reused by the rest."""
    with _STATE_LOCK:
        state = _STATE.get(spec.run_id)
        if state is None:
            from cache.store import FeatureStore

            _STATE.clear()  # an earlier run's models
            _undo_malloc_trim()
            if spec.torch_threads:
                torch.set_num_threads(spec.torch_threads)
            cfg = spec.cfg
            device = resolve_device(cfg.device)
            store = FeatureStore.open(spec.store, "r+")
            check_device_type(store, device)
            prepared = Prepared(store, open_source(cfg), [], spec.views, spec.batch, spec.unet, spec.max_length)
            # the store key's compute dtype, not this worker's device's choice: every row computed alike
            extractor = FeatureExtractor.for_model(spec.unet.load(), cfg.size, cfg.seed, device=device,
                                                   compute_dtype=dtype_named(store.key["compute_dtype"]))
            encoder = load_text_encoder(cfg.text_encoder, device=str(device))
            state = _STATE[spec.run_id] = _WorkerState(spec, prepared, encoder, extractor)
        return state


def extract_shard(spec: WorkerSpec, jobs: list[Job]) -> int:
    """Worker task: write the rows of ``jobs`` the store still lacks; returns the shard's image count."""
    state = _state(spec)
    todo = replan(state.prepared.store, jobs)
    if todo:
        tokens = encode_tokens(state.encoder, todo, spec.max_length)
        execute(replace(state.prepared, jobs=todo), state.extractor, tokens, spec.cfg, Console(quiet=True))
    return len(jobs)


def shards(jobs: Sequence[Job], views: dict[str, int], batch: int) -> list[list[Job]]:
    """Consecutive jobs in groups of at least two forward batches, cut where the samples fill whole
    batches when they can (the last batch of a shard is zero-padded), at most eight batches."""
    out: list[list[Job]] = []
    current: list[Job] = []
    samples = 0
    for job in jobs:
        current.append(job)
        samples += views[job.split] * len({s for s, _ in job.pairs})
        if (samples >= 2 * batch and samples % batch == 0) or samples >= 8 * batch:
            out.append(current)
            current, samples = [], 0
    if current:
        out.append(current)
    return out


@contextmanager
def connect(scheduler: str, threads: int | None = None) -> Iterator[tuple[Any, int | None]]:
    """A client for ``scheduler`` and the torch threads each worker should use (None: the worker's default).

    ``local:N`` starts N worker processes here, each running one shard at a time with ``threads`` torch
    threads, by default as many as this process uses: CPU kernels reduce in an order that depends on
    the thread count, so only equal counts give the serial run's values bit for bit.
    """
    from distributed import Client, LocalCluster

    match = _LOCAL.fullmatch(scheduler)
    if match:
        n = int(match.group(1))
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
            yield client, threads or torch.get_num_threads()
        return
    try:
        client = Client(scheduler, timeout="20s")
    except (OSError, TimeoutError) as e:
        raise SchedulerError(f"scheduler {scheduler}: cannot reach the scheduler ({e})") from e
    with client:
        yield client, threads


def run_on_cluster(prepared: Prepared, cfg: ExtractConfig, console: Console,
                   on_shard: Callable[[int, Any], None] | None = None) -> None:
    """Map the shards of ``prepared.jobs`` over the cluster; one progress bar, in images."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    cfg = replace(cfg, data_root=Path(cfg.data_root).resolve() if cfg.data_root else None,
                  cache_dir=cfg.cache_dir if is_url(cfg.cache_dir) else Path(cfg.cache_dir).resolve())
    unet = replace(prepared.unet, checkpoint=Path(prepared.unet.checkpoint).resolve())
    parts = shards(prepared.jobs, prepared.views, prepared.batch)
    with connect(cfg.scheduler or "", cfg.threads) as (client, threads):
        spec = WorkerSpec(uuid.uuid4().hex, cfg, prepared.store.location, unet,
                          prepared.max_length, prepared.batch, prepared.views, threads)
        n_workers = len(client.nthreads())
        futures = client.map(extract_shard, [spec] * len(parts), parts, pure=False)
        sizes = {f.key: len(part) for f, part in zip(futures, parts)}
        done = 0
        progress = stage_progress(console, "extract", "images")
        with progress:
            task = progress.add_task(f"{prepared.ds.name} → {prepared.store.name} "
                                     f"({len(parts)} shards, {n_workers} workers)", total=len(prepared.jobs))
            try:
                for future in as_completed(futures):
                    try:
                        future.result()
                    except KilledWorker as e:
                        raise SchedulerError(
                            f"the cluster gave up on a shard of {sizes[future.key]} images after its workers "
                            f"died repeatedly ({e}); what was written is kept: re-run to resume") from e
                    done += sizes[future.key]
                    progress.update(task, completed=done)
                    if on_shard:
                        on_shard(done, client)
            finally:
                client.cancel([f for f in futures if not f.done()])
