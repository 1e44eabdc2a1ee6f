"""Score a fitted run on one split of its store: per-image metrics, a summary, overlays.

Writes ``RUN/eval-<split>/`` (``RUN/eval-<split>-text-<mode>/`` when the head is given other text than the
image's own: ``text="none" | "shuffled" | "mirrored"``, :mod:`train.textmodes`; ``-tta-<views>`` after it with
test-time augmentation, ``tta="flips" | "d4"``: the mean probability over the image's views, each mapped back,
each view read with its own rewritten text, from the store's TTA companion, :mod:`extract.tta`)::

    per_image.csv    id, dice, iou, intersection, pred_area, target_area, text (one row per image, store order;
                     the text the head was given, "" for none)
    summary.json     dice, iou, dice_std, iou_std, global_dice, n_images, split, text (the mode), cache_key_hash,
                     weights_sha256 (the weights scored: :func:`train.runs.rundir.evaluated` accepts the evaluation only
                     while the folder holds them; no paths); text_seed too for shuffled; tta and tta_views with
                     test-time augmentation
    predictions.npz  ids (N,) and pred (N, S, S) bool: the argmax masks the metrics were computed from
    overlays/<id>.png  image | ground truth | prediction (``overlays=True``)

Metrics as :mod:`train.metrics` defines them (LViT's, per image, averaged; fractions, not %).
``summary.json`` is written last and removed first, so its presence means a complete evaluation; the
folder holds the latest evaluation only (earlier overlays are removed, also with ``overlays=False``).
"""
from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cache.store import FeatureStore
from common.progress import stage_progress
from extract.tta import tta_store
from train.runs import rundir
from train.config import TTA_VIEWS, EvaluateConfig
from train.metrics import SegMetrics
from train.data.readers import SplitData
from train.registry import (ModelSpec, open_split, probabilities, reading_of, spec_of, tta_probabilities,
                            view_sample)
from train.runs.loading import load_run
from train.plots import overlay_png
from train.runs.rundir import eval_dir, write_json
from train.textmodes import apply_text_mode, check_reads_text, check_text_mode


__all__ = ["PER_IMAGE_COLUMNS", "SUMMARY_KEYS", "eval_dir", "evaluate", "evaluate_cli"]

SUMMARY_KEYS = ("dice", "iou", "dice_std", "iou_std", "global_dice", "n_images", "split", "text", "cache_key_hash",
                "weights_sha256")
PER_IMAGE_COLUMNS = ("id", "dice", "iou", "intersection", "pred_area", "target_area", "text")
PROGRESS_AFTER_S = 2.0          # the bar appears only once an evaluation has run this long


def _safe_name(image_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"


def evaluate(run: Path, split: str = EvaluateConfig.split, cache: Path | None = None,
             overlays: bool = EvaluateConfig.overlays,
             console: Console | None = None, batch_size: int | None = None,
             device: str | None = EvaluateConfig.device,
             precision: str = EvaluateConfig.precision, text: str = EvaluateConfig.text,
             text_seed: int = EvaluateConfig.text_seed,
             text_encoder: str | None = EvaluateConfig.text_encoder, tta: str = EvaluateConfig.tta,
             config: EvaluateConfig | None = None) -> dict[str, Any]:
    """Evaluate the run's best head on every image of ``split`` (view 0); write ``RUN/eval-<split>/``
    (``RUN/eval-<split>-text-<mode>/`` with a ``text`` other than "as-is"). The options are
    :class:`train.config.EvaluateConfig`'s: given one by one, or as ``config`` (which then wins).

    Args:
        run: a finished ``fit`` run folder.
        split: the store split to score. Default "test".
        cache: the store to read; default the run's own (``config.json``). A store whose key differs
            from the run's ``cache_key.json`` is refused (:class:`train.runs.rundir.CacheMismatchError`).
        overlays: also write ``overlays/<id>.png`` per image. Default True.
        console: where progress and the result line go; default stderr.
        batch_size: images per forward pass; default the model's rule (:class:`train.registry.ModelSpec`).
        device: where the model runs (:func:`common.devices.resolve_device`; None: CUDA when present).
        precision: fp32, or bf16 / fp16 autocast for the forward passes.
        text: the text the head is given (:data:`train.textmodes.TEXT_MODES`): "as-is" (default), "none",
            "shuffled", "mirrored"; other than "as-is" refused for a model that reads no text.
        text_seed: the seed of "shuffled".
        text_encoder: with "mirrored", the store's text encoder if it moved (its hashes are checked).
        tta: test-time augmentation (:data:`train.config.TTA_VIEWS`): "none" (default), "flips" or "d4"; the
            views' features come from the store's TTA companion (:func:`extract.tta.tta_store`, extracted on first
            need), one image's views per forward (``batch_size`` does not apply).

    Returns the summary (also written to ``summary.json``).
    """
    console = console or Console(stderr=True)
    run = Path(run)
    cfg = config or EvaluateConfig(split=split, cache=None if cache is None else str(cache), overlays=overlays,
                                   device=device, precision=precision, text=text, text_seed=text_seed,
                                   text_encoder=text_encoder, tta=tta)  # its options checked before anything is read
    split, cache, overlays, device = cfg.split, cfg.cache, cfg.overlays, cfg.device
    precision, text, text_seed, text_encoder = cfg.precision, cfg.text, cfg.text_seed, cfg.text_encoder
    tta = cfg.tta
    check_text_mode(text)
    weights = rundir.weights_sha256(run)  # before loading them: the summary names what was scored
    config, model, store = load_run(run, cache, device)
    spec = spec_of(config)
    if text != "as-is":
        check_reads_text(spec, config["head"], f"text={text!r}", "text", f"run {run}")
    data = _split_data(spec, store, split, config, tta, console)  # as the model was trained
    apply_text_mode(data, text, store, seed=text_seed, text_encoder=text_encoder,
                    device=str(next(model.parameters()).device))
    texts = [""] * len(data) if text == "none" else data.texts  # what the head was given
    batch = 1 if tta != "none" else batch_size or spec.batch_size(config["head"], store.size)
    out = _clear(eval_dir(run, split, text, tta), overlays)
    draw = _overlays(store.images(split), data, texts, out / rundir.OVERLAYS) if overlays else None
    forward = _forward(model, data, store.size, precision, text == "none", TTA_VIEWS[tta])
    metrics, preds = _score(forward, len(data), store.size, batch, console, split, draw)
    # no paths: the same fit evaluated in two folders gives the same bytes
    summary = {**metrics.aggregate(), "split": split, "text": text, "cache_key_hash": store.key_hash,
               "weights_sha256": weights, **({"text_seed": text_seed} if text == "shuffled" else {}),
               **({"tta": tta, "tta_views": list(TTA_VIEWS[tta])} if tta != "none" else {})}
    _write(out, data.ids, texts, metrics, preds, summary)
    pct = {k: 100 * summary[k] for k in ("dice", "dice_std", "iou", "iou_std", "global_dice")}
    mode = ("" if text == "as-is" else f" (text {text})") + ("" if tta == "none" else f" (tta {tta})")
    console.print(f"evaluate {split}{mode}: {summary['n_images']} images, Dice {pct['dice']:.2f} ± {pct['dice_std']:.2f} %, "
                  f"IoU {pct['iou']:.2f} ± {pct['iou_std']:.2f} %, global Dice {pct['global_dice']:.2f} % → {out}",
                  highlight=False)
    return summary


def _clear(out: Path, overlays: bool) -> Path:
    """The evaluation folder, emptied of the last evaluation's summary (written last, so removed first) and
    overlays: it holds this evaluation only."""
    out.mkdir(parents=True, exist_ok=True)
    (out / rundir.SUMMARY).unlink(missing_ok=True)
    overlay_dir = out / rundir.OVERLAYS
    for stale in overlay_dir.glob("*.png"):
        stale.unlink()
    if overlays:
        overlay_dir.mkdir(exist_ok=True)
    elif overlay_dir.is_dir() and not any(overlay_dir.iterdir()):
        overlay_dir.rmdir()
    return out


_Draw = Callable[[list[int], torch.Tensor, torch.Tensor, list[dict[str, float]]], None]


def _overlays(images: Any, data: SplitData, texts: list[str], folder: Path) -> _Draw:
    """What writes a batch's overlays (image | ground truth | prediction, titled with its scores and text)."""
    def draw(rows: list[int], target: torch.Tensor, pred: torch.Tensor, scores: list[dict[str, float]]) -> None:
        for k, row in enumerate(rows):
            image_id = data.ids[row]
            image = np.asarray(images[int(data.indices[row]), 0].compute())
            overlay_png(image, target[k].numpy(), pred[k].numpy(), folder / f"{_safe_name(image_id)}.png",
                        title=f"{image_id} — Dice {scores[k]['dice']:.3f}, IoU {scores[k]['iou']:.3f}",
                        text=texts[row])
    return draw


def _split_data(spec: ModelSpec, store: FeatureStore, split: str, config: dict[str, Any], tta: str,
                console: Console) -> SplitData:
    """The split as the run reads it; with test-time augmentation, a features-reading run's from the store that
    holds its views (each view with its own text's tokens), an images-reading run's from the store itself."""
    reading = reading_of(config)
    if tta != "none" and spec.reads_features:
        views_store = tta_store(store, split, reading.blocks, reading.steps, console)
        data = open_split(spec, views_store, split, replace(reading, view_tokens=True))
        if data.ids != store.ids(split):
            raise ValueError(f"{views_store.path} holds other images of {split} than {store.path}")
        return data
    return open_split(spec, store, split, reading)


_Forward = Callable[[list[int]], tuple[torch.Tensor, torch.Tensor]]


def _forward(model: torch.nn.Module, data: SplitData, size: int, precision: str, no_text: bool,
             views: tuple[int, ...]) -> _Forward:
    """What turns rows into (argmax predictions, targets) (B, S, S) on the CPU: ``rows`` in one forward, or with
    more ``views`` than the image itself, one row's views in one forward, their probabilities averaged."""
    half = next(model.parameters()).device.type == "cuda"  # float16 features travel, converted there

    def plain(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        sample = data.batch(rows, half=half)
        sample = sample.withhold_text() if no_text else sample
        return probabilities(model, sample, size, precision).argmax(1).cpu(), sample.target.cpu()

    def averaged(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        (row,) = rows
        sample = view_sample(data, row, views, half)
        sample = sample.withhold_text() if no_text else sample
        probs = tta_probabilities(model, sample, size, views, precision)
        return probs.argmax(1).cpu(), data.targets([row], [0])

    return plain if views == (0,) else averaged


def _score(forward: _Forward, n: int, size: int, batch: int, console: Console, split: str,
           draw: _Draw | None) -> tuple[SegMetrics, np.ndarray]:
    """Every row's argmax prediction, ``batch`` at a time, into metrics; (metrics, the (N, S, S) bool masks).
    A progress bar appears once it has run :data:`PROGRESS_AFTER_S` seconds."""
    metrics = SegMetrics()
    preds = np.zeros((n, size, size), dtype=bool)
    started = time.perf_counter()
    progress = stage_progress(console, "evaluate", "images", description=split, transient=True)
    task = progress.add_task("", total=n)
    shown = False
    try:
        for start in range(0, n, batch):
            rows = list(range(start, min(start + batch, n)))
            pred, target = forward(rows)
            metrics.update(pred, target)
            preds[rows] = pred.numpy() != 0
            if draw is not None:
                draw(rows, target, pred, metrics.per_image()[-len(rows):])
            progress.update(task, completed=rows[-1] + 1)
            if not shown and time.perf_counter() - started > PROGRESS_AFTER_S and rows[-1] + 1 < n:
                progress.start()
                shown = True
    finally:
        if shown:
            progress.stop()
    return metrics, preds


def _write(out: Path, ids: list[str], texts: list[str], metrics: SegMetrics, preds: np.ndarray,
           summary: dict[str, Any]) -> None:
    """per_image.csv, predictions.npz, then summary.json (last: its presence means a complete evaluation)."""
    per_image = [{"id": image_id, **scores, "text": given}
                 for image_id, given, scores in zip(ids, texts, metrics.per_image())]
    rundir.write_csv(out / rundir.PER_IMAGE, per_image, PER_IMAGE_COLUMNS)
    np.savez_compressed(out / rundir.PREDICTIONS, ids=np.array(ids), pred=preds)
    write_json(out / rundir.SUMMARY, summary)


def evaluate_cli(run: Path, config: EvaluateConfig, console: Console | None = None) -> dict[str, Any]:
    """The body of ``pipeline evaluate``: :func:`evaluate` with ``config``, then the summary as JSON on stdout."""
    summary = evaluate(run, config=config, console=console or Console(stderr=True))
    print(json.dumps(summary, indent=1))
    return summary
