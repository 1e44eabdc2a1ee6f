"""The forward (noising) process of guided-diffusion: linear schedule, q_sample, the shared noise."""

from __future__ import annotations

import numpy as np
import torch

from extract.config import DEFAULT_SEED  # the authors' seed for the one shared noise tensor

NUM_TIMESTEPS = 1000


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


def shared_noise(size: int, seed: int = DEFAULT_SEED, channels: int = 3) -> torch.Tensor:
    """The one noise tensor (1, channels, size, size), drawn on the CPU from ``seed``, shared by all images and
    steps (a latent model's: its latent's channels and side).

    Drawn on the CPU so that the cache is the same on every device (the authors drew it on their GPU).
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(1, channels, size, size, generator=gen)


def spaced_timesteps(steps: int, num_timesteps: int = NUM_TIMESTEPS) -> np.ndarray:
    """``steps`` evenly spaced timesteps of 0..T-1, as guided-diffusion's ``space_timesteps(T, [steps])``."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"sampling steps must be in [1, {num_timesteps}], got {steps}")
    stride = (num_timesteps - 1) / max(steps - 1, 1)
    return np.array(sorted({round(i * stride) for i in range(steps)}), dtype=np.int64)


@torch.no_grad()
def p_sample_loop(model: torch.nn.Module, shape: tuple[int, ...], steps: int, generator: torch.Generator,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Ancestral sampling x_T → x_0 over respaced steps, ε-prediction, posterior variance β̃, x_0 clipped.

    Respacing follows guided-diffusion: ᾱ is kept at the chosen timesteps and the betas are rederived,
    the model sees the original timestep numbers.
    """
    ts = spaced_timesteps(steps)
    ac = np.cumprod(1.0 - linear_betas())[ts]
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    betas = 1.0 - ac / ac_prev
    x = torch.randn(shape, generator=generator).to(device)
    for i in reversed(range(len(ts))):
        t = torch.full((shape[0],), int(ts[i]), device=device, dtype=torch.long)
        eps = model(x, t)[:, :3]
        x0 = ((x - np.sqrt(1 - ac[i]) * eps) / np.sqrt(ac[i])).clamp(-1, 1)
        mean = (betas[i] * np.sqrt(ac_prev[i]) / (1 - ac[i])) * x0 + \
               ((1 - ac_prev[i]) * np.sqrt(1 - betas[i]) / (1 - ac[i])) * x
        if i == 0:
            return mean
        var = betas[i] * (1 - ac_prev[i]) / (1 - ac[i])
        x = mean + float(np.sqrt(var)) * torch.randn(shape, generator=generator).to(device)
    return x


def sample_grid(model: torch.nn.Module, n: int, size: int, steps: int, generator: torch.Generator,
                device: torch.device | str = "cpu") -> np.ndarray:
    """uint8 (rows·size, cols·size, 3): ``n`` samples tiled in a near-square grid."""
    imgs = p_sample_loop(model, (n, 3, size, size), steps, generator, device)
    imgs = ((imgs.clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy().transpose(0, 2, 3, 1)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * size, cols * size, 3), 255, np.uint8)
    for k, img in enumerate(imgs):
        r, c = divmod(k, cols)
        grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = img
    return grid
