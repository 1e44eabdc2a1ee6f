"""Stage one end to end: dataset + UNet + text encoder → the feature store, resumably.

Only the missing work is done: images whose base arrays (image, mask, tokens) or whose
(step, block) features are not yet marked done. Reading and preprocessing the next batch and
compressing + writing the last one run on threads beside the UNet forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cache.backends import FORMATS, as_location
from cache.lock import writer_lock
from cache.key import default_cache_dir, key_hash, make_key, store_path
from cache.store import FeatureStore, SplitLayout, StoreError, remove_leftovers
from extract.checkpoints import PRESETS, UNetSource, resolve_unet
from extract.datasets import Dataset, Item, check_files, open_dataset, preprocessing
from extract.diffusion import DEFAULT_SEED, shared_noise
from extract.features import FeatureExtractor, autocast_dtype, default_device
from extract.shared import dihedral, stage_progress, to_unit_range
from extract.text import TextEncoder, choose_max_length, load_text_encoder
from extract.unet import create_unet

DEFAULT_STEPS = (50, 150, 250)
AUGMENTATIONS = {"none": 1, "d4": 8}
STORE_DTYPE = "float16"


@dataclass
class ExtractConfig:
    """Everything ``pipeline extract`` takes (defaults: the paper's)."""

    dataset: str
    data_root: Path | None = None
    unet: str = "adm-imagenet-256"
    unet_flags: Path | None = None
    text_encoder: str = "bioclinicalbert"
    steps: tuple[int, ...] = DEFAULT_STEPS
    blocks: tuple[int, ...] | None = None  # None: the dataset's paper blocks
    size: int = 256
    seed: int = DEFAULT_SEED
    splits: tuple[str, ...] | None = None  # None: every split of the dataset
    augment: str = "none"
    max_length: int | None = None
    cache_dir: Path | str = field(default_factory=default_cache_dir)  # a folder, or an fsspec URL
    batch_size: int = 12  # UNet samples (images × views × steps) per forward pass
    device: str | None = None
    autocast: bool = False
    color_order: str = "rgb"
    skip_bad: bool = False
    limit: int | None = None  # only the first N images of each split (quick trials)
    scheduler: str | None = None  # None: this process; "local:N" or "tcp://HOST:PORT": dask.distributed
    threads: int | None = None  # torch intra-op threads per process (None: torch's default here)
    store_format: str = "zarr"  # or "h5": one HDF5 file, one writer
    dataset_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Job:
    """One image: what it still needs."""

    split: str
    index: int
    item: Item
    base: bool
    pairs: list[tuple[int, int]]


def _provenance(cfg: ExtractConfig, unet_src: UNetSource) -> dict[str, Any]:
    """How the store was made (not its identity): to rebuild `pipeline extract` commands and for `predict`."""
    return {"dataset": cfg.dataset, "data_root": str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
            "unet": cfg.unet if cfg.unet in PRESETS else str(unet_src.checkpoint),
            "unet_flags": str(Path(cfg.unet_flags).resolve()) if cfg.unet_flags else None,
            "text_encoder": cfg.text_encoder,
            "size": cfg.size, "seed": cfg.seed, "max_length": cfg.max_length, "augment": cfg.augment,
            "color_order": cfg.color_order, "dataset_options": cfg.dataset_options}


@dataclass
class Prepared:
    """A store opened for writing and what it still lacks: the input of an executor (serial or cluster)."""

    store: FeatureStore
    ds: Dataset
    jobs: list[Job]
    views: dict[str, int]
    batch: int
    unet: UNetSource
    max_length: int


def open_source(cfg: ExtractConfig) -> Dataset:
    """The dataset ``cfg`` names, cut to ``cfg.limit`` images per split (what every executor reads)."""
    ds = open_dataset(cfg.dataset, cfg.data_root, skip_bad=cfg.skip_bad, **cfg.dataset_options)
    return ds.head(cfg.limit) if cfg.limit is not None else ds


def check_inputs(ds: Dataset, skip_bad: bool, console: Console) -> Dataset:
    """Decode every file before anything is written (:func:`extract.datasets.check_files`); print its notes."""
    if ds.root is None:
        return ds
    progress = stage_progress(console, "check", "images")
    with progress:
        task = progress.add_task(f"{ds.name} files", total=len(ds.items))
        ds, notes = check_files(ds, skip_bad, on_item=lambda: progress.advance(task, 1))
    by_what: dict[str, list[str]] = {}
    for file, what in notes:
        by_what.setdefault(what, []).append(file)
    for what, files in by_what.items():
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        console.print(f"[yellow]note[/]: {len(files)} file(s): {what}: {shown}", highlight=False, soft_wrap=True)
    return ds


def replan(store: FeatureStore, jobs: Sequence[Job]) -> list[Job]:
    """``jobs`` less what the store now has (another process or an earlier attempt wrote it)."""
    base = {s: store.done(s) for s in {j.split for j in jobs}}
    pair_done: dict[tuple[str, int, int], np.ndarray] = {}
    out = []
    for job in jobs:
        missing = []
        for p in job.pairs:
            if (job.split, *p) not in pair_done:
                pair_done[(job.split, *p)] = store.done(job.split, *p)
            if not pair_done[(job.split, *p)][job.index]:
                missing.append(p)
        needs_base = job.base and not base[job.split][job.index]
        if missing or needs_base:
            out.append(Job(job.split, job.index, job.item, needs_base, missing))
    return out


def encode_tokens(encoder: TextEncoder, jobs: Sequence[Job], max_length: int
                  ) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Token embeddings and masks of the jobs that still need their base arrays, by (split, row)."""
    base_jobs = [j for j in jobs if j.base]
    if not base_jobs:
        return {}
    emb, mask = encoder.encode([j.item.text for j in base_jobs], max_length)
    return {(j.split, j.index): (emb[n], mask[n]) for n, j in enumerate(base_jobs)}


def run_extract(cfg: ExtractConfig, console: Console | None = None,
                on_batch: Callable[[int], None] | None = None,
                on_shard: Callable[[int, Any], None] | None = None) -> Path:
    """Extract what the store lacks and return its path.

    Serial by default; on a dask.distributed cluster with ``cfg.scheduler``. ``on_batch(n_done)`` (serial)
    and ``on_shard(n_done, client)`` (cluster) are test hooks.
    """
    console = console or Console(stderr=True)
    if cfg.scheduler:
        from extract.cluster import check_scheduler

        check_scheduler(cfg.scheduler)
        if cfg.store_format == "h5":
            raise ValueError("--scheduler needs a zarr store (HDF5 has one writer at a time): extract with "
                             "--store-format zarr, then `pipeline cache export STORE --format h5`")
    with contextlib.ExitStack() as held:  # the store's writer lock, from opening it to the last write
        prepared, encoder, model = _prepare(cfg, console, held)
        if not prepared.jobs:
            return prepared.store.path
        if cfg.scheduler:
            del encoder, model  # the workers load their own
            from extract.cluster import run_on_cluster

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
        device = torch.device(cfg.device) if cfg.device else default_device()
        assert model is not None  # loaded whenever there are jobs
        extractor = FeatureExtractor(model, shared_noise(cfg.size, cfg.seed), device=device,
                                     autocast=cfg.autocast)
        execute(prepared, extractor, tokens, cfg, console, on_batch)
    finally:
        torch.set_num_threads(before)


def _prepare(cfg: ExtractConfig, console: Console, held: contextlib.ExitStack
             ) -> tuple[Prepared, TextEncoder, torch.nn.Module | None]:
    """Check the arguments and every input (dataset files, texts, UNet weights) before anything is
    written; then take the store's writer lock (into ``held``), open (or create) the store, and list
    what it lacks."""
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"--augment must be one of {sorted(AUGMENTATIONS)}, got {cfg.augment!r}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.store_format not in FORMATS:
        raise ValueError(f"--store-format must be one of {list(FORMATS)}, got {cfg.store_format!r}")
    ds = check_inputs(open_source(cfg), cfg.skip_bad, console)
    if ds.skipped:
        console.print(f"[yellow]skipped {len(ds.skipped)} bad item(s)[/]: "
                      + "; ".join(f"{f} ({why})" for f, why in ds.skipped[:5])
                      + (" ..." if len(ds.skipped) > 5 else ""), soft_wrap=True, highlight=False)
    splits = list(cfg.splits or ds.splits())
    unknown = [s for s in splits if s not in ds.splits()]
    if unknown:
        raise ValueError(f"--splits {unknown} not in dataset {ds.name} (it has {ds.splits()})")
    blocks = tuple(cfg.blocks or ds.default_blocks)
    steps = tuple(cfg.steps)
    if any(not 0 <= s < 1000 for s in steps):
        raise ValueError(f"--steps must lie in [0, 999], got {list(steps)}")
    device = torch.device(cfg.device) if cfg.device else default_device()

    unet_src = resolve_unet(cfg.unet, cfg.unet_flags)
    with torch.device("meta"):
        shapes = create_unet(**unet_src.flags).output_block_shapes(cfg.size)
    bad = [b for b in blocks if not 0 <= b < len(shapes)]
    if bad:
        raise ValueError(f"--blocks {bad} out of range: this UNet has output_blocks 0..{len(shapes) - 1}")

    encoder = load_text_encoder(cfg.text_encoder, device=str(device))
    all_texts = [it.text for it in ds.items]
    max_length, n_trunc = choose_max_length(encoder, all_texts, cfg.max_length)
    if n_trunc:
        console.print(f"[yellow]note[/]: {n_trunc} of {len(all_texts)} texts are longer than "
                      f"{max_length} tokens and are truncated (--max-length)", soft_wrap=True)

    prep = preprocessing(cfg.size, cfg.color_order)
    prep["augment"] = cfg.augment
    key = make_key(dataset=ds.fingerprint(), preprocessing=prep, unet=unet_src.identity(),
                   noise_seed=cfg.seed, text={**encoder.identity(), "max_length": max_length},
                   dtype=STORE_DTYPE,
                   compute_dtype=str(autocast_dtype(device)).removeprefix("torch.") if cfg.autocast else "float32")
    items = {s: ds.by_split(s) for s in ds.splits()}
    views = {s: AUGMENTATIONS[cfg.augment] if s == "train" else 1 for s in ds.splits()}
    layouts = {s: SplitLayout(ids=[it.id for it in items[s]], texts=[it.text for it in items[s]], views=views[s])
               for s in ds.splits()}
    path = store_path(as_location(cfg.cache_dir), ds.name, key, cfg.store_format)
    pairs = [(s, b) for s in steps for b in blocks]
    all_jobs = [Job(split, i, item, True, list(pairs)) for split in splits for i, item in enumerate(items[split])]
    nothing = (f"nothing to do: {sum(len(items[s]) for s in splits)} images × {len(pairs)} (step, block) pairs "
               f"already in the store")
    complete = _complete_store(path, key, pairs, all_jobs)
    if complete is not None:  # read-only is enough: no lock, no UNet (its folder may be read-only)
        console.print(nothing)
        return Prepared(complete, ds, [], views, cfg.batch_size, unet_src, max_length), encoder, None
    model = unet_src.load()  # a checkpoint for other flags, or with NaN weights, stops here: nothing written
    note = lambda msg: console.print(f"[yellow]note[/]: {msg}", highlight=False, soft_wrap=True)  # noqa: E731
    if held.enter_context(writer_lock(path, note)):
        removed = remove_leftovers(path)
        note(f"the last extract of this store was killed; {removed} half-written temporary file(s) removed, "
             f"its committed images kept")
    try:
        store = FeatureStore.create(path, key, size=cfg.size, splits=layouts, token_len=max_length,
                                    token_dim=encoder.dim, extra_attrs={"forward_batch": cfg.batch_size,
                                                                        "extract": _provenance(cfg, unet_src)})
        store.ensure_pairs([(s, b, shapes[b][0], shapes[b][1:]) for s, b in pairs])
    except OSError as e:
        raise OSError(e.errno, f"creating the arrays of {path} failed: {e.strerror or e} ({e.filename}); no image "
                               f"was written yet: free the space (or fix the folder) and re-run") from e
    batch = int(store.attrs.get("forward_batch", cfg.batch_size))
    if batch != cfg.batch_size:
        console.print(f"note: this store was made with --batch-size {batch}; using it, so that every image's "
                      f"features are computed identically")
    jobs = replan(store, all_jobs)
    if not jobs:  # another process finished it while this one waited for the lock
        console.print(nothing)
    return Prepared(store, ds, jobs, views, batch, unet_src, max_length), encoder, model


def _complete_store(path: Path | str, key: dict, pairs: list[tuple[int, int]],
                    jobs: list[Job]) -> FeatureStore | None:
    """The store at ``path``, opened read-only, if it is this key's and already has everything; else None."""
    try:
        store = FeatureStore.open(path)
    except (StoreError, OSError, FileNotFoundError):
        return None
    if store.key_hash != key_hash(key) or not set(pairs) <= set(store.pairs()) or replan(store, jobs):
        store.close()
        return None
    return store


def _load(ds: Dataset, job: Job, size: int, color_order: str, n_views: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 image views (V, 3, S, S) and mask views (V, S, S) of one image."""
    img = ds.load_image_uint8(job.item, size, color_order)
    mask = ds.load_mask(job.item, size)
    return (np.stack([dihedral(img, v) for v in range(n_views)]),
            np.stack([dihedral(mask, v) for v in range(n_views)]))


class _Pending:
    """One image being assembled: its views, and a float16 buffer per missing (step, block)."""

    def __init__(self, job: Job, imgs: np.ndarray, masks: np.ndarray, shapes: list[tuple[int, int, int]]):
        self.job, self.imgs, self.masks = job, imgs, masks
        v = imgs.shape[0]
        self.feats = {(s, b): np.empty((v, *shapes[b]), np.float16) for s, b in job.pairs}
        self.remaining = v * len({s for s, _ in job.pairs})

    def write(self, store: FeatureStore, tokens: dict) -> None:
        """Base arrays first, then each pair (data, then its done flag). A failed write (disk full, a
        read-only or vanished folder) names the store and the image; every row committed before it stays."""
        job = self.job
        try:
            if job.base:
                emb, tmask = tokens[(job.split, job.index)]
                store.write_base(job.split, job.index, self.imgs, self.masks, emb, tmask)
            for (s, b), arr in self.feats.items():
                store.write_features(job.split, job.index, s, b, arr)
        except OSError as e:
            raise OSError(e.errno, f"writing {store.path} ({job.split}/{job.item.id}) failed: "
                                   f"{e.strerror or e}; every image written before it is kept, free the "
                                   f"space (or fix the folder) and re-run to resume") from e


def execute(prepared: Prepared, extractor: FeatureExtractor, tokens: dict, cfg: ExtractConfig, console: Console,
            on_batch: Callable[[int], None] | None = None) -> None:
    """Write ``prepared.jobs``: samples (image, view, step) go through the UNet ``batch`` at a time, the
    last batch zero-padded; reading runs ahead on one thread, writing behind on another."""
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
            loads[j] = loader.submit(_load, ds, jobs[j], cfg.size, cfg.color_order, views[jobs[j].split])
        submitted = max(submitted, min(upto, len(order)))

    assembling: dict[int, _Pending] = {}
    writes: list[Future] = []
    n_written = 0
    try:
        with progress:
            task = progress.add_task(f"{ds.name} → {store.name}", total=len(jobs))

            def flush(p: _Pending) -> None:
                nonlocal n_written
                while len(writes) >= 2:  # bound the memory held by queued writes
                    writes.pop(0).result()
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
            for start in range(0, len(samples), batch):
                chunk = samples[start:start + batch]
                x0 = torch.from_numpy(to_unit_range(np.stack([pending(j).imgs[v] for j, v, _ in chunk])))
                t = torch.tensor([s for _, _, s in chunk])
                blocks = sorted({b for j, _, _ in chunk for _, b in jobs[j].pairs})
                out = extractor.samples(x0, t, blocks, pad_to=batch)
                for n, (j, v, s) in enumerate(chunk):
                    p = assembling[j]
                    for (ps, b), buf in p.feats.items():
                        if ps == s:
                            buf[v] = out[b][n].numpy()
                    p.remaining -= 1
                    if p.remaining == 0:
                        flush(assembling.pop(j))
            for f in writes:
                f.result()
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True)
