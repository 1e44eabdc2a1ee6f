"""`pipeline pretrain`: train this project's ADM UNet on a dataset's unlabelled images (DDPM, ε-prediction).

The same :mod:`extract.unet` that loads OpenAI's checkpoints is trained with the standard DDPM
objective L_simple = ‖ε − ε_θ(x_t, t)‖² on images only — never masks, never the test split unless
asked. Images are resized to ``--size`` exactly as extraction does, then flipped / rotated by a random
dihedral view; with ``--crop C`` each training sample is a random C×C window of that image (cheaper
iterations, more variety; the UNet is convolutional, so extraction still runs at ``--size``). The EMA of the weights (``--ema``, with the usual warm-up ``min(ema, (1+k)/(10+k))`` so
that short CPU runs do not keep the random init) is written as ``model.pt`` in guided-diffusion's
state_dict format, with ``flags.json``: ``pipeline extract --unet DIR`` uses it.

Outputs: ``model.pt``, ``flags.json``, ``train_log.csv``, ``samples.png`` (ancestral sampling from
the EMA model), and ``state.pt`` (everything ``--resume`` needs, RNG states included, so
a resumed run is the same run; tensors and plain values only, loaded with ``weights_only=True``).
"""

from __future__ import annotations

import copy
import csv
import json
import pickle
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from common.errors import OptionError
from extract.config import PretrainConfig
from extract.datasets import open_dataset
from extract.diffusion import NUM_TIMESTEPS, q_sample, sample_grid
from common.atomic import atomic_write
from common.devices import resolve_device, synchronize
from extract.shared import dihedral, to_unit_range
from common.progress import stage_progress
from extract.unet import UNetModel, create_unet, normalize_flags, read_flags

#: flag presets for `--flags`: minutes on a 2-core CPU, about an hour on one GPU
PRETRAIN_PRESETS: dict[str, dict[str, Any]] = {
    # 12 output blocks like the fixture UNet: blocks 4 / 6 / 8 are 16 / 32 / 64 px at size 64
    "cpu-64": normalize_flags(image_size=64, num_channels=32, num_res_blocks=2, channel_mult="1,1,2,2",
                              attention_resolutions="16,8", num_head_channels=16, use_scale_shift_norm=True,
                              resblock_updown=True, learn_sigma=False),
    # ADM-256's layout at a quarter of its width: 18 output blocks, the paper's block indices apply
    "gpu-256": normalize_flags(image_size=256, num_channels=64, num_res_blocks=2, channel_mult="",
                               attention_resolutions="32,16,8", num_head_channels=64, use_scale_shift_norm=True,
                               resblock_updown=True, learn_sigma=False),
}
LOG_COLUMNS = ("iteration", "loss", "lr", "images_per_s", "seconds")

__all__ = ["PRETRAIN_PRESETS", "PretrainConfig", "load_images", "pretrain", "resolve_flags", "write_samples"]


def resolve_flags(spec: str) -> dict[str, Any]:
    """``flags``: a preset name or a JSON file."""
    if spec in PRETRAIN_PRESETS:
        return dict(PRETRAIN_PRESETS[spec])
    if Path(spec).is_file():
        return read_flags(spec)
    raise OptionError(f"flags {spec!r} is neither a preset ({', '.join(PRETRAIN_PRESETS)}) nor a JSON file", "flags")


def load_images(cfg: PretrainConfig) -> np.ndarray:
    """uint8 (N, 3, S, S): the chosen splits' images, preprocessed as extraction does; no masks read."""
    ds = open_dataset(cfg.dataset, cfg.data_root, splits=cfg.splits, **cfg.dataset_options)
    items = [it for split in cfg.splits for it in ds.by_split(split)]
    if not items:
        raise ValueError(f"no images in splits {list(cfg.splits)} of {cfg.dataset}")
    return np.stack([ds.load_image_uint8(it, cfg.size) for it in items])


def _ema_update(ema: UNetModel, model: UNetModel, rate: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(rate).add_(p.detach(), alpha=1 - rate)


def _batch(images: np.ndarray, rng: np.random.Generator, n: int, crop: int | None = None) -> torch.Tensor:
    """``n`` random images in random dihedral views, each a random ``crop``² window when asked."""
    idx = rng.integers(len(images), size=n)
    views = rng.integers(8, size=n)
    batch = [dihedral(images[i], int(v)) for i, v in zip(idx, views)]
    size = images.shape[-1]
    if crop is not None and crop < size:
        corners = rng.integers(size - crop + 1, size=(n, 2))
        batch = [b[:, y:y + crop, x:x + crop] for b, (y, x) in zip(batch, corners)]
    return torch.from_numpy(to_unit_range(np.stack(batch)))


def load_state(path: Path) -> dict[str, Any]:
    """The resumable state ``state.pt``: tensors and plain values only (``weights_only``: nothing in it can run
    code), on the CPU; the model and the optimiser move it to their device as they load it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        raise ValueError(f"{path}: holds {'a ' + why.group(1) if why else 'an object'}, not only tensors and "
                         f"plain values, so it is not loaded (it could run code); pretrain into a new output "
                         f"folder") from None


def _plain_rng_state(state: str | dict[str, Any]) -> dict[str, Any]:
    """numpy's bit-generator state as ``state.pt`` keeps it: a JSON string (older files: the plain dict)."""
    return json.loads(state) if isinstance(state, str) else state


def pretrain(cfg: PretrainConfig, console: Console | None = None) -> Path:
    """Train (or, with ``resume``, continue) and write the folder ``cfg.out``; returns it."""
    console = console or Console(stderr=True)
    out = Path(cfg.out)
    flags = resolve_flags(cfg.flags)
    if cfg.crop is not None and not 0 < cfg.crop <= cfg.size:
        raise OptionError(f"crop {cfg.crop} must be between 1 and size={cfg.size}", "crop", "size")
    train_size = cfg.crop or cfg.size
    with torch.device("meta"):
        for s in {cfg.size, train_size}:
            create_unet(**flags).output_block_shapes(s)  # refuses a size the UNet cannot take
    device = resolve_device(cfg.device)
    images = load_images(cfg)

    torch.manual_seed(cfg.seed)
    model = create_unet(**flags).to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    start = 0
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        state = load_state(state_path)
        if state["flags"] != flags or state["size"] != cfg.size or state.get("crop") != cfg.crop:
            raise OptionError(f"{state_path}: made with other flags, size or crop; pretrain into a new out=DIR", "out")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optim"])
        rng.bit_generator.state = _plain_rng_state(state["numpy_rng"])
        gen.set_state(state["torch_rng"])
        start = state["iteration"]
        console.print(f"pretrain: resuming {out} at iteration {start}")
    elif out.exists() and any(out.iterdir()) and not cfg.resume:
        raise OptionError(f"{out} is not empty: pass resume=True to continue it, or choose another out=DIR",
                          "out", "resume")
    out.mkdir(parents=True, exist_ok=True)
    (out / "flags.json").write_text(json.dumps(flags, indent=1) + "\n")
    log_path = out / "train_log.csv"
    if start == 0:
        log_path.write_text(",".join(LOG_COLUMNS) + "\n")
    crop_note = f" in random {cfg.crop}px crops" if cfg.crop else ""
    console.print(f"pretrain: {len(images)} images ({', '.join(cfg.splits)}) at {cfg.size}px{crop_note}, "
                  f"{sum(p.numel() for p in model.parameters()):,} parameters, {device}")

    def checkpoint(iteration: int) -> None:
        state = {"model": model.state_dict(), "ema": ema.state_dict(), "optim": optim.state_dict(),
                 "numpy_rng": json.dumps(rng.bit_generator.state), "torch_rng": gen.get_state(),
                 "iteration": iteration, "flags": flags, "size": cfg.size, "crop": cfg.crop}
        atomic_write(state_path, lambda tmp: torch.save(state, tmp))
        atomic_write(out / "model.pt", lambda tmp: torch.save(ema.state_dict(), tmp))

    model.train()
    progress = stage_progress(console, "pretrain", "iterations")
    rows: list[list[Any]] = []
    with progress:
        task = progress.add_task("", total=cfg.iterations, completed=start)
        for it in range(start, cfg.iterations):
            t0 = time.perf_counter()
            loss = _step(model, ema, optim, _batch(images, rng, cfg.batch_size, cfg.crop).to(device), gen,
                         min(cfg.ema, (1 + it) / (10 + it)))
            synchronize(device)  # the iteration's work, not its queueing
            dt = time.perf_counter() - t0
            rows.append([it + 1, f"{loss.item():.6f}", cfg.lr, f"{cfg.batch_size / dt:.2f}", f"{dt:.4f}"])
            progress.update(task, advance=1, description=f"loss {loss.item():.4f} · {1 / dt:.2f} it/s")
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                with log_path.open("a", newline="") as f:
                    csv.writer(f).writerows(rows)
                rows = []
                checkpoint(it + 1)
    if start >= cfg.iterations and not (out / "model.pt").is_file():
        checkpoint(start)
    if cfg.samples:
        write_samples(ema, cfg, out, device)
    return out


def _step(model: UNetModel, ema: UNetModel, optim: torch.optim.Optimizer, x0: torch.Tensor,
          gen: torch.Generator, decay: float) -> torch.Tensor:
    """One DDPM step on the batch ``x0``: a random step and noise from ``gen``, the ε loss, AdamW, the EMA."""
    device = x0.device
    t = torch.randint(0, NUM_TIMESTEPS, (x0.shape[0],), generator=gen).to(device)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    eps = model(q_sample(x0, t, noise), t)[:, :3]
    loss = F.mse_loss(eps, noise)
    optim.zero_grad(set_to_none=True)
    loss.backward()
    optim.step()
    _ema_update(ema, model, decay)
    return loss


def write_samples(model: UNetModel, cfg: PretrainConfig, out: Path, device: torch.device) -> Path:
    """``samples.png``: a grid of images drawn from ``model`` by respaced ancestral sampling."""
    from PIL import Image

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    grid = sample_grid(model.eval(), cfg.samples, cfg.crop or cfg.size, cfg.sample_steps, gen, device)
    Image.fromarray(grid).save(out / "samples.png")
    return out / "samples.png"
