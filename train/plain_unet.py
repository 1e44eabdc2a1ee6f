"""The plain U-Net baseline (``plain-unet``): the paper's comparison without diffusion features.

A U-Net (Ronneberger et al.; two 3×3 conv + BatchNorm + ReLU per level, max-pool down, transposed
conv up, skip concatenation) on the image alone, trained exactly as ``fit`` trains the TextDiff head:
the same store (so the same preprocessed images, the same splits and the same few-shot subset for a
seed), the same cached dihedral views as augmentation, the same loss (CE + 1.5 Dice), optimiser,
schedule and best-epoch choice on validation. ``evaluate`` scores it like any run.
Width 64 and depth 4 is the classic 31.0 M-parameter U-Net the paper compares against.
:func:`baseline_store` picks a dataset's store for it (any UNet's store will do: it reads images).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from cache.catalogue import StoreEntry

__all__ = ["NoStoreError", "PlainUNet", "baseline_store", "choose_store"]


class NoStoreError(ValueError):
    """No store in the cache folder can give the baseline its images."""


def choose_store(entries: list[StoreEntry]) -> StoreEntry | None:
    """The complete store to train on: one with cached dihedral views first, then the newest."""
    complete = [e for e in entries if e.complete]
    return max(complete, key=lambda e: (e.views > 1, e.modified, str(e.path)), default=None)


def baseline_store(cache_dir: Path | str, dataset: str, data_root: Path | str | None = None,
                   size: int | None = None) -> Path:
    """The store in ``cache_dir`` of ``dataset`` (from ``data_root`` at ``size`` px, where given) whose
    images are all written (:func:`choose_store`). Any UNet's store will do: the baseline reads images."""
    from cache.catalogue import matching_stores  # opens stores: only when asked to choose one

    chosen = choose_store(matching_stores(cache_dir, dataset, data_root=data_root, size=size))
    if chosen is None:
        root = str(Path(data_root).expanduser().resolve()) if data_root is not None else None
        where = "".join([f" from {root}" if root else "", f" at {size} px" if size else ""])
        raise NoStoreError(f"no complete store of {dataset}{where} in {cache_dir}: the baseline trains on a store's "
                           f"images, so that it sees exactly what `fit` sees; make one with `pipeline extract "
                           f"--dataset {dataset} ... --augment d4 --cache-dir {cache_dir}` (any UNet)")
    return chosen.path


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    """U-Net on RGB in [-1, 1] → class logits: ``model(image, out_size=None)``. ``config`` holds its
    constructor arguments (a run's ``config.json`` adds its class name: :meth:`train.models.ModelSpec.identity`)."""

    def __init__(self, width: int = 64, depth: int = 4, in_channels: int = 3, num_classes: int = 2):
        super().__init__()
        if width < 1 or depth < 1:
            raise ValueError(f"width and depth must be >= 1, got {width}, {depth}")
        self.config: dict[str, Any] = {"width": width, "depth": depth,
                                       "in_channels": in_channels, "num_classes": num_classes}
        chans = [width * 2 ** i for i in range(depth + 1)]
        self.inc = _double_conv(in_channels, chans[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), _double_conv(chans[i], chans[i + 1]))
                                  for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(_double_conv(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.out = nn.Conv2d(chans[0], num_classes, 1)

    def init_weights(self) -> None:
        """PyTorch's default initialisation (what the classic U-Net implementations use)."""

    def forward(self, image: torch.Tensor, out_size: int | None = None) -> torch.Tensor:
        """Logits (B, num_classes, S, S) for images (B, in_channels, S, S); ``out_size`` resizes them."""
        x = image
        size = x.shape[-1]
        if size % 2 ** len(self.down):
            raise ValueError(f"the plain U-Net needs a size divisible by {2 ** len(self.down)}, got {size}")
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([skips.pop(), up(y)], dim=1))
        logits = self.out(y)
        if out_size is not None and out_size != size:
            logits = nn.functional.interpolate(logits, size=(out_size, out_size), mode="bilinear", align_corners=False)
        return logits

