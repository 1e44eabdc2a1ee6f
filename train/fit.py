"""Stage two: train a registered model from the cache, pick the best epoch on validation Dice.

Reads only the feature store (no UNet, no text encoder). Adam (lr 1e-4, × 0.1 after epoch 60 as in
the authors' code), batch 1, CE + 1.5 Dice,
the model's own weight init; augmentation samples the cached dihedral views when the store has them
(p = 0.5 identity, else one of the 8 views uniformly, as the authors' random rot90 + flip), each with the
text ``view_text`` says (:func:`view_choices`: the image's, the view's own, or only views whose own text is
the image's). With ``text_dropout`` p, each training sample's text is withheld with probability p, drawn
from (seed, epoch, sample) (:mod:`train.textmodes`), and those samples train a classifier of their own
(``dropout_classifier="own"``, :class:`train.nets.head.TextDiffHead`'s ``no_text_classifier``) or the text head
with its attention silent ("shared"); validation gives the text, and for a classifier of their own also
withholds it: that classifier's weights are kept from its own best epoch without text. The same
config and seed give bit-identical weights and metrics on a CPU. Each epoch ends with a checkpoint in
the run folder; ``resume`` continues a killed fit from it, bit-identically (:mod:`train.runs.resume`). Which
model, what it reads and how it is built come from the registry (:mod:`train.registry`); the run folder
from :mod:`train.runs.rundir`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from common.errors import OptionError
from cache.key import key_hash
from cache.store import FeatureStore
from common.devices import deterministic_kernels, precision_context, resolve_device
from common.progress import stage_progress
from train.runs import rundir
from train.config import FitConfig
from train.data.readers import GIB, PAPER_TRAIN_COUNT, Reading, SplitData, choose_subset
from train.data.feed import Feed
from train.nets.losses import segmentation_loss
from train.metrics import SegMetrics
from train.registry import ModelSpec, logits, model_spec, open_split, probabilities
from train.plots import loss_curve_png
from train.runs.resume import FitState, checkpoint_state, finished, pause_after, restore, resumable
from train.runs.rundir import write_json
from train.textmodes import check_reads_text, dropped

__all__ = ["FitConfig", "fit", "validate"]


def _split_train_val(store: FeatureStore, cfg: FitConfig) -> tuple[np.ndarray, str, np.ndarray]:
    """(train indices, validation split, validation indices): the val split, or a seeded hold-out of train."""
    n_train = len(store.ids("train"))
    dataset = store.key["dataset"].get("name", "")
    count = cfg.train_count if cfg.train_count is not None else PAPER_TRAIN_COUNT.get(dataset)
    if "val" in store.splits():
        return choose_subset(n_train, count, cfg.subset_seed), "val", np.arange(len(store.ids("val")))
    n_val = max(1, int(round(cfg.val_fraction * n_train)))
    perm = np.random.default_rng(10_000 + cfg.subset_seed).permutation(n_train)
    held, rest = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return rest[choose_subset(len(rest), count, cfg.subset_seed)], "train", held


def validate(model: torch.nn.Module, data: SplitData, size: int, batch_size: int = 4,
             precision: str = "fp32", text: bool = True) -> dict[str, float]:
    """Mean per-image Dice / IoU of argmax predictions on ``data`` (view 0), on the model's device;
    ``text=False``: with every token withheld."""
    metrics = SegMetrics()
    half = next(model.parameters()).device.type == "cuda"  # float16 features travel, converted there
    for start in range(0, len(data), batch_size):
        sample = data.batch(list(range(start, min(start + batch_size, len(data)))), half=half)
        if not text:
            sample = sample.withhold_text()
        metrics.update(probabilities(model, sample, size, precision).argmax(1).cpu(), sample.target)
    agg = metrics.aggregate()
    return {"dice": float(agg["dice"]), "iou": float(agg["iou"])}


_NOT_VALIDATED = {"dice": "", "iou": ""}  # an epoch not validated: blank cells in history.csv


def _best(scores: dict[str, float], epoch: int, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A best-epoch record: its validation scores, the epoch and a CPU copy of ``state``."""
    return {"val_dice": scores["dice"], "val_iou": scores["iou"], "epoch": epoch,
            "state": {k: v.detach().cpu().clone() for k, v in state.items()}}


def _best_weights(run: FitState) -> dict[str, torch.Tensor]:
    """The weights to keep: the best epoch's on validation with text; a no-text classifier's own from its best
    epoch on validation without text (its parameters are its own: the two selections are independent)."""
    state = run.best["state"]
    if "state" not in run.best_no_text:
        return state
    return {**state, **{f"no_text_classifier.{k}": v for k, v in run.best_no_text["state"].items()}}


def check_view_text(store: FeatureStore, view_text: str) -> None:
    """Refuse a ``view_text`` other than ``same`` on a store whose training views have no text of their own."""
    if view_text == "same":
        return
    views = store.layout("train").views
    if views == 1 or store.view_texts("train") is None:
        what = "one view per training image" if views == 1 else "views made before they kept their own text"
        raise OptionError(f"view_text={view_text!r} needs a store whose training views keep their own text "
                          f"(`pipeline extract ... --augment d4`); {store.path} has {what}; or pass "
                          f"view_text='same'", "view_text")


def view_choices(data: SplitData, view_text: str) -> list[list[int]] | None:
    """The views each row may be trained at (None: every view): with ``unchanged``, those whose own text is the
    image's (view 0 always)."""
    if view_text != "unchanged" or data.view_texts is None:
        return None
    return [[v for v, t in enumerate(texts) if v == 0 or t == text] for text, texts in zip(data.texts, data.view_texts)]


def _views(rng: np.random.Generator, rows: list[int], n_views: int, augment: bool,
           choices: list[list[int]] | None = None) -> list[int]:
    """Each row's view: with p = 0.5 the original, else one of its ``choices`` (default: all ``n_views``)."""
    if not augment or n_views == 1:
        return [0] * len(rows)
    out = []
    for k in rows:
        allowed = range(n_views) if choices is None else choices[k]
        out.append(0 if rng.random() < 0.5 else int(allowed[int(rng.integers(len(allowed)))]))
    return out


@dataclass
class _Fit:
    """What one fit holds from its set-up to its end (:func:`fit`'s steps)."""

    cfg: FitConfig
    spec: ModelSpec
    store: FeatureStore
    train: SplitData
    val: SplitData
    choices: list[list[int]] | None
    device: torch.device
    seed: int
    model: torch.nn.Module
    optim: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    run: FitState
    console: Console

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def size(self) -> int:
        return self.store.size

    @property
    def no_text_classifier(self) -> bool:
        """The head has a classifier of its own for samples without text: validated, and its best epoch
        chosen, without text too."""
        return bool(self.model.config.get("no_text_classifier"))


def fit(cfg: FitConfig, console: Console | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on the store at ``cfg.cache``; write the run folder ``cfg.out``; return metrics.

    A finished run in ``cfg.out`` is returned as it is with ``resume`` (before any feature is read), refused
    without it unless ``overwrite``."""
    console = console or Console(stderr=True)
    store = FeatureStore.open(cfg.cache)
    if "train" not in store.splits():
        raise ValueError(f"store {store.path} has no train split (it has {store.splits()})")
    if finished(cfg, store):
        console.print(f"fit {cfg.out}: finished already; nothing to resume", highlight=False)
        return rundir.read_metrics(Path(cfg.out))
    device = resolve_device(cfg.device)
    with deterministic_kernels(device):
        f = _set_up(cfg, store, device, console)
        progress = stage_progress(console, "fit", "epochs")
        with progress:
            task = progress.add_task("", total=cfg.epochs, completed=f.run.epoch)
            for epoch in range(f.run.epoch + 1, cfg.epochs + 1):
                row = _epoch(f, epoch)
                validated = row["val_dice"] != ""
                val_text = f"{row['val_dice']:.4f}" if validated else "—"
                best = f.run.best
                best_text = f" (best {best['val_dice']:.4f} @ {best['epoch']})" if "epoch" in best else ""
                progress.update(task, advance=1,
                                description=f"loss {row['train_loss']:.4f} · val Dice {val_text}{best_text}")
        return _finish(f)


def _set_up(cfg: FitConfig, store: FeatureStore, device: torch.device, console: Console) -> _Fit:
    """Read the splits, build the model, optimiser and schedule (restored from a checkpoint with ``resume``),
    and start the run folder (marked incomplete; a fresh fit's earlier evaluations removed)."""
    spec = model_spec(cfg.model)
    check_view_text(store, cfg.view_text)
    blocks, steps = spec.reader.select(store, cfg.blocks, cfg.steps)
    reading = Reading(blocks, steps, cfg.attend_padding, cfg.memory_budget_gb * GIB, cfg.view_text == "rewrite",
                      cfg.mask_resize)
    train_idx, val_split, val_idx = _split_train_val(store, cfg)
    train = open_split(spec, store, "train", reading, train_idx)
    val = open_split(spec, store, val_split, reading, val_idx)
    seed = cfg.subset_seed if cfg.seed is None else cfg.seed
    model = _build(cfg, spec, train, store, seed).to(device)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # fp16 gradients underflow
    milestones = [cfg.lr_drop_epoch] if cfg.lr_drop_epoch else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=milestones, gamma=0.1)
    rng = np.random.default_rng(seed)
    state = resumable(cfg, store)
    run = restore(state, model, optim, schedule, rng, scaler, device) if state is not None else FitState()
    del state  # its copies of the weights are not needed any more
    f = _Fit(cfg, spec, store, train, val, view_choices(train, cfg.view_text), device, seed, model, optim, scaler,
             schedule, rng, run, console)
    _start_folder(f, blocks, steps, val_split)
    return f


def _build(cfg: FitConfig, spec: ModelSpec, train: SplitData, store: FeatureStore, seed: int) -> torch.nn.Module:
    """The model, its weights initialised on the CPU from ``seed`` (the same on every device)."""
    torch.manual_seed(seed)
    model = spec.build(cfg.model_args, train, store)
    if cfg.text_dropout:
        check_reads_text(spec, model.config, f"text_dropout={cfg.text_dropout}", "text_dropout")
        if cfg.dropout_classifier == "own":  # a classifier of their own for the samples without text
            model = spec.rebuild({**model.config, "no_text_classifier": True})
    model.init_weights()
    return model


def _start_folder(f: _Fit, blocks: tuple[int, ...], steps: tuple[int, ...], val_split: str) -> None:
    """Mark the run folder incomplete, write its config and store key, and say what is fitted."""
    cfg, out = f.cfg, f.out
    if not f.run.epoch:
        rundir.clear_evaluations(out)  # they scored other weights
    rundir.mark_incomplete(out)
    config = {"fit": cfg.to_json(), "device": str(f.device), "head": f.spec.identity(f.model), "cache": f.store.location,
              "dataset": f.store.key["dataset"].get("name", ""), "size": f.size, "blocks": list(blocks),
              "steps": list(steps), "train_split": "train", "train_ids": f.train.ids,
              "val": {"split": val_split, "ids": f.val.ids}}
    write_json(out / rundir.CONFIG, config)
    write_json(out / rundir.CACHE_KEY, f.store.key)
    resumed = f"resuming after epoch {f.run.epoch}; " if f.run.epoch else ""
    dropout = f"; text withheld with p = {cfg.text_dropout} ({cfg.dropout_classifier} classifier)" \
        if cfg.text_dropout else ""
    f.console.print(f"fit {f.spec.name}: {resumed}{len(f.train)} training images "
                    f"({'in memory' if f.train.in_memory else 'streamed'}), "
                    f"validation on {len(f.val)} {val_split} images; {f.train.describe()}"
                    f"{'' if cfg.view_text == 'same' else f' (view text: {cfg.view_text})'}; "
                    f"{sum(p.numel() for p in f.model.parameters()):,} parameters; {f.device}, {cfg.precision}"
                    f"{dropout}")


def _epoch(f: _Fit, epoch: int) -> dict[str, Any]:
    """One epoch: train, validate (every ``val_every``), keep the best weights, checkpoint; its history row."""
    t0 = time.perf_counter()
    loss, waited = _train_epoch(f, epoch)
    t1 = time.perf_counter()
    validated = epoch % f.cfg.val_every == 0 or epoch == f.cfg.epochs
    scores, no_text = _validation_epoch(f) if validated else (_NOT_VALIDATED, _NOT_VALIDATED)
    t2 = time.perf_counter()
    row = {"epoch": epoch, "train_loss": loss, "val_dice": scores["dice"], "val_iou": scores["iou"],
           "seconds": round(t2 - t0, 3), "train_seconds": round(t1 - t0, 3), "val_seconds": round(t2 - t1, 3),
           "data_wait_seconds": round(waited, 3)}
    if f.no_text_classifier:
        row |= {"val_dice_no_text": no_text["dice"], "val_iou_no_text": no_text["iou"]}
    run = f.run
    run.history.append(row)
    if validated and scores["dice"] > run.best["val_dice"]:
        run.best = _best(scores, epoch, f.model.state_dict())
    if validated and f.no_text_classifier and no_text["dice"] > run.best_no_text["val_dice"]:
        run.best_no_text = _best(no_text, epoch, f.model.no_text_classifier.state_dict())
    run.epoch = epoch
    rundir.save_checkpoint(f.out, checkpoint_state(run, f.model, f.optim, f.schedule, f.rng, f.cfg, f.store,
                                                   f.scaler, f.device))
    pause_after(epoch)
    return row


def _train_epoch(f: _Fit, epoch: int) -> tuple[float, float]:
    """One pass over the training rows in a seeded order, each at a sampled view; (mean loss, data wait s)."""
    cfg, model = f.cfg, f.model
    model.train()
    order = f.rng.permutation(len(f.train)).tolist()
    chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    batches = [(rows, _views(f.rng, rows, f.train.views, cfg.augment, f.choices)) for rows in chunks]
    feed = Feed(f.train, batches, f.device)
    withheld = dropped(f.seed, epoch, len(f.train), cfg.text_dropout) if cfg.text_dropout else None
    losses = []
    for (rows, _), (sample, target) in zip(batches, feed):
        if withheld is not None:
            sample = sample.withhold_text(withheld[rows])
        with precision_context(f.device, cfg.precision):
            scores_map = logits(model, sample, f.size)
        loss = segmentation_loss(scores_map.float(), target, dice_on_logits=cfg.dice_on_logits)
        f.optim.zero_grad(set_to_none=True)
        f.scaler.scale(loss).backward()
        f.scaler.step(f.optim)
        f.scaler.update()
        losses.append(loss.item())
    f.schedule.step()
    return float(np.mean(losses)), feed.waited


def _validation_epoch(f: _Fit) -> tuple[dict[str, float], dict[str, float]]:
    """Validation scores with text, and without (a head with a no-text classifier; else unscored)."""
    scores = validate(f.model, f.val, f.size, precision=f.cfg.precision)
    if not f.no_text_classifier:
        return scores, _NOT_VALIDATED
    return scores, validate(f.model, f.val, f.size, precision=f.cfg.precision, text=False)


def _finish(f: _Fit) -> dict[str, Any]:
    """Write the best weights, the history, the metrics (last) and the loss curve; mark the run complete."""
    out, history, best = f.out, f.run.history, f.run.best
    rundir.save_weights(out, _best_weights(f.run))
    rundir.write_csv(out / rundir.HISTORY, history, list(history[0]))
    metrics = {"best_epoch": best["epoch"], "best_val_dice": best["val_dice"], "best_val_iou": best["val_iou"],
               "final_train_loss": history[-1]["train_loss"], "n_train": len(f.train), "n_val": len(f.val),
               "val_split": f.val.split, "epochs": f.cfg.epochs, "cache_key_hash": key_hash(f.store.key),
               "seconds": round(sum(r["seconds"] for r in history), 2)}
    if f.no_text_classifier:
        metrics |= {f"best_{k}_no_text": f.run.best_no_text[k] for k in ("epoch", "val_dice", "val_iou")}
    write_json(out / rundir.METRICS, metrics)
    loss_curve_png(out / rundir.HISTORY, out / rundir.LOSS_PLOT, title=f"fit {out.name}")
    rundir.mark_complete(out)
    rundir.remove_checkpoint(out)
    return metrics
