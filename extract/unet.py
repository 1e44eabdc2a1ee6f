"""The guided-diffusion (ADM) UNet, written to load OpenAI's official checkpoints unchanged.

Module names, parameter shapes and the arithmetic follow ``guided_diffusion/unet.py`` and ``nn.py``
(Dhariwal & Nichol, 2021), so ``model.state_dict()`` has exactly the keys of the public ``*.pt``
files. Shapes for the 256x256 unconditional model (``output_blocks``) are in the design doc.

Two attention implementations compute the same function: ``"reference"`` is the original einsum
with q and k each scaled by ``ch ** -0.25`` and a float32 softmax; ``"sdpa"`` (default) is
``torch.nn.functional.scaled_dot_product_attention`` on the same q, k, v (scale ``ch ** -0.5``),
which is faster and lighter on memory. Both reproduce the reference fixtures to < 1e-5.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.statedict import mismatch

NUM_CLASSES = 1000

#: guided-diffusion's ``model_and_diffusion_defaults()`` (model part): missing flags take these.
DEFAULT_FLAGS: dict[str, Any] = {
    "image_size": 64,
    "num_channels": 128,
    "num_res_blocks": 2,
    "channel_mult": "",
    "learn_sigma": False,
    "class_cond": False,
    "attention_resolutions": "16,8",
    "num_heads": 4,
    "num_head_channels": -1,
    "num_heads_upsample": -1,
    "use_scale_shift_norm": True,
    "dropout": 0.0,
    "resblock_updown": False,
    "use_new_attention_order": False,
    "use_fp16": False,
    "use_checkpoint": False,
}

ATTENTION_IMPLS = ("sdpa", "reference")


# --------------------------------------------------------------------------- building blocks


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back, as guided-diffusion's ``nn.GroupNorm32``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embeddings ``[cos, sin]`` of (unscaled) timesteps, shape (N, dim)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half
    ).to(device=timesteps.device)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes ``emb`` to the children that take it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest 2x upsampling, optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 conv or by average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.channels != self.out_channels:
                raise ValueError("average-pool downsampling cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (optionally up/down-sampling)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = self.h_upd(in_rest(x))
            x = self.x_upd(x)
            h = in_conv(h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """Attention over (B*heads, ch, T) tensors, returning (B*heads, ch, T)."""
    ch = q.shape[1]
    if impl == "reference":
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


class QKVAttentionLegacy(nn.Module):
    """Legacy order (the public checkpoints'): split heads first, then q, k, v."""

    def __init__(self, n_heads: int, impl: str = "sdpa"):
        super().__init__()
        self.n_heads = n_heads
        self.impl = impl

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        bs, _, length = qkv.shape
        return qkv.reshape(bs * self.n_heads, ch * 3, length).split(ch, dim=1)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        bs, width, length = qkv.shape
        q, k, v = self.split(qkv, width // (3 * self.n_heads))
        return _attend(q, k, v, self.impl).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """New order (``use_new_attention_order``): split q, k, v first, then heads."""

    def split(self, qkv: torch.Tensor, ch: int) -> tuple[torch.Tensor, ...]:
        bs, _, length = qkv.shape
        return tuple(t.reshape(bs * self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))


class AttentionBlock(nn.Module):
    """Spatial self-attention; ``num_head_channels`` (if not -1) overrides ``num_heads``."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        attention_impl: str = "sdpa",
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        attention_cls = QKVAttention if use_new_attention_order else QKVAttentionLegacy
        self.attention = attention_cls(self.num_heads, attention_impl)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


# --------------------------------------------------------------------------- the model


class UNetModel(nn.Module):
    """guided-diffusion's UNetModel (2-D). ``forward(x, timesteps, y=None)`` as the original.

    ``forward(..., stop_after=k)`` runs the decoder only up to ``output_blocks[k]`` and returns its
    output (no later blocks, no output head): the truncated pass used for feature extraction.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        attention_impl: str = "sdpa",
    ):
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        self.dtype = torch.float16 if use_fp16 else torch.float32
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        def res(ch_in: int, ch_out: int, **kw: bool) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, out_channels=ch_out,
                            use_scale_shift_norm=use_scale_shift_norm, **kw)

        def attn(ch_: int, heads: int) -> AttentionBlock:
            return AttentionBlock(ch_, num_heads=heads, num_head_channels=num_head_channels,
                                  use_new_attention_order=use_new_attention_order,
                                  attention_impl=attention_impl)

        ch = input_ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        input_block_chans = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                input_block_chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res(ch, ch), attn(ch, num_heads), res(ch, ch))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                ich = input_block_chans.pop()
                layers = [res(ch + ich, int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(attn(ch, num_heads_upsample))
                if level and i == num_res_blocks:
                    layers.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        if use_fp16:
            self.convert_to_fp16()

    def output_block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        """(channels, height, width) of every ``output_blocks[k]`` output for a size x size input."""
        factor = 2 ** (self.num_levels - 1)
        if size % factor:
            raise ValueError(f"input size {size} must be divisible by {factor} for this UNet")
        res = size // factor
        shapes = []
        for block in self.output_blocks:
            channels = block[0].out_channels
            last = block[-1]
            if isinstance(last, Upsample) or (isinstance(last, ResBlock) and last.updown):
                res *= 2
            shapes.append((channels, res, res))
        return shapes

    def convert_to_fp16(self) -> None:
        """As the original: the convolutions of the torso in float16 (GroupNorm stays float32)."""
        for part in (self.input_blocks, self.middle_block, self.output_blocks):
            for m in part.modules():
                if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                    m.weight.data = m.weight.data.half()
                    if m.bias is not None:
                        m.bias.data = m.bias.data.half()

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        y: torch.Tensor | None = None,
        stop_after: int | None = None,
    ) -> torch.Tensor:
        """Noise prediction (N, out_channels, H, W); with ``stop_after=k``, ``output_blocks[k]``'s output."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        if stop_after is not None and not 0 <= stop_after < len(self.output_blocks):
            raise ValueError(f"stop_after must be in [0, {len(self.output_blocks) - 1}], got {stop_after}")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for k, module in enumerate(self.output_blocks):
            h = module(torch.cat([h, hs.pop()], dim=1), emb)
            if k == stop_after:
                return h
        return self.out(h.type(x.dtype))


# --------------------------------------------------------------------------- flags and loading


def _parse_int_list(value: str | Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,)
    if isinstance(value, str):
        return tuple(int(v) for v in value.split(",") if v.strip())
    return tuple(int(v) for v in value)


def normalize_flags(flags: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """guided-diffusion flags with defaults filled in and lists as canonical strings ("1,1,2,2")."""
    merged = {**DEFAULT_FLAGS, **(dict(flags) if flags else {}), **overrides}
    unknown = sorted(set(merged) - set(DEFAULT_FLAGS))
    if unknown:
        raise ValueError(f"unknown UNet flag(s) {unknown}; known: {sorted(DEFAULT_FLAGS)}")
    cm = merged["channel_mult"]
    if not isinstance(cm, str):
        cm = ",".join(str(int(m)) if float(m).is_integer() else str(float(m)) for m in cm)
    merged["channel_mult"] = cm.replace(" ", "")
    merged["attention_resolutions"] = ",".join(str(r) for r in _parse_int_list(merged["attention_resolutions"]))
    for name in ("image_size", "num_channels", "num_res_blocks", "num_heads", "num_head_channels",
                 "num_heads_upsample"):
        merged[name] = int(merged[name])
    for name in ("learn_sigma", "class_cond", "use_scale_shift_norm", "resblock_updown",
                 "use_new_attention_order", "use_fp16", "use_checkpoint"):
        merged[name] = bool(merged[name])
    merged["dropout"] = float(merged["dropout"])
    return merged


def channel_mult_for(flags: Mapping[str, Any]) -> tuple[float, ...]:
    """``channel_mult`` as create_model resolves it ("" = the image size's default)."""
    cm = flags["channel_mult"]
    if cm == "":
        defaults = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
        if flags["image_size"] not in defaults:
            raise ValueError(f"unsupported image size {flags['image_size']} with channel_mult=''; give channel_mult")
        return defaults[flags["image_size"]]
    return tuple(float(m) if "." in m else int(m) for m in cm.split(","))


def create_unet(attention_impl: str = "sdpa", **flags: Any) -> UNetModel:
    """Build the UNet from guided-diffusion's ``create_model`` flags (missing ones take its defaults)."""
    f = normalize_flags(flags)
    attention_ds = tuple(f["image_size"] // r for r in _parse_int_list(f["attention_resolutions"]))
    return UNetModel(
        image_size=f["image_size"],
        in_channels=3,
        model_channels=f["num_channels"],
        out_channels=6 if f["learn_sigma"] else 3,
        num_res_blocks=f["num_res_blocks"],
        attention_resolutions=attention_ds,
        dropout=f["dropout"],
        channel_mult=channel_mult_for(f),
        num_classes=NUM_CLASSES if f["class_cond"] else None,
        use_fp16=f["use_fp16"],
        num_heads=f["num_heads"],
        num_head_channels=f["num_head_channels"],
        num_heads_upsample=f["num_heads_upsample"],
        use_scale_shift_norm=f["use_scale_shift_norm"],
        resblock_updown=f["resblock_updown"],
        use_new_attention_order=f["use_new_attention_order"],
        attention_impl=attention_impl,
    )


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the flags the model was built from."""


def read_flags(flags: Mapping[str, Any] | str | Path) -> dict[str, Any]:
    """Flags from a dict or a JSON file, normalised."""
    if isinstance(flags, (str, Path)):
        path = Path(flags)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"UNet flags file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"UNet flags file {path} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"UNet flags file {path} must hold a JSON object of create_model flags")
        try:
            return normalize_flags(raw)
        except ValueError as e:
            raise ValueError(f"UNet flags file {path}: {e}") from None
    return normalize_flags(flags)


def _mismatch_report(model_sd: Mapping[str, torch.Tensor], ckpt: Mapping[str, torch.Tensor],
                     checkpoint: Path, flags: Mapping[str, Any], limit: int = 3) -> str | None:
    """One line: which keys are missing, unexpected or mis-shaped (the first ``limit`` of each), and the flags."""
    parts = mismatch(model_sd, ckpt, "checkpoint", limit)
    if not parts:
        return None
    return (f"checkpoint {checkpoint} does not fit the UNet flags ({len(model_sd)} keys expected, {len(ckpt)} "
            f"in the file): {'; '.join(parts)}; flags used: {json.dumps(dict(flags), sort_keys=True)}")


def _check_finite(sd: Mapping[str, torch.Tensor], checkpoint: Path) -> None:
    """A checkpoint with NaN or infinite weights would fill the store with NaN features: refuse it.

    A float32/16 tensor's float64 sum is finite exactly when all its elements are (it cannot overflow
    float64); a float64 tensor's ``(v * 0).sum()`` is. One reduction per tensor, no boolean mask."""
    floats = [(k, v) for k, v in sd.items() if v.is_floating_point()]
    sums = [(v * 0).sum() if v.dtype == torch.float64 else v.sum(dtype=torch.float64) for _, v in floats]
    finite = torch.isfinite(torch.stack(sums)).tolist() if sums else []
    bad = [k for (k, _), ok in zip(floats, finite) if not ok]
    if bad:
        shown = ", ".join(bad[:3]) + (f", ... {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(f"UNet checkpoint {checkpoint}: {len(bad)} tensor(s) hold NaN or infinite values "
                         f"({shown}); the file is corrupt or its training diverged")


def _zip_format(path: Path) -> bool:
    """Whether ``path`` is in torch's zip format (memory-mappable); torch's legacy format
    (``_use_new_zipfile_serialization=False``) cannot be mapped and is read whole."""
    return zipfile.is_zipfile(path)


def load_state_dict_file(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """A torch state_dict file (``weights_only``); a ``{"state_dict": ...}`` wrapper is unwrapped.

    A file in torch's zip format is memory-mapped (no second copy of a 2 GB checkpoint); one in the
    legacy format is read whole."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"UNet checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=_zip_format(path))
    except Exception as e:  # noqa: BLE001 - any unpickling/format error becomes one clear message
        raise ValueError(f"UNet checkpoint {path} could not be read as a torch state_dict: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"UNet checkpoint {path} is not a state_dict (a mapping of names to tensors)")
    return sd


def load_unet(checkpoint: str | Path, flags: Mapping[str, Any] | str | Path,
              attention_impl: str = "sdpa") -> UNetModel:
    """Build the UNet from ``flags`` (dict or JSON path) and load ``checkpoint`` into it, strictly.

    The model is built on the meta device and the checkpoint's tensors are assigned, so a 2 GB
    checkpoint costs no second copy. A checkpoint that does not fit raises
    :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys and the flags.
    """
    f = read_flags(flags)
    sd = load_state_dict_file(checkpoint)
    with torch.device("meta"):
        model = create_unet(attention_impl=attention_impl, **f)
    report = _mismatch_report(model.state_dict(), sd, Path(checkpoint), f)
    if report:
        raise CheckpointMismatchError(report)
    _check_finite(sd, Path(checkpoint))
    target = model.state_dict()
    sd = {k: v.to(target[k].dtype) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()
