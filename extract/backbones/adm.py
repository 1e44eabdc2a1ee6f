"""This project's guided-diffusion (ADM) UNet as a :class:`~extract.backbones.base.Backbone`: its units are
``output_blocks``, its forward process guided-diffusion's linear schedule (:func:`extract.diffusion.q_sample`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from extract.backbones.base import Backbone
from extract.diffusion import q_sample
from extract.unet import UNetModel


class AdmBackbone(Backbone):
    """A :class:`~extract.unet.UNetModel`; it stops after a unit itself (``stop_after``), so its features are the
    same arithmetic as before backbones were pluggable."""

    kind = "adm"

    def __init__(self, unet: UNetModel):
        self.module = unet

    @property
    def unet(self) -> UNetModel:
        return self.module  # type: ignore[return-value]

    @property  # type: ignore[override]
    def noise_channels(self) -> int:
        return int(self.unet.input_blocks[0][0].in_channels)

    def named_units(self) -> list[tuple[str, nn.Module]]:
        return [(f"output_blocks.{k}", m) for k, m in enumerate(self.unet.output_blocks)]

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return q_sample(z0, t, noise)

    def run(self, zt: torch.Tensor, t: torch.Tensor, stop_after: int, texts: Sequence[str] | None = None) -> None:
        self.unet(zt, t, stop_after=stop_after)

    def block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        return self.unet.output_block_shapes(size)


def as_backbone(model: UNetModel | Backbone) -> Backbone:
    """A backbone as is; an ADM ``UNetModel`` wrapped."""
    return model if isinstance(model, Backbone) else AdmBackbone(model)
