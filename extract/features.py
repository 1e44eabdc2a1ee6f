"""The frozen feature extractor: noised images through the UNet, decoder activations by forward hooks.

For each image x0 and step t: x_t = q_sample(x0, t, ε) with the one shared ε, one forward pass,
and the outputs of the chosen ``output_blocks`` kept by hooks. The pass stops after the deepest
chosen block (no later blocks, no output head). Images × steps go through the UNet as one batch.
Shapes (256 px, ImageNet ADM): block 6 → (512, 32, 32), 8 → (512, 64, 64), 12 → (256, 128, 128), ...
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from common.devices import autocast_dtype, full_precision, resolve_device
from extract.diffusion import q_sample
from extract.unet import UNetModel


class FeatureExtractor:
    """Runs a frozen UNet (``eval``, ``no_grad``) and returns chosen decoder activations."""

    def __init__(self, unet: UNetModel, noise: torch.Tensor, *, device: torch.device | str | None = None,
                 autocast: bool = False, compute_dtype: torch.dtype | None = None):
        """``compute_dtype``: the forward's, as a store's key names it (float32 at full precision, or bfloat16 /
        float16 autocast), whatever this device's default; None: ``autocast``'s choice for the device
        (:func:`common.devices.autocast_dtype`), else float32."""
        self.device = resolve_device(device)
        self.unet = unet.eval().requires_grad_(False).to(self.device)
        self.noise = noise.to(self.device)
        if compute_dtype is None:
            compute_dtype = autocast_dtype(self.device) if autocast else torch.float32
        self.compute_dtype = compute_dtype
        self.autocast = compute_dtype != torch.float32

    def block_shapes(self) -> list[tuple[int, int, int]]:
        """(C, h, w) of each ``output_blocks[k]`` for this extractor's input size."""
        return self.unet.output_block_shapes(self.noise.shape[-1])

    @torch.no_grad()
    def samples(self, x0: torch.Tensor, t: torch.Tensor, blocks: Sequence[int], pad_to: int | None = None,
                dtype: torch.dtype = torch.float32) -> dict[int, torch.Tensor]:
        """{block: CPU tensor (N, C, h, w)} for N samples x0 (N, 3, S, S) at steps t (N,), in ``dtype``:
        float32, or float16 rounded from float32 on the device (the store's rounding: half the bytes to copy).

        With ``pad_to``, the batch is zero-padded to that many samples: every forward pass then has
        the same shape, which makes each sample's result bitwise independent of its batch neighbours.
        """
        n_blocks = len(self.unet.output_blocks)
        bad = [b for b in blocks if not 0 <= b < n_blocks]
        if bad:
            raise ValueError(f"blocks {bad} out of range: this UNet has output_blocks 0..{n_blocks - 1}")
        n = x0.shape[0]
        x0 = x0.to(self.device, torch.float32)
        t = t.to(self.device)
        if pad_to is not None and n < pad_to:
            x0 = torch.cat([x0, x0.new_zeros((pad_to - n, *x0.shape[1:]))])
            t = torch.cat([t, t.new_zeros(pad_to - n)])
        xt = q_sample(x0, t, self.noise)
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.unet.output_blocks[k].register_forward_hook(
            lambda _m, _i, out, k=k: captured.__setitem__(k, out)) for k in set(blocks)]
        ctx = (torch.autocast(self.device.type, dtype=self.compute_dtype) if self.autocast
               else full_precision(self.device))
        try:
            with ctx:
                self.unet(xt, t, stop_after=max(blocks))
        finally:
            for h in hooks:
                h.remove()
        return {k: captured[k][:n].float().to(dtype).cpu() for k in blocks}

    def __call__(self, x0: torch.Tensor, steps: Sequence[int], blocks: Sequence[int]
                 ) -> dict[tuple[int, int], torch.Tensor]:
        """{(step, block): float32 CPU tensor (B, C, h, w)} for images x0 (B, 3, S, S), all steps in one batch."""
        if not steps or not blocks:
            return {}
        b = x0.shape[0]
        t = torch.tensor([s for s in steps for _ in range(b)])
        out = self.samples(x0.repeat(len(steps), 1, 1, 1), t, blocks)
        return {(s, k): out[k][i * b:(i + 1) * b] for i, s in enumerate(steps) for k in blocks}
