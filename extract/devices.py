"""Which device and precision a stage runs on: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, fp32 | bf16 | fp16.

Used by stage one (extract, pretrain) and stage two (fit, evaluate, predict) alike. A device that this
machine lacks is refused with one sentence naming what is missing, never a CUDA traceback.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from cache.errors import OptionError

__all__ = ["PRECISIONS", "autocast_dtype", "precision_context", "resolve_device"]

#: autocast dtypes by precision name (fp32: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names: ``auto`` (or None: CUDA when present, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N``. Raises :class:`cache.errors.OptionError` (keyword ``device``) for a device this machine lacks."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}", "device") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise OptionError(f"device {spec!r} is not supported: use auto, cpu, cuda or cuda:N", "device")
    if not torch.cuda.is_available():
        built = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise OptionError(f"device {spec!r}: no CUDA device is available here (torch {torch.__version__}, "
                          f"{built}); use device='cpu' or 'auto'", "device")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise OptionError(f"device {spec!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}",
                          "device")
    return device


def autocast_dtype(device: torch.device) -> torch.dtype:
    """Extraction's mixed precision (``extract --autocast``): bfloat16 on the CPU, float16 on a GPU."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def precision_context(device: torch.device, precision: str = "fp32") -> Any:
    """The autocast context of ``precision`` on ``device`` (fp32: none); refuses an unknown name."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}", "precision")
    dtype = PRECISIONS[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
