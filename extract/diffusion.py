"""The forward (noising) process of guided-diffusion: linear schedule, q_sample, the shared noise."""

from __future__ import annotations

import numpy as np
import torch

NUM_TIMESTEPS = 1000
DEFAULT_SEED = 40  # the authors' seed for the one shared noise tensor


def linear_betas(num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """guided-diffusion's "linear" schedule in float64 (1e-4 .. 0.02 for 1000 steps)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def sqrt_alphas_cumprod(num_timesteps: int = NUM_TIMESTEPS) -> tuple[np.ndarray, np.ndarray]:
    """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) in float64."""
    alphas_cumprod = np.cumprod(1.0 - linear_betas(num_timesteps))
    return np.sqrt(alphas_cumprod), np.sqrt(1.0 - alphas_cumprod)


_SQRT_AC, _SQRT_1M_AC = sqrt_alphas_cumprod()


def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t)·x0 + sqrt(1−ᾱ_t)·ε, coefficients cast to float32 as guided-diffusion does.

    ``t`` holds one timestep per row of ``x0``; ``noise`` broadcasts against ``x0``.
    """
    idx = t.detach().cpu().long().numpy()
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a = torch.from_numpy(_SQRT_AC[idx]).float().to(x0.device).view(shape)
    b = torch.from_numpy(_SQRT_1M_AC[idx]).float().to(x0.device).view(shape)
    return a * x0 + b * noise


def shared_noise(size: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The one noise tensor (1, 3, size, size), drawn on the CPU from ``seed``, shared by all images and steps.

    Drawn on the CPU so that the cache is the same on every device (the authors drew it on their GPU).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=gen)
