"""What a diffusion backbone gives stage one: hookable decoder units in a documented order, its own forward
(noising) process, and (for latent models) an encoder from pixels to the space it denoises.

:class:`Backbone` is the one interface :class:`extract.features.FeatureExtractor` runs: ADM (this project's
UNet), diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (with a VAE) and MONAI ``DiffusionModelUNet`` each
implement it. A *unit* is one decoder layer, numbered like ADM's ``output_blocks``: up-block by up-block, layer by
layer, a unit's output is its resnet's (or, where the layer has one, its attention's), and on an up-block's last
layer the output of the block's upsampler when it has one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised by a hook after the deepest unit a forward needs: nothing later runs."""


def unit_tensor(out: Any) -> torch.Tensor:
    """A hooked module's output as one tensor: diffusers' transformer blocks return a tuple or an output object."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"a hooked decoder unit returned {type(out).__name__}, not a tensor")


def decoder_units(up_blocks: Sequence[nn.Module], upsampler: Callable[[nn.Module], nn.Module | None],
                  prefix: str = "up_blocks") -> list[tuple[str, nn.Module]]:
    """(name, module) of each decoder unit of diffusers- or MONAI-style ``up_blocks`` (each with ``resnets``, maybe
    ``attentions``, and an upsampler that ``upsampler(block)`` returns or None), in the documented order."""
    units: list[tuple[str, nn.Module]] = []
    for i, block in enumerate(up_blocks):
        attentions = getattr(block, "attentions", None)
        n = len(block.resnets)
        up = upsampler(block)
        for j in range(n):
            if j == n - 1 and up is not None:
                name = f"{prefix}.{i}.upsampler"
                units.append((name, up))
            elif attentions is not None and len(attentions) == n:
                units.append((f"{prefix}.{i}.attentions.{j}", attentions[j]))
            else:
                units.append((f"{prefix}.{i}.resnets.{j}", block.resnets[j]))
    return units


def block_table(backbone: Backbone, size: int) -> list[tuple[int, str, tuple[int, int, int]]]:
    """(index, name, (C, h, w)) of every hookable unit for a ``size`` px image: what ``--list-blocks`` prints."""
    return [(k, name, shape) for k, ((name, _), shape) in
            enumerate(zip(backbone.named_units(), backbone.block_shapes(size)))]


class Backbone:
    """A frozen diffusion UNet as stage one uses it. Subclasses set ``kind``, ``module`` (the ``nn.Module`` moved to
    the device), ``scale`` (image pixels per noise pixel: 1, or a VAE's factor) and ``noise_channels``, and implement
    :meth:`named_units`, :meth:`q_sample` and :meth:`_denoise` (and :meth:`encode` for a latent model)."""

    kind: str = ""
    scale: int = 1
    noise_channels: int = 3
    #: True when each sample's own text conditions the forward (``texts`` must be passed)
    reads_text: bool = False
    module: nn.Module

    def named_units(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def units(self) -> list[nn.Module]:
        return [m for _, m in self.named_units()]

    def to(self, device: torch.device | str) -> Backbone:
        self.module = self.module.eval().requires_grad_(False).to(device)
        return self

    def noise_size(self, size: int) -> int:
        """The side of the space a ``size`` px image is denoised in."""
        if size % self.scale:
            raise ValueError(f"input size {size} must be divisible by {self.scale} for this {self.kind} model")
        return size // self.scale

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images (N, 3, S, S) in [-1, 1] → what the UNet denoises (pixel models: the images)."""
        return x0

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _denoise(self, zt: torch.Tensor, t: torch.Tensor, texts: Sequence[str] | None) -> None:
        raise NotImplementedError

    def run(self, zt: torch.Tensor, t: torch.Tensor, stop_after: int, texts: Sequence[str] | None = None) -> None:
        """One forward whose decoder stops after unit ``stop_after`` (hooks registered before this see every unit
        up to it)."""
        def stop(_m: nn.Module, _i: Any, _o: Any) -> None:
            raise _Stop
        handle = self.units()[stop_after].register_forward_hook(stop)
        try:
            self._denoise(zt, t, texts)
        except _Stop:
            pass
        finally:
            handle.remove()

    def meta_copy(self) -> Backbone:
        """The same network on the meta device (shapes without arithmetic or weights)."""
        raise NotImplementedError

    def block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        """(C, h, w) of each unit's output for a ``size`` px image: one forward of :meth:`meta_copy` on meta
        tensors of the noise's shape."""
        side = self.noise_size(size)
        with torch.device("meta"):
            copy = self.meta_copy()
            shapes: dict[int, tuple[int, int, int]] = {}
            units = copy.units()
            hooks = [u.register_forward_hook(lambda _m, _i, out, k=k: shapes.__setitem__(
                k, tuple(unit_tensor(out).shape[1:]))) for k, u in enumerate(units)]
            try:
                copy._denoise(torch.zeros(1, copy.noise_channels, side, side), torch.zeros(1, dtype=torch.long),
                              [""] if copy.reads_text else None)
            finally:
                for h in hooks:
                    h.remove()
        return [shapes[k] for k in range(len(units))]
