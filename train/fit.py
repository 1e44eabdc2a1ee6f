"""Stage two: train the TextDiff head from the cache, pick the best epoch on validation Dice.

Reads only the feature store (no UNet, no text encoder). Adam (lr 1e-4, × 0.1 after epoch 60 as in
the authors' code), batch 1, CE + 1.5 Dice,
the authors' weight init; augmentation samples the cached dihedral views when the store has them
(p = 0.5 identity, else one of the 8 views uniformly, as the authors' random rot90 + flip). The same
config and seed give bit-identical weights and metrics on a CPU.

A run folder holds ``config.json`` (this config, the head's, the chosen ids), ``cache_key.json``,
``head.pt`` (best epoch), ``history.csv``, ``loss.png``, ``metrics.json``. While a fit runs, ``INCOMPLETE`` marks
the folder; it is removed only after every file is written.
"""

from __future__ import annotations

import copy
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from cache.key import key_hash
from cache.store import FeatureStore
from extract.shared import stage_progress
from train.baseline import PlainUNet, SplitImages
from train.data import GIB, PAPER_TRAIN_COUNT, Sample, SplitFeatures, choose_subset, resolve_selection
from train.losses import segmentation_loss
from train.metrics import SegMetrics
from train.model import FUSIONS, TextDiffHead
from train.plots import loss_curve_png

INCOMPLETE = "INCOMPLETE"
MODELS = ("textdiff", "unet")


class CacheMismatchError(ValueError):
    """A run evaluated or continued against a store other than the one it was trained on."""


@dataclass
class FitConfig:
    """Everything ``pipeline fit`` takes (defaults: the paper's)."""

    cache: Path
    out: Path
    blocks: tuple[int, ...] | None = None  # None: every block in the store
    steps: tuple[int, ...] | None = None   # None: every step in the store
    train_count: int | None = None          # None: the paper's (MoNuSeg 5, QaTa 150), else all
    subset_seed: int = 0
    epochs: int = 100
    batch_size: int = 1
    lr: float = 1e-4
    lr_drop_epoch: int | None = 60          # the authors' MultiStepLR: lr × 0.1 after this epoch
    norm: str = "image"                     # "batch": BatchNorm running statistics at evaluation (authors)
    fusion: str = "cross-attn"              # "none" = --no-text (ζ1), "concat" (ζ2)
    dim: int = 768
    head_channels: tuple[int, ...] = (128, 32)
    pos_enc: bool = False
    shared_block: bool = True
    dice_on_logits: bool = False
    attend_padding: bool = False            # the authors' cross-attention also attends to padding tokens
    seed: int | None = None                 # weights, order, augmentation; None: the subset seed
    val_fraction: float = 0.2               # hold-out of train when the store has no val split
    memory_budget_gb: float = 4.0
    augment: bool = True
    model: str = "textdiff"                 # or "unet": the plain U-Net baseline on the images (train/baseline.py)
    width: int = 64                         # plain U-Net: channels of its first level (64: 31.0 M parameters)
    depth: int = 4                          # plain U-Net: down-sampling levels
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["cache"], d["out"] = str(self.cache), str(self.out)
        return json.loads(json.dumps(d))


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


@torch.no_grad()
def predict(head: TextDiffHead, sample: Sample, size: int) -> torch.Tensor:
    """Class probabilities (B, K, size, size)."""
    head.eval()
    return torch.softmax(head(sample.feats, sample.tokens, sample.token_mask, out_size=size), dim=1)


def validate(head: TextDiffHead, data: SplitFeatures, size: int, batch_size: int = 4) -> dict[str, float]:
    """Mean per-image Dice / IoU of argmax predictions on ``data`` (view 0)."""
    metrics = SegMetrics()
    for start in range(0, len(data), batch_size):
        sample = data.batch(list(range(start, min(start + batch_size, len(data)))))
        metrics.update(predict(head, sample, size).argmax(1), sample.target)
    agg = metrics.aggregate()
    return {"dice": float(agg["dice"]), "iou": float(agg["iou"])}


def _views(rng: np.random.Generator, n: int, n_views: int, augment: bool) -> list[int]:
    if not augment or n_views == 1:
        return [0] * n
    return [0 if rng.random() < 0.5 else int(rng.integers(n_views)) for _ in range(n)]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename): a reader never sees half a file."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def fit(cfg: FitConfig, console: Console | None = None) -> dict[str, Any]:
    """Train the head on the store at ``cfg.cache``; write the run folder ``cfg.out``; return metrics."""
    console = console or Console(stderr=True)
    if cfg.fusion not in FUSIONS:
        raise ValueError(f"--fusion must be one of {list(FUSIONS)}, got {cfg.fusion!r}")
    if cfg.epochs < 1 or cfg.batch_size < 1:
        raise ValueError("--epochs and --batch-size must be >= 1")
    store = FeatureStore.open(cfg.cache)
    if "train" not in store.splits():
        raise ValueError(f"store {store.path} has no train split (it has {store.splits()})")
    if cfg.model not in MODELS:
        raise ValueError(f"model must be one of {list(MODELS)}, got {cfg.model!r}")
    plain = cfg.model == "unet"
    blocks, steps = ((), ()) if plain else resolve_selection(store, cfg.blocks, cfg.steps)
    train_idx, val_split, val_idx = _split_train_val(store, cfg)
    budget = cfg.memory_budget_gb * GIB
    train = split_data(plain, store, "train", blocks, steps, train_idx, budget, cfg.attend_padding)
    val = split_data(plain, store, val_split, blocks, steps, val_idx, budget, cfg.attend_padding)
    size = store.size

    seed = cfg.subset_seed if cfg.seed is None else cfg.seed
    torch.manual_seed(seed)
    if plain:
        head = PlainUNet(width=cfg.width, depth=cfg.depth)
    else:
        head = TextDiffHead(in_channels=train.channels(), text_dim=int(store.attrs["token_dim"]), dim=cfg.dim,
                            head_channels=cfg.head_channels, fusion=cfg.fusion, shared_block=cfg.shared_block,
                            pos_enc=cfg.pos_enc, norm=cfg.norm)
    head.init_weights()
    optim = torch.optim.Adam(head.parameters(), lr=cfg.lr)
    milestones = [cfg.lr_drop_epoch] if cfg.lr_drop_epoch else []
    schedule = torch.optim.lr_scheduler.MultiStepLR(optim, milestones=milestones, gamma=0.1)
    rng = np.random.default_rng(seed)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INCOMPLETE).write_text("this fit has not finished; its files are not to be trusted\n")
    config = {"fit": cfg.to_json(), "head": head.config, "cache": store.location,
              "dataset": store.key["dataset"].get("name", ""), "size": size, "blocks": list(blocks),
              "steps": list(steps), "train_split": "train", "train_ids": train.ids,
              "val": {"split": val_split, "ids": val.ids}}
    write_json(out / "config.json", config)
    write_json(out / "cache_key.json", store.key)
    inputs = "images (plain U-Net)" if plain else f"blocks {list(blocks)} × steps {list(steps)}"
    console.print(f"fit: {len(train)} training images ({'in memory' if train.in_memory else 'streamed'}), "
                  f"validation on {len(val)} {val_split} images; {inputs}; "
                  f"{sum(p.numel() for p in head.parameters()):,} parameters")

    history: list[dict[str, float]] = []
    best: dict[str, Any] = {"val_dice": -1.0}
    progress = stage_progress(console, "fit", "epochs")
    with progress:
        task = progress.add_task("", total=cfg.epochs)
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            head.train()
            order = rng.permutation(len(train))
            losses = []
            for start in range(0, len(order), cfg.batch_size):
                rows = order[start:start + cfg.batch_size].tolist()
                sample = train.batch(rows, _views(rng, len(rows), train.views, cfg.augment))
                logits = head(sample.feats, sample.tokens, sample.token_mask, out_size=size)
                loss = segmentation_loss(logits, sample.target, dice_on_logits=cfg.dice_on_logits)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                losses.append(loss.item())
            schedule.step()
            scores = validate(head, val, size)
            row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_dice": scores["dice"],
                   "val_iou": scores["iou"], "seconds": round(time.perf_counter() - t0, 3)}
            history.append(row)
            if scores["dice"] > best["val_dice"]:
                best = {"val_dice": scores["dice"], "val_iou": scores["iou"], "epoch": epoch,
                        "state": copy.deepcopy(head.state_dict())}
            progress.update(task, advance=1, description=f"loss {row['train_loss']:.4f} · val Dice "
                            f"{scores['dice']:.4f} (best {best['val_dice']:.4f} @ {best['epoch']})")

    torch.save(best["state"], out / "head.pt")
    with (out / "history.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    metrics = {"best_epoch": best["epoch"], "best_val_dice": best["val_dice"], "best_val_iou": best["val_iou"],
               "final_train_loss": history[-1]["train_loss"], "n_train": len(train), "n_val": len(val),
               "val_split": val_split, "epochs": cfg.epochs, "cache_key_hash": key_hash(store.key),
               "seconds": round(sum(r["seconds"] for r in history), 2)}
    write_json(out / "metrics.json", metrics)
    loss_curve_png(out / "history.csv", out / "loss.png", title=f"fit {out.name}")
    (out / INCOMPLETE).unlink()
    return metrics


def split_data(plain: bool, store: FeatureStore, split: str, blocks: tuple[int, ...], steps: tuple[int, ...],
               indices: np.ndarray | None, budget: float, attend_padding: bool) -> SplitFeatures:
    """A split's rows as the model takes them: features for the TextDiff head, images for the plain U-Net."""
    if plain:
        return SplitImages(store, split, indices, budget)
    return SplitFeatures(store, split, blocks, steps, indices, budget, attend_padding)


def build_model(config: dict[str, Any]) -> TextDiffHead | PlainUNet:
    """The model a run's ``config.json`` describes (its ``head`` entry), untrained."""
    head = dict(config["head"])
    if head.pop("kind", None) == "plain-unet":
        return PlainUNet(**head)
    return TextDiffHead(**head)


def fit_finished(run: Path) -> bool:
    """A fit wrote every file (``metrics.json`` last) and its ``INCOMPLETE`` mark is gone."""
    return (Path(run) / "metrics.json").is_file() and not (Path(run) / INCOMPLETE).exists()


def load_run(run: Path, cache: Path | None = None) -> tuple[dict[str, Any], TextDiffHead | PlainUNet, FeatureStore]:
    """A finished run's config, its head (best weights, eval mode) and the store it was trained on."""
    run = Path(run)
    if (run / INCOMPLETE).exists():
        raise ValueError(f"run {run} is incomplete (its fit did not finish); fit it again")
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run / 'config.json'} not found: is {run} a `pipeline fit` run folder?")
    config = json.loads((run / "config.json").read_text())
    store = FeatureStore.open(cache or config["cache"])
    expected = json.loads((run / "cache_key.json").read_text())
    if key_hash(store.key) != key_hash(expected):
        raise CacheMismatchError(f"store {store.path} (key {key_hash(store.key)[:12]}) is not the one run {run} "
                                 f"was trained on (key {key_hash(expected)[:12]}); its features would not match")
    head = build_model(config)
    head.load_state_dict(torch.load(run / "head.pt", map_location="cpu", weights_only=True))
    return config, head.eval(), store
