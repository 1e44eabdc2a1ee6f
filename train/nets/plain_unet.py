"""The plain U-Net baseline (``plain-unet``): the paper's comparison without diffusion features.

A U-Net (Ronneberger et al.; two 3×3 conv + BatchNorm + ReLU per level, max-pool down, transposed
conv up, skip concatenation) on the image alone, trained exactly as ``fit`` trains the TextDiff head:
the same store (so the same preprocessed images, the same splits and the same few-shot subset for a
seed), the same cached dihedral views as augmentation, the same loss (CE + 1.5 Dice), optimiser,
schedule and best-epoch choice on validation. ``evaluate`` scores it like any run.
Width 64 and depth 4 is the classic 31.0 M-parameter U-Net the paper compares against.
:func:`train.data.stores.baseline_store` picks a dataset's store for it (any UNet's store will do).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["PlainUNet"]


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PlainUNet(nn.Module):
    """U-Net on RGB in [-1, 1] → class logits: ``model(image, out_size=None)``. ``config`` holds its
    constructor arguments (a run's ``config.json`` adds its class name: :meth:`train.registry.ModelSpec.identity`)."""

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

