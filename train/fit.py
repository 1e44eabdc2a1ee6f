"""Stage two: train a registered model from the cache, pick the best epoch on validation Dice.

Reads only the feature store (no UNet, no text encoder). Adam (lr 1e-4, × 0.1 after epoch 60 as in
the authors' code), batch 1, CE + 1.5 Dice,
the model's own weight init; augmentation samples the cached dihedral views when the store has them
(p = 0.5 identity, else one of the 8 views uniformly, as the authors' random rot90 + flip), each with the
text ``view_text`` says (:func:`view_choices`: the image's, the view's own, or only views whose own text is
the image's). With ``text_dropout`` p, each training sample's text is withheld with probability p, drawn
from (seed, epoch, sample) (:mod:`train.textmodes`), and those samples train a classifier of their own
(``dropout_classifier="own"``, :class:`train.model.TextDiffHead`'s ``no_text_classifier``) or the text head
with its attention silent ("shared"); validation gives the text, and for a classifier of their own also
withholds it: that classifier's weights are kept from its own best epoch without text. The same
config and seed give bit-identical weights and metrics on a CPU. Each epoch ends with a checkpoint in
the run folder; ``resume`` continues a killed fit from it, bit-identically (:mod:`train.resume`). Which
model, what it reads and how it is built come from the registry (:mod:`train.models`); the run folder
from :mod:`train.rundir`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cache.errors import OptionError
from cache.key import key_hash
from cache.store import FeatureStore
from extract.devices import precision_context, resolve_device
from extract.shared import stage_progress
from train import rundir
from train.config import FitConfig
from train.data import GIB, PAPER_TRAIN_COUNT, READERS, Reading, SplitData, choose_subset
from train.feed import Feed
from train.losses import segmentation_loss
from train.metrics import SegMetrics
from train.models import logits, model_spec, open_split, probabilities
from train.plots import loss_curve_png
from train.resume import FitState, checkpoint_state, finished, pause_after, restore, resumable
from train.rundir import write_json
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
    for start in range(0, len(data), batch_size):
        sample = data.batch(list(range(start, min(start + batch_size, len(data)))))
        if not text:
            sample = sample.withhold_text()
        metrics.update(probabilities(model, sample, size, precision).argmax(1).cpu(), sample.target)
    agg = metrics.aggregate()
    return {"dice": float(agg["dice"]), "iou": float(agg["iou"])}


_UNSCORED = {"dice": "", "iou": ""}  # an epoch not validated: blank cells in history.csv


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


def deterministic(device: torch.device) -> None:
    """On CUDA, the deterministic kernels torch has (cuDNN's, cuBLAS's with a fixed workspace); the rest
    (e.g. the backward of bilinear upsampling, which adds atomically) run with a warning, not an error."""
    if device.type != "cuda":
        return  # CPU kernels are deterministic at a fixed thread count
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)


def fit(cfg: FitConfig, console: Console | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on the store at ``cfg.cache``; write the run folder ``cfg.out``; return metrics."""
    console = console or Console(stderr=True)
    spec = model_spec(cfg.model)
    store = FeatureStore.open(cfg.cache)
    if "train" not in store.splits():
        raise ValueError(f"store {store.path} has no train split (it has {store.splits()})")
    check_view_text(store, cfg.view_text)
    blocks, steps = READERS[spec.reads].select(store, cfg.blocks, cfg.steps)
    reading = Reading(blocks, steps, cfg.attend_padding, cfg.memory_budget_gb * GIB, cfg.view_text == "rewrite")
    train_idx, val_split, val_idx = _split_train_val(store, cfg)
    train = open_split(spec, store, "train", reading, train_idx)
    val = open_split(spec, store, val_split, reading, val_idx)
    choices = view_choices(train, cfg.view_text)
    size = store.size

    out = Path(cfg.out)
    if finished(cfg, store):
        console.print(f"fit {out}: finished already; nothing to resume", highlight=False)
        return rundir.read_json(out / rundir.METRICS)
    device = resolve_device(cfg.device)
    deterministic(device)
    seed = cfg.subset_seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    model = spec.build(cfg.model_args, train, store)
    if cfg.text_dropout:
        check_reads_text(spec, model.config, f"text_dropout={cfg.text_dropout}", "text_dropout")
        if cfg.dropout_classifier == "own":  # a classifier of their own for the samples without text
            model = spec.rebuild({**model.config, "no_text_classifier": True})
    own = bool(model.config.get("no_text_classifier"))  # validated, and its best epoch chosen, without text too
    model.init_weights()  # on the CPU: the same initial weights on every device
    model.to(device)
    optim = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")  # fp16 gradients underflow
    milestones = [cfg.lr_drop_epoch] if cfg.lr_drop_epoch else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=milestones, gamma=0.1)
    rng = np.random.default_rng(seed)
    state = resumable(cfg, store)
    run = restore(state, model, optim, schedule, rng, scaler) if state is not None else FitState()
    del state  # its copies of the weights are not needed any more

    rundir.mark_incomplete(out)
    config = {"fit": cfg.to_json(), "device": str(device), "head": model.config, "cache": store.location,
              "dataset": store.key["dataset"].get("name", ""), "size": size, "blocks": list(blocks),
              "steps": list(steps), "train_split": "train", "train_ids": train.ids,
              "val": {"split": val_split, "ids": val.ids}}
    write_json(out / rundir.CONFIG, config)
    write_json(out / rundir.CACHE_KEY, store.key)
    resumed = f"resuming after epoch {run.epoch}; " if run.epoch else ""
    dropout = f"; text withheld with p = {cfg.text_dropout} ({cfg.dropout_classifier} classifier)" \
        if cfg.text_dropout else ""
    console.print(f"fit {spec.name}: {resumed}{len(train)} training images "
                  f"({'in memory' if train.in_memory else 'streamed'}), "
                  f"validation on {len(val)} {val_split} images; {train.describe()}"
                  f"{'' if cfg.view_text == 'same' else f' (view text: {cfg.view_text})'}; "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters; {device}, {cfg.precision}"
                  f"{dropout}")

    progress = stage_progress(console, "fit", "epochs")
    with progress:
        task = progress.add_task("", total=cfg.epochs, completed=run.epoch)
        for epoch in range(run.epoch + 1, cfg.epochs + 1):
            t0 = time.perf_counter()
            model.train()
            order = rng.permutation(len(train)).tolist()
            chunks = [order[i:i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
            batches = [(rows, _views(rng, rows, train.views, cfg.augment, choices)) for rows in chunks]
            feed = Feed(train, batches, device)
            withheld = dropped(seed, epoch, len(train), cfg.text_dropout) if cfg.text_dropout else None
            losses = []
            for (rows, _), (sample, target) in zip(batches, feed):
                if withheld is not None:
                    sample = sample.withhold_text(withheld[rows])
                with precision_context(device, cfg.precision):
                    scores_map = logits(model, sample, size)
                loss = segmentation_loss(scores_map.float(), target, dice_on_logits=cfg.dice_on_logits)
                optim.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
                losses.append(loss.item())
            schedule.step()
            t1 = time.perf_counter()
            validated = epoch % cfg.val_every == 0 or epoch == cfg.epochs
            scores = validate(model, val, size, precision=cfg.precision) if validated else _UNSCORED
            free = validate(model, val, size, precision=cfg.precision, text=False) if validated and own else _UNSCORED
            t2 = time.perf_counter()
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": scores["dice"],
                   "val_iou": scores["iou"], "seconds": round(t2 - t0, 3), "train_seconds": round(t1 - t0, 3),
                   "val_seconds": round(t2 - t1, 3), "data_wait_seconds": round(feed.waited, 3)}
            if own:
                row |= {"val_dice_no_text": free["dice"], "val_iou_no_text": free["iou"]}
            run.history.append(row)
            if validated and scores["dice"] > run.best["val_dice"]:
                run.best = _best(scores, epoch, model.state_dict())
            if validated and own and free["dice"] > run.best_no_text["val_dice"]:
                run.best_no_text = _best(free, epoch, model.no_text_classifier.state_dict())
            run.epoch = epoch
            rundir.save_checkpoint(out, checkpoint_state(run, model, optim, schedule, rng, cfg, store, scaler))
            pause_after(epoch)
            val_text = f"{scores['dice']:.4f}" if validated else "—"
            best_text = f" (best {run.best['val_dice']:.4f} @ {run.best['epoch']})" if "epoch" in run.best else ""
            progress.update(task, advance=1,
                            description=f"loss {row['train_loss']:.4f} · val Dice {val_text}{best_text}")

    history, best = run.history, run.best
    rundir.save_weights(out, _best_weights(run))
    rundir.write_csv(out / rundir.HISTORY, history, list(history[0]))
    metrics = {"best_epoch": best["epoch"], "best_val_dice": best["val_dice"], "best_val_iou": best["val_iou"],
               "final_train_loss": history[-1]["train_loss"], "n_train": len(train), "n_val": len(val),
               "val_split": val_split, "epochs": cfg.epochs, "cache_key_hash": key_hash(store.key),
               "seconds": round(sum(r["seconds"] for r in history), 2)}
    if own:
        metrics |= {f"best_{k}_no_text": run.best_no_text[k] for k in ("epoch", "val_dice", "val_iou")}
    write_json(out / rundir.METRICS, metrics)
    loss_curve_png(out / rundir.HISTORY, out / rundir.LOSS_PLOT, title=f"fit {out.name}")
    rundir.mark_complete(out)
    rundir.remove_checkpoint(out)
    return metrics
