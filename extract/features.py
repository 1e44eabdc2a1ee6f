"""The frozen feature extractor: noised images through the UNet, decoder activations by forward hooks.

For each image x0 and step t: x_t = q_sample(x0, t, ε) with the one shared ε, one forward pass,
and the outputs of the chosen decoder units (ADM's ``output_blocks``) kept by hooks. The pass stops after
the deepest chosen block (no later blocks, no output head). Images × steps go through the UNet as one batch.
Any :class:`~extract.backbones.Backbone` runs the same way: a latent model encodes x0 first (its VAE), and
noises with its own scheduler. Shapes (256 px, ImageNet ADM): block 6 → (512, 32, 32), 8 → (512, 64, 64), ...
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch

from common.devices import autocast_dtype, full_precision, resolve_device
from extract.backbones import Backbone, as_backbone, unit_tensor
from extract.diffusion import shared_noise
from extract.unet import UNetModel


class FeatureExtractor:
    """Runs a frozen UNet (``eval``, ``no_grad``) and returns chosen decoder activations."""

    def __init__(self, unet: UNetModel | Backbone, noise: torch.Tensor, *, device: torch.device | str | None = None,
                 autocast: bool = False, compute_dtype: torch.dtype | None = None):
        """``unet``: an ADM ``UNetModel`` or any backbone; ``noise``: the one shared noise tensor (1, C, s, s) of the
        space it denoises (:meth:`~extract.backbones.Backbone.noise_size`). ``compute_dtype``: the forward's, as a
        store's key names it (float32 at full precision, or bfloat16 / float16 autocast), whatever this device's
        default; None: ``autocast``'s choice for the device (:func:`common.devices.autocast_dtype`), else float32."""
        self.device = resolve_device(device)
        self.backbone = as_backbone(unet).to(self.device)
        self.noise = noise.to(self.device)
        if compute_dtype is None:
            compute_dtype = autocast_dtype(self.device) if autocast else torch.float32
        self.compute_dtype = compute_dtype
        self.autocast = compute_dtype != torch.float32

    @classmethod
    def for_model(cls, unet: UNetModel | Backbone, size: int, seed: int, **kw: Any) -> FeatureExtractor:
        """An extractor for ``size`` px images with the one noise tensor of ``seed`` in the backbone's space."""
        backbone = as_backbone(unet)
        noise = shared_noise(backbone.noise_size(size), seed, channels=backbone.noise_channels)
        return cls(backbone, noise, **kw)

    @property
    def unet(self) -> torch.nn.Module:
        """The backbone's network (for an ADM backbone, its ``UNetModel``)."""
        return self.backbone.module

    @property
    def size(self) -> int:
        """The image side this extractor's noise is for."""
        return self.noise.shape[-1] * self.backbone.scale

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(C, h, w) of each decoder unit for this extractor's input size."""
        return self.backbone.block_shapes(self.size)

    def _precision(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device.type, dtype=self.compute_dtype) if self.autocast
                else full_precision(self.device))

    @torch.no_grad()
    def samples(self, x0: torch.Tensor, t: torch.Tensor, blocks: Sequence[int], pad_to: int | None = None,
                dtype: torch.dtype = torch.float32, texts: Sequence[str] | None = None) -> dict[int, torch.Tensor]:
        """{block: CPU tensor (N, C, h, w)} for N samples x0 (N, 3, S, S) at steps t (N,), in ``dtype``:
        float32, or float16 rounded from float32 on the device (the store's rounding: half the bytes to copy).
        ``texts``: each sample's text, for a backbone conditioned on it (:attr:`Backbone.reads_text`).

        With ``pad_to``, the batch is zero-padded to that many samples: every forward pass then has
        the same shape, which makes each sample's result bitwise independent of its batch neighbours.
        """
        units = self.backbone.units()
        bad = [b for b in blocks if not 0 <= b < len(units)]
        if bad:
            raise ValueError(f"blocks {bad} out of range: this UNet has blocks 0..{len(units) - 1}")
        n = x0.shape[0]
        if self.backbone.reads_text and (texts is None or len(texts) != n):
            raise ValueError(f"this {self.backbone.kind} backbone is conditioned on each image's text: pass {n} texts")
        x0 = x0.to(self.device, torch.float32)
        t = t.to(self.device)
        if pad_to is not None and n < pad_to:
            x0 = torch.cat([x0, x0.new_zeros((pad_to - n, *x0.shape[1:]))])
            t = torch.cat([t, t.new_zeros(pad_to - n)])
            texts = None if texts is None else [*texts, *[""] * (pad_to - n)]
        captured: dict[int, torch.Tensor] = {}
        hooks = [units[k].register_forward_hook(
            lambda _m, _i, out, k=k: captured.__setitem__(k, unit_tensor(out))) for k in set(blocks)]
        try:
            with self._precision():
                z0 = self.backbone.encode(x0).float()
            zt = self.backbone.q_sample(z0, t, self.noise)  # in float32, outside autocast
            with self._precision():
                self.backbone.run(zt, t, max(blocks), texts)
        finally:
            for h in hooks:
                h.remove()
        return {k: captured[k][:n].float().to(dtype).cpu() for k in blocks}

    def __call__(self, x0: torch.Tensor, steps: Sequence[int], blocks: Sequence[int],
                 texts: Sequence[str] | None = None) -> dict[tuple[int, int], torch.Tensor]:
        """{(step, block): float32 CPU tensor (B, C, h, w)} for images x0 (B, 3, S, S) (and their ``texts``, for a
        backbone conditioned on them), all steps in one batch."""
        if not steps or not blocks:
            return {}
        b = x0.shape[0]
        t = torch.tensor([s for s in steps for _ in range(b)])
        out = self.samples(x0.repeat(len(steps), 1, 1, 1), t, blocks,
                           texts=None if texts is None else list(texts) * len(steps))
        return {(s, k): out[k][i * b:(i + 1) * b] for i, s in enumerate(steps) for k in blocks}
