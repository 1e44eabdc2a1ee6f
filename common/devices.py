"""Which device and precision a stage runs on: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``, fp32 | bf16 | fp16.

Used by stage one (extract, pretrain) and stage two (fit, evaluate, predict) alike. A device that this
machine lacks is refused with one sentence naming what is missing, never a CUDA traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from typing import Any

import torch

from common.errors import OptionError

__all__ = ["PRECISIONS", "autocast_device", "autocast_dtype", "compute_dtype", "deterministic_kernels",
           "keep_freed_memory", "precision_context", "resolve_device"]

#: autocast dtypes by precision name (fp32: no autocast)
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _INT_MAX = -1, -3, 2**31 - 1
_kept: bool | None = None


def set_malloc_thresholds(mmap: int, trim: int) -> bool:
    """The one way textdiff tunes glibc's malloc: its mmap and trim thresholds, in bytes (``mallopt``); True if
    both took (False: a libc other than glibc, which is left as it is)."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap)) and bool(mallopt(_M_TRIM_THRESHOLD, trim))


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks for reuse (once per process; True if in effect).

    By default every tensor over 32 MiB is a fresh ``mmap`` that the kernel zero-fills page by page
    on first touch and takes back on free: the head's full-resolution activations (200 MB each at
    768 × 256²) pay that at every step, and a training step spends up to a third of its time in page
    faults. Raising the mmap and trim thresholds to 2 GiB serves them from the heap instead, as
    PyTorch's caching allocator does on a GPU; the process keeps its peak memory until it ends.
    ``TEXTDIFF_MALLOC=system`` (or a libc other than glibc) keeps the default.
    """
    global _kept
    if _kept is None:
        _kept = os.environ.get("TEXTDIFF_MALLOC", "").lower() != "system" and \
            set_malloc_thresholds(_INT_MAX, _INT_MAX)
    return _kept


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names: ``auto`` (or None: CUDA when present, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N``. Raises :class:`common.errors.OptionError` (keyword ``device``) for a device this machine lacks.
    Work on the CPU gets :func:`keep_freed_memory`."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise OptionError(f"device must be auto, cpu, cuda or cuda:N, got {spec!r}", "device") from None
    if device.type == "cpu":
        keep_freed_memory()
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


def compute_dtype(device: torch.device, autocast: bool) -> str:
    """The ``compute_dtype`` of a store's key: float32, or with ``autocast`` :func:`autocast_dtype`'s name."""
    return str(autocast_dtype(device)).removeprefix("torch.") if autocast else "float32"


def autocast_device(dtype: str) -> str | None:
    """The device type whose ``--autocast`` computes in ``dtype`` (a key's ``compute_dtype``); None: no autocast."""
    return next((d for d in ("cpu", "cuda") if dtype != "float32" and compute_dtype(torch.device(d), True) == dtype),
                None)


def precision_context(device: torch.device, precision: str = "fp32") -> Any:
    """The context of ``precision`` on ``device``: fp32 is full float32 (:func:`full_precision`: no TF32 on a
    GPU), bf16 / fp16 autocast; refuses an unknown name."""
    if precision not in PRECISIONS:
        raise OptionError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}", "precision")
    dtype = PRECISIONS[precision]
    return full_precision(device) if dtype is None else torch.autocast(device.type, dtype=dtype)


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype a store's key names (``compute_dtype``: float32, bfloat16, float16)."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


@contextlib.contextmanager
def full_precision(device: torch.device) -> Any:
    """Float32 matmuls and convolutions at full precision within it: on CUDA no TF32 (torch lets cuDNN's
    convolutions use it by default, which rounds their inputs to 10 mantissa bits); the settings are restored on
    leaving it. On a CPU nothing to do (and no CUDA state touched)."""
    if device.type != "cuda":
        yield
        return
    backends = torch.backends
    if hasattr(getattr(backends.cudnn, "conv", None), "fp32_precision"):  # torch >= 2.9: one API, not both
        flags = [(backends.cuda.matmul, "fp32_precision", "ieee"), (backends.cudnn.conv, "fp32_precision", "ieee")]
    else:
        flags = [(backends.cuda.matmul, "allow_tf32", False), (backends.cudnn, "allow_tf32", False)]
    before = [getattr(owner, name) for owner, name, _ in flags]
    for owner, name, value in flags:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(flags, before):
            setattr(owner, name, value)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Any:
    """Within it, on CUDA, the deterministic kernels torch has (cuDNN's, cuBLAS's with a fixed workspace) with
    ``device`` the current CUDA device; the rest (e.g. the backward of bilinear upsampling, which adds
    atomically) run with a warning, not an error. Every setting is restored on leaving it. On a CPU it does
    nothing and touches no CUDA state (CPU kernels are deterministic at a fixed thread count)."""
    if device.type != "cuda":
        yield
        return
    env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.cuda.device(device):
            yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[0], before[1]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
        if env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = env


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA runs asynchronously; a timer read without this measures the
    queueing, not the work); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpuinfo_line(name: str) -> str | None:
    """The value of the first ``name`` line of /proc/cpuinfo (None where there is none, or no such file)."""
    try:
        lines = open("/proc/cpuinfo", encoding="utf-8").read().splitlines()
    except OSError:
        return None
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(name)), None)


def cpu_model() -> str:
    """The CPU's model as /proc/cpuinfo names it (else the platform's processor, else "unknown")."""
    return _cpuinfo_line("model name") or platform.processor() or "unknown"


def cpu_identity() -> str:
    """The CPU model with its widest vector extension (its kernels round by it: one store computed on two CPU kinds
    differs in a few float16 features)."""
    flags = (_cpuinfo_line("flags") or "").split()
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no avx")
    return f"{cpu_model()} ({widest})"
