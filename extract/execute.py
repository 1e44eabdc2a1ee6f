"""Stage one's executor: a plan's jobs through the UNet, batch by batch, into the store.

Reading and preprocessing the next images and compressing + writing the last ones run on threads
beside the UNet forward. The serial path (:mod:`extract.run`) and every cluster worker
(:mod:`extract.cluster`) call :func:`execute`.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from rich.console import Console

from cache.store import FeatureStore
from extract.config import ExtractConfig
from extract.datasets import Dataset
from extract.features import FeatureExtractor
from extract.plan import Job, Prepared
from extract.shared import dihedral, to_unit_range
from common.progress import stage_progress


def _load(ds: Dataset, job: Job, cfg: ExtractConfig, n_views: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """uint8 image views (V, 3, S, S) and, under each resizing, mask views (V, S, S) of one image."""
    img = ds.load_image_uint8(job.item, cfg.size, cfg.color_order)
    masks = ds.load_masks(job.item, cfg.size)
    return (np.stack([dihedral(img, v) for v in range(n_views)]),
            {mode: np.stack([dihedral(m, v) for v in range(n_views)]) for mode, m in masks.items()})


def _text(job: Job, view: int) -> str:
    """The text of one view of an image (its own rewritten text where views have one)."""
    return job.view_texts[view] if job.view_texts is not None else job.item.text


class _Pending:
    """One image being assembled: its views, and a float16 buffer per missing (step, block)."""

    def __init__(self, job: Job, imgs: np.ndarray, masks: dict[str, np.ndarray], shapes: list[tuple[int, int, int]]):
        self.job, self.imgs, self.masks = job, imgs, masks
        v = imgs.shape[0]
        self.feats = {(s, b): np.empty((v, *shapes[b]), np.float16) for s, b in job.pairs}
        self.remaining = v * len({s for s, _ in job.pairs})

    def write(self, store: FeatureStore, tokens: dict) -> None:
        """Base arrays first, then each pair (data, then its done flag). A failed write (disk full, a
        read-only or vanished folder) names the store and the image; every row committed before it stays."""
        job = self.job
        try:
            if job.base_arrays:
                store.writer.write_base(job.split, job.index, self.imgs, self.masks["nearest"],
                                        *tokens[(job.split, job.index)], mask_authors=self.masks["authors"])
            for (s, b), arr in self.feats.items():
                store.writer.write_features(job.split, job.index, s, b, arr)
        except OSError as e:
            raise OSError(e.errno, f"writing {store.path} ({job.split}/{job.item.id}) failed: "
                                   f"{e.strerror or e}; every image written before it is kept, free the "
                                   f"space (or fix the folder) and re-run to resume") from e


def execute(prepared: Prepared, extractor: FeatureExtractor, tokens: dict, cfg: ExtractConfig, console: Console,
            on_batch: Callable[[int], None] | None = None) -> None:
    """Write ``prepared.jobs``: samples (image, view, step) go through the UNet ``batch`` at a time, the
    last batch zero-padded; reading runs ahead on one thread, writing behind on another: the images a batch
    completes are written during the next batch's forward (waiting for them only before the one after)."""
    store, ds, jobs, views, batch = prepared.store, prepared.ds, prepared.jobs, prepared.views, prepared.batch
    shapes = extractor.block_shapes()
    samples = [(j, v, s) for j, job in enumerate(jobs) for s in sorted({s for s, _ in job.pairs})
               for v in range(views[job.split])]
    progress = stage_progress(console, "extract", "images")
    loader = ThreadPoolExecutor(1, thread_name_prefix="textdiff-read")
    writer = ThreadPoolExecutor(1, thread_name_prefix="textdiff-write")
    # images are consumed in this order: those needing only base arrays, then in sample order
    order = [j for j, job in enumerate(jobs) if not job.pairs] + [j for j, job in enumerate(jobs) if job.pairs]
    position = {j: k for k, j in enumerate(order)}
    lookahead = max(8, 2 * batch)  # images read ahead, in order, on one thread
    loads: dict[int, Future] = {}
    submitted = 0

    def read_ahead(upto: int) -> None:
        nonlocal submitted
        for j in order[submitted:upto]:
            loads[j] = loader.submit(_load, ds, jobs[j], cfg, views[jobs[j].split])
        submitted = max(submitted, min(upto, len(order)))

    assembling: dict[int, _Pending] = {}
    writes: list[Future] = []
    n_written = 0
    try:
        with progress:
            task = progress.add_task(f"{ds.name} → {store.name}", total=len(jobs))

            def drain(keep: int) -> None:
                """Wait for the oldest queued writes until ``keep`` remain (bounds the memory they hold)."""
                while len(writes) > keep:
                    writes.pop(0).result()

            def flush(p: _Pending) -> None:
                nonlocal n_written
                writes.append(writer.submit(p.write, store, tokens))
                writes[-1].add_done_callback(lambda _f: progress.advance(task, 1))
                n_written += 1
                if on_batch:
                    on_batch(n_written)

            def pending(j: int) -> _Pending:
                if j not in assembling:
                    read_ahead(position[j] + 1 + lookahead)
                    assembling[j] = _Pending(jobs[j], *loads.pop(j).result(), shapes)
                return assembling[j]

            for j, job in enumerate(jobs):  # images with nothing but base arrays missing
                if not job.pairs:
                    flush(pending(j))
                    del assembling[j]
                    drain(2)
            last_batch = 0  # writes queued by the previous batch: they overlap this batch's forward
            for start in range(0, len(samples), batch):
                drain(last_batch)
                queued = len(writes)
                chunk = samples[start:start + batch]
                x0 = torch.from_numpy(to_unit_range(np.stack([pending(j).imgs[v] for j, v, _ in chunk])))
                t = torch.tensor([s for _, _, s in chunk])
                blocks = sorted({b for j, _, _ in chunk for _, b in jobs[j].pairs})
                texts = ([_text(jobs[j], v) for j, v, _ in chunk] if extractor.backbone.reads_text else None)
                out = extractor.samples(x0, t, blocks, pad_to=batch, dtype=torch.float16, texts=texts)
                for n, (j, v, s) in enumerate(chunk):
                    p = assembling[j]
                    for (ps, b), buf in p.feats.items():
                        if ps == s:
                            buf[v] = out[b][n].numpy()
                    p.remaining -= 1
                    if p.remaining == 0:
                        flush(assembling.pop(j))
                last_batch = len(writes) - queued
            for f in writes:
                f.result()
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
