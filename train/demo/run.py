"""The demo (``pipeline demo``, ``make demo``): the main job on the embedded default, offline.

Synthetic data → pretrain a diffusion UNet → extract (MiniLM text) → fit the TextDiff head with and
without text → evaluate → ``OUT/report.md``. Every stage resumes: a rerun redoes only what is missing.
The report also shows what the pretrained UNet has learned where the features come from:
:func:`denoising_png` noises a test image to t = 50 / 150 / 250 with the store's own noise and
shows the x0 the UNet predicts from each x_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from train.runs import rundir
from train.config import DemoConfig, FitConfig
from train.evaluate import evaluate
from train.fit import fit
from train.demo.report import write_report

__all__ = ["DemoConfig", "demo_runs", "denoising_png", "run_demo"]

DENOISE_STEPS = (50, 150, 250)


def demo_runs(out: Path) -> dict[str, Path]:
    """The demo's two runs by name: with the text, and without."""
    return {"with text": Path(out) / "text", "no text": Path(out) / "no-text"}


@torch.no_grad()
def denoising_png(unet: torch.nn.Module, image: np.ndarray, noise: torch.Tensor, path: Path,
                  steps: Sequence[int] = DENOISE_STEPS) -> Path:
    """One row per step t: x_t (``image`` noised with ``noise``) | the UNet's x0 estimate from x_t
    (x0 = (x_t − sqrt(1−ᾱ_t)·ε̂) / sqrt(ᾱ_t), ε̂ its prediction) | the image. ``image``: uint8 (3, S, S)."""
    from extract.shared import to_unit_range
    from extract.diffusion import q_sample, sqrt_alphas_cumprod

    sqrt_ac, sqrt_1m = sqrt_alphas_cumprod()
    x0 = torch.from_numpy(to_unit_range(image[None])).float()
    rows = []
    for t in steps:
        tt = torch.tensor([int(t)])
        xt = q_sample(x0, tt, noise)
        eps = unet.eval()(xt, tt)[:, :3].float()
        x0_hat = ((xt - float(sqrt_1m[t]) * eps) / float(sqrt_ac[t])).clamp(-1, 1)
        rows.append(torch.cat([xt.clamp(-1, 1), x0_hat, x0], dim=3)[0])
    grid = ((torch.cat(rows, dim=1) + 1) * 127.5).round().byte().numpy().transpose(1, 2, 0)
    Image.fromarray(np.ascontiguousarray(grid)).save(path)
    return Path(path)


def _denoising_figure(store_path: Path, pre: Path, out: Path) -> Path:
    """:func:`denoising_png` for the first test image of the demo's store, with its UNet and noise."""
    from cache.store import FeatureStore
    from extract.checkpoints import resolve_unet
    from extract.diffusion import shared_noise

    store = FeatureStore.open(store_path)
    image = np.asarray(store.images("test")[0, 0].compute())
    noise = shared_noise(store.size, int(store.key["noise_seed"]))
    return denoising_png(resolve_unet(str(pre)).load(), image, noise, out / "denoising.png")


def run_demo(out: Path = DemoConfig.out, iterations: int = DemoConfig.iterations, epochs: int = DemoConfig.epochs,
             console: Console | None = None, size: int = 64) -> Path:
    """Run (or resume) the demo in ``out``; return its ``report.md``. ``size``: the images' (64 px)."""
    from extract.pretrain import PretrainConfig, pretrain
    from extract.run import ExtractConfig, run_extract

    console = console or Console(stderr=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pre = out / "pretrain"
    if not (pre / "model.pt").is_file() or not (pre / "samples.png").is_file():
        pretrain(PretrainConfig(dataset="synthetic", out=pre, size=size, iterations=iterations, batch_size=8,
                                resume=True), console=console)
    store = run_extract(ExtractConfig(dataset="synthetic", unet=str(pre), text_encoder="minilm", size=size,
                                      cache_dir=out / "cache"), console=console)
    runs = demo_runs(out)
    for name, run in runs.items():
        if not rundir.fit_finished(run):
            console.print(f"[bold]demo[/]: fit {name}")
            fit(FitConfig.flat(cache=store, out=run, epochs=epochs, dim=64,
                               fusion="cross-attn" if name == "with text" else "none"), console=console)
        if not rundir.evaluated(run, "test"):
            evaluate(run, console=console)
    if not (out / "denoising.png").is_file():
        _denoising_figure(store, pre, out)
    commands = [f"pipeline pretrain --dataset synthetic --size {size} --iterations {iterations} --batch-size 8 --out {pre}",
                f"pipeline extract --dataset synthetic --unet {pre} --text-encoder minilm --size {size} "
                f"--cache-dir {out / 'cache'}",
                f"pipeline fit --cache {store} --out {runs['with text']} --epochs {epochs} --dim 64",
                f"pipeline fit --cache {store} --out {runs['no text']} --epochs {epochs} --dim 64 --no-text",
                *(f"pipeline evaluate {run}" for run in runs.values())]
    return write_report(out, pre, runs, commands, store, denoising=out / "denoising.png", iterations=iterations)
