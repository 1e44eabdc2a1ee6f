"""Stage one's plan: what a store lacks, as jobs, shared by the serial and the cluster executors.

:func:`prepare` checks the arguments and every input (dataset files, texts, UNet weights) before
anything is written, takes the store's writer lock, opens (or creates) the store and lists the
:class:`Job` s it still lacks in a :class:`Prepared`; :func:`replan` drops what another process has
written since; :func:`encode_tokens` encodes the texts of the jobs that still need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cache.backends import FORMATS, Location, as_location
from common.errors import OptionError
from cache.key import key_hash, make_key, store_path
from cache.lock import writer_lock
from cache.store import FeatureStore, SplitLayout, StoreError, remove_leftovers
from extract.backbones import block_table
from extract.checkpoints import Source, resolve_unet
from extract.config import AUGMENTATIONS, RUN_OPTIONS, STORE_DTYPE, ExtractConfig
from extract.datasets import Dataset, Item, check_files, open_dataset, preprocessing
from common.devices import compute_dtype, resolve_device
from common.progress import stage_progress
from extract.text import TextEncoder, choose_max_length, load_text_encoder
from extract.textviews import TEXT_VIEWS_VERSION, rewrite_text


@dataclass
class Job:
    """One image: what it still needs (``base_arrays``: its image, mask, tokens and view tokens; ``pairs``: the
    (step, block) features); ``view_texts``: its text for each view, where views have their own."""

    split: str
    index: int
    item: Item
    base_arrays: bool
    pairs: list[tuple[int, int]]
    view_texts: list[str] | None = None


#: tokens of one image: (L, D) embeddings and (L,) mask of its text, and (V, L, D) / (V, L) of each view's text
#: (None where the views have no text of their own)
Tokens = tuple[np.ndarray, np.ndarray, "np.ndarray | None", "np.ndarray | None"]


def _provenance(cfg: ExtractConfig, unet_src: Source) -> dict[str, Any]:
    """How the store was made (not its identity): every option but :data:`RUN_OPTIONS`, its paths resolved, to
    rebuild its `pipeline extract` command (:func:`extract.command.extract_command`) and for `predict`."""
    made = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in RUN_OPTIONS}
    made.update(data_root=str(Path(cfg.data_root).resolve()) if cfg.data_root else None,
                unet=unet_src.recorded(),
                unet_flags=str(Path(cfg.unet_flags).resolve()) if cfg.unet_flags else None,
                splits=list(cfg.splits) if cfg.splits else None)
    return made


@dataclass
class Prepared:
    """A store opened for writing and what it still lacks: the input of an executor (serial or cluster)."""

    store: FeatureStore
    ds: Dataset
    jobs: list[Job]
    views: dict[str, int]
    batch: int
    unet: Source
    max_length: int


def split_views(cfg: ExtractConfig, splits: Sequence[str]) -> dict[str, int]:
    """Views per split: the training split's ``augment``, every other split's ``tta_views``."""
    return {s: AUGMENTATIONS[cfg.augment if s == "train" else cfg.tta_views] for s in splits}


def open_source(cfg: ExtractConfig) -> Dataset:
    """The dataset ``cfg`` names, cut to ``cfg.limit`` images per split (what every executor reads)."""
    if cfg.limit is not None and cfg.limit < 1:
        raise OptionError(f"limit must be >= 1, got {cfg.limit}", "limit")
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
        needs_base = job.base_arrays and not base[job.split][job.index]
        if missing or needs_base:
            out.append(replace(job, base_arrays=needs_base, pairs=missing))
    return out


def encode_tokens(encoder: TextEncoder, jobs: Sequence[Job], max_length: int) -> dict[tuple[str, int], Tokens]:
    """Token embeddings and masks of the jobs that still need their base arrays, by (split, row): of each
    image's text and of each view's text. The encoder runs once per distinct text."""
    base_jobs = [j for j in jobs if j.base_arrays]
    if not base_jobs:
        return {}
    texts = list(dict.fromkeys(t for j in base_jobs for t in (j.item.text, *(j.view_texts or ()))))
    emb, mask = encoder.encode(texts, max_length)
    row = {t: n for n, t in enumerate(texts)}
    out: dict[tuple[str, int], Tokens] = {}
    for j in base_jobs:
        views = None if j.view_texts is None else [row[t] for t in j.view_texts]
        out[(j.split, j.index)] = (emb[row[j.item.text]], mask[row[j.item.text]],
                                   None if views is None else emb[views], None if views is None else mask[views])
    return out


def view_texts(ds: Dataset, split: str, views: int) -> list[list[str]] | None:
    """Each image's text for each of its ``views`` (:func:`extract.textviews.rewrite_text` in the dataset's
    words); None for a split with one view."""
    if views == 1:
        return None
    return [[rewrite_text(it.text, v, ds.name) for v in range(views)] for it in ds.by_split(split)]



def prepare(cfg: ExtractConfig, console: Console, held: contextlib.ExitStack
             ) -> tuple[Prepared, TextEncoder, torch.nn.Module | None]:
    """Check the arguments and every input (dataset files, texts, UNet weights) before anything is
    written; then take the store's writer lock (into ``held``), open (or create) the store, and list
    what it lacks."""
    _check_options(cfg)
    ds, splits, blocks, steps = _selection(cfg, console)
    device = resolve_device(cfg.device)
    unet_src, shapes = _unet_shapes(cfg, blocks)
    items = {s: ds.by_split(s) for s in ds.splits()}
    views = split_views(cfg, ds.splits())
    layouts = {s: SplitLayout(ids=[it.id for it in items[s]], texts=[it.text for it in items[s]], views=views[s],
                              view_texts=view_texts(ds, s, views[s])) for s in ds.splits()}
    encoder = load_text_encoder(cfg.text_encoder, device=str(device))
    max_length = _max_length(cfg, encoder, ds, layouts, console)
    key = _key(cfg, ds, unet_src, encoder, max_length, device)
    path = store_path(as_location(cfg.cache_dir), ds.name, key, cfg.store_format)
    pairs = [(s, b) for s in steps for b in blocks]
    all_jobs = [Job(split, i, item, True, list(pairs), None if layouts[split].view_texts is None
                    else layouts[split].view_texts[i]) for split in splits for i, item in enumerate(items[split])]
    nothing = (f"nothing to do: {sum(len(items[s]) for s in splits)} images × {len(pairs)} (step, block) pairs "
               f"already in the store")
    complete = _complete_store(path, key, pairs, all_jobs)
    if complete is not None:  # read-only is enough: no lock, no UNet (its folder may be read-only)
        console.print(nothing)
        return Prepared(complete, ds, [], views, cfg.batch_size, unet_src, max_length), encoder, None
    model = unet_src.load()  # a checkpoint for other flags, or with NaN weights, stops here: nothing written
    _lock(path, console, held)
    store = _open_for_writing(cfg, path, key, layouts, max_length, encoder.dim, device, unet_src,
                              [(s, b, shapes[b][0], shapes[b][1:]) for s, b in pairs])
    batch = int(store.attrs.get("forward_batch", cfg.batch_size))
    if batch != cfg.batch_size:
        console.print(f"note: this store was made with --batch-size {batch}; using it, so that every image's "
                      f"features are computed identically")
    jobs = replan(store, all_jobs)
    if not jobs:  # another process finished it while this one waited for the lock
        console.print(nothing)
    return Prepared(store, ds, jobs, views, batch, unet_src, max_length), encoder, model


def _check_options(cfg: ExtractConfig) -> None:
    """Refuse an option outside its values (before any input is read)."""
    for name in ("augment", "tta_views"):
        if getattr(cfg, name) not in AUGMENTATIONS:
            raise OptionError(f"{name} must be one of {sorted(AUGMENTATIONS)}, got {getattr(cfg, name)!r}", name)
    if cfg.threads is not None and cfg.threads < 1:
        raise OptionError(f"threads must be >= 1, got {cfg.threads}", "threads")
    if cfg.store_format not in FORMATS:
        raise OptionError(f"store_format must be one of {list(FORMATS)}, got {cfg.store_format!r}", "store_format")


def _selection(cfg: ExtractConfig, console: Console) -> tuple[Dataset, list[str], tuple[int, ...], tuple[int, ...]]:
    """The checked dataset (bad items skipped with ``skip_bad``), and the splits, blocks and steps to extract."""
    ds = check_inputs(open_source(cfg), cfg.skip_bad, console)
    if ds.skipped:
        console.print(f"[yellow]skipped {len(ds.skipped)} bad item(s)[/]: "
                      + "; ".join(f"{f} ({why})" for f, why in ds.skipped[:5])
                      + (" ..." if len(ds.skipped) > 5 else ""), soft_wrap=True, highlight=False)
    splits = list(cfg.splits or ds.splits())
    unknown = [s for s in splits if s not in ds.splits()]
    if unknown:
        raise OptionError(f"splits {unknown} not in dataset {ds.name} (it has {ds.splits()})", "splits")
    blocks = tuple(cfg.blocks or ds.default_blocks)
    steps = tuple(cfg.steps)
    if any(not 0 <= s < 1000 for s in steps):
        raise OptionError(f"steps must lie in [0, 999], got {list(steps)}", "steps")
    return ds, splits, blocks, steps


def _unet_shapes(cfg: ExtractConfig, blocks: tuple[int, ...]) -> tuple[Source, list[tuple[int, int, int]]]:
    """The UNet's source and each decoder block's (C, h, w) at the size (no weights read), the blocks checked."""
    unet_src = resolve_unet(cfg.unet, cfg.unet_flags, cfg.unet_condition)
    try:
        shapes = unet_src.block_shapes(cfg.size)
    except ValueError as e:  # a size the UNet cannot take
        raise OptionError(f"size {cfg.size}: {e}", "size") from None
    bad = [b for b in blocks if not 0 <= b < len(shapes)]
    if bad:
        raise OptionError(f"blocks {bad} out of range: this UNet has blocks 0..{len(shapes) - 1} (list_blocks=True "
                          f"names them)", "blocks", "list_blocks")
    return unet_src, shapes


def list_blocks(cfg: ExtractConfig) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(index, name, (C, h, w)) of each hookable decoder block of ``cfg.unet`` at ``cfg.size`` (no weights read):
    the numbers ``blocks`` takes."""
    src = resolve_unet(cfg.unet, cfg.unet_flags, cfg.unet_condition)
    try:
        return block_table(src.shell(), cfg.size)
    except ValueError as e:  # a size the UNet cannot take
        raise OptionError(f"size {cfg.size}: {e}", "size") from None


def _max_length(cfg: ExtractConfig, encoder: TextEncoder, ds: Dataset, layouts: dict[str, SplitLayout],
                console: Console) -> int:
    """The token length of every text (the images' and the views' own), truncations reported."""
    all_texts = [it.text for it in ds.items] + [t for lay in layouts.values() for row in lay.view_texts or ()
                                                for t in row[1:]]
    max_length, n_trunc = choose_max_length(encoder, all_texts, cfg.max_length)
    if n_trunc:
        console.print(f"[yellow]note[/]: {n_trunc} of {len(all_texts)} texts are longer than "
                      f"{max_length} tokens and are truncated (--max-length)", soft_wrap=True)
    return max_length


def _key(cfg: ExtractConfig, ds: Dataset, unet_src: Source, encoder: TextEncoder, max_length: int,
         device: torch.device) -> dict[str, Any]:
    """The store's key: everything that determines its arrays."""
    prep = preprocessing(cfg.size, cfg.color_order)
    prep["augment"] = cfg.augment
    if cfg.tta_views != "none":  # the val and test images' views too (older keys: none)
        prep["tta_views"] = cfg.tta_views
    if AUGMENTATIONS[cfg.augment] > 1 or AUGMENTATIONS[cfg.tta_views] > 1:  # each view keeps its own text,
        prep["view_text"] = TEXT_VIEWS_VERSION                                # rewritten as this version says
    return make_key(dataset=ds.fingerprint(), preprocessing=prep, unet=unet_src.identity(),
                    noise_seed=cfg.seed, text={**encoder.identity(), "max_length": max_length},
                    dtype=STORE_DTYPE, compute_dtype=compute_dtype(device, cfg.autocast))


def _lock(path: Location, console: Console, held: contextlib.ExitStack) -> None:
    """Take the store's writer lock (into ``held``); a killed writer's half-written files are removed."""
    note = lambda msg: console.print(f"[yellow]note[/]: {msg}", highlight=False, soft_wrap=True)  # noqa: E731
    if held.enter_context(writer_lock(path, note)):
        removed = remove_leftovers(path)
        note(f"the last extract of this store was killed; {removed} half-written temporary file(s) removed, "
             f"its committed images kept")


def _open_for_writing(cfg: ExtractConfig, path: Location, key: dict[str, Any], layouts: dict[str, SplitLayout],
                      max_length: int, token_dim: int, device: torch.device, unet_src: Source,
                      pair_arrays: list[tuple[int, int, int, tuple[int, int]]]) -> FeatureStore:
    """The store at ``path``, created if need be (recording how it was made), with arrays for every pair."""
    try:
        store = FeatureStore.create(path, key, size=cfg.size, splits=layouts, token_len=max_length,
                                    token_dim=token_dim, extra_attrs={"forward_batch": cfg.batch_size,
                                                                      "device_type": device.type,
                                                                      "extract": _provenance(cfg, unet_src)})
        check_device_type(store, device)
        store.writer.ensure_pairs(pair_arrays)
    except OSError as e:
        raise OSError(e.errno, f"creating the arrays of {path} failed: {e.strerror or e} ({e.filename}); no image "
                               f"was written yet: free the space (or fix the folder) and re-run") from e
    return store


def check_device_type(store: FeatureStore, device: torch.device) -> None:
    """Refuse to add rows computed on another device type than the store's (``attrs["device_type"]``; older
    stores record none): float32 on a CPU and on a GPU round differently, so one store keeps one."""
    recorded = store.attrs.get("device_type")
    if recorded is not None and recorded != device.type:
        raise OptionError(f"device: {store.path} was computed on {recorded}, this run would compute on "
                          f"{device.type} (float32 results differ between device types); pass device='{recorded}' "
                          f"or extract into another cache folder", "device")


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
