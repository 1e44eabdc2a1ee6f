"""Stage one end to end: dataset + UNet + text encoder → the feature store, resumably.

Only the missing work is done: images whose base arrays (image, mask, tokens) or whose
(step, block) features are not yet marked done. :func:`run_extract` plans (:mod:`extract.plan`) and
then executes the plan here (:mod:`extract.execute`) or on a dask cluster (:mod:`extract.cluster`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from common.errors import OptionError
from extract.cluster import check_scheduler, run_on_cluster
from extract.config import ExtractConfig
from extract.execute import execute
from common.devices import dtype_named, resolve_device
from extract.features import FeatureExtractor
from extract.plan import Prepared, encode_tokens, prepare
from extract.text import TextEncoder

__all__ = ["ExtractConfig", "run_extract"]


def run_extract(cfg: ExtractConfig, console: Console | None = None,
                on_batch: Callable[[int], None] | None = None,
                on_shard: Callable[[int, Any], None] | None = None) -> Path:
    """Extract what the store lacks and return its path.

    Serial by default; on a dask.distributed cluster with ``cfg.scheduler``. ``on_batch(n_done)`` (serial)
    and ``on_shard(n_done, client)`` (cluster) are test hooks.
    """
    console = console or Console(stderr=True)
    if cfg.scheduler:
        check_scheduler(cfg.scheduler)
        if cfg.store_format == "h5":
            raise OptionError("scheduler needs a zarr store (HDF5 has one writer at a time): extract with "
                              "store_format='zarr', then export it: `pipeline cache export STORE --format h5` "
                              "(cache.export_store)", "scheduler", "store_format")
    with contextlib.ExitStack() as held:  # the store's writer lock, from opening it to the last write
        prepared, encoder, model = prepare(cfg, console, held)
        if not prepared.jobs:
            return prepared.store.path
        if cfg.scheduler:
            del encoder, model  # the workers load their own
            run_on_cluster(prepared, cfg, console, on_shard)
            return prepared.store.path
        _run_serial(prepared, encoder, model, cfg, console, on_batch)
    return prepared.store.path


def _run_serial(prepared: Prepared, encoder: TextEncoder, model: torch.nn.Module | None, cfg: ExtractConfig,
                console: Console, on_batch: Callable[[int], None] | None) -> None:
    """Encode the texts and execute the jobs in this process."""
    before = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tokens = encode_tokens(encoder, prepared.jobs, prepared.max_length)
        del encoder
        device = resolve_device(cfg.device)
        assert model is not None  # loaded whenever there are jobs
        extractor = FeatureExtractor.for_model(model, cfg.size, cfg.seed, device=device,
                                               compute_dtype=dtype_named(prepared.store.key["compute_dtype"]))
        execute(prepared, extractor, tokens, cfg, console, on_batch)
    finally:
        torch.set_num_threads(before)
