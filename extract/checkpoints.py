"""Where UNet weights come from: presets, the models folder, pretrain outputs, explicit files.

``--unet`` accepts a preset name (``adm-imagenet-256``), a directory written by ``pipeline pretrain``
(``model.pt`` + ``flags.json``), or a state_dict file (flags from ``--unet-flags`` or a
``flags.json`` beside it). Preset files are looked up in the models folder:
``$TEXTDIFF_MODELS_DIR``, else ``<cache dir>/models`` (``~/.cache/textdiff/models`` by default).
It also takes other backbones (:mod:`extract.backbones`): a diffusers pipeline or UNet folder, or a Hub id
(:mod:`extract.backbones.hf_diffusers`), and a state_dict whose flags JSON names MONAI's ``DiffusionModelUNet``
(:mod:`extract.backbones.monai_unet`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from common.errors import OptionError
from cache.key import default_cache_dir, sha256_file
from extract.backbones.adm import AdmBackbone
from extract.backbones.hf_diffusers import DiffusersSource, hub_folder, is_diffusers_folder
from extract.backbones.monai_unet import MonaiSource, is_monai_flags
from extract.unet import UNetModel, create_unet, load_unet, normalize_flags, read_flags


@dataclass(frozen=True)
class Preset:
    """Flags of a published checkpoint, its file name and where it is published."""

    flags: dict[str, Any]
    filename: str
    url: str
    note: str


PRESETS: dict[str, Preset] = {
    "adm-imagenet-256": Preset(
        flags=normalize_flags(
            image_size=256, num_channels=256, num_res_blocks=2, channel_mult="", learn_sigma=True,
            class_cond=False, attention_resolutions="32,16,8", num_heads=4, num_head_channels=64,
            num_heads_upsample=-1, use_scale_shift_norm=True, dropout=0.0, resblock_updown=True,
            use_new_attention_order=False, use_fp16=False,
        ),
        filename="256x256_diffusion_uncond.pt",
        url="https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt",
        note="OpenAI guided-diffusion, ImageNet 256x256, unconditional (the checkpoint TextDiff uses)",
    ),
}


class UNetNotFoundError(OptionError, FileNotFoundError):
    """No checkpoint where ``unet`` points (or no flags for it: ``unet_flags``); the message says how to
    get one. An :class:`OptionError` and a ``FileNotFoundError``."""

    def __init__(self, message: str, option: str = "unet", *others: str) -> None:
        super().__init__(message, option, *others)


def models_dir() -> Path:
    """The folder searched for preset checkpoints."""
    env = os.environ.get("TEXTDIFF_MODELS_DIR")
    return Path(env).expanduser() if env else default_cache_dir() / "models"


@dataclass(frozen=True)
class UNetSource:
    """A resolved ``--unet``: the checkpoint file, its flags and what identifies it in a cache key."""

    spec: str
    checkpoint: Path
    flags: dict[str, Any]
    condition: None = None  # ADM UNets are unconditional

    def identity(self) -> dict[str, Any]:
        """Content, not location: renaming or moving the file keeps the cache valid."""
        return {"flags": self.flags, "weights_sha256": sha256_file(self.checkpoint)}

    def load(self, attention_impl: str = "sdpa") -> UNetModel:
        return load_unet(self.checkpoint, self.flags, attention_impl=attention_impl)

    def recorded(self) -> str:
        """What a store records as its ``unet``: the preset's name, else the checkpoint's path."""
        return self.spec if self.spec in PRESETS else str(self.checkpoint)

    def shell(self) -> AdmBackbone:
        """The UNet on the meta device, from the flags alone (no weights read)."""
        with torch.device("meta"):
            return AdmBackbone(create_unet(**self.flags))

    def block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        """Each ``output_blocks[k]``'s (C, h, w) at ``size`` px."""
        return self.shell().block_shapes(size)


#: what :func:`resolve_unet` returns: each has ``spec``, ``checkpoint``, ``condition``, ``identity()``, ``load()``,
#: ``recorded()``, ``shell()`` (the network on the meta device) and ``block_shapes(size)``
Source = Union[UNetSource, DiffusersSource, MonaiSource]
#: "owner/name" with no file suffix: a Hugging Face Hub id when no such path exists
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w-]*/[\w.-]+$(?<!\.pt)(?<!\.pth)(?<!\.safetensors)(?<!\.bin)")


def _missing_preset_message(name: str, preset: Preset) -> str:
    return (f"UNet preset {name!r} needs {preset.filename} ({preset.note}), not found in the models "
            f"folder {models_dir()}.\n  It is published at {preset.url}\n"
            f"  Download it there (or set TEXTDIFF_MODELS_DIR to the folder holding it), or pass "
            f"unet='/path/to/{preset.filename}'.\n"
            f"  Offline alternative: `pipeline pretrain --dataset ... --out DIR` (extract.run_pretrain) trains "
            f"a domain UNet on your unlabelled images; then use unet=DIR.")


def recorded_flags(identity: dict[str, Any]) -> dict[str, Any] | None:
    """The ``unet_flags`` that rebuild a store key's ``unet`` entry: ADM's flags, MONAI's arguments (with its
    scheduler), or None for a diffusers model (its folder holds its configs)."""
    if identity.get("kind") == "monai":
        return {"_class_name": identity["class"], **identity["config"], "scheduler": identity["scheduler"]}
    return identity.get("flags")


def _raw_flags(flags: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The flags as a dict, and what to call them in a message."""
    if isinstance(flags, dict):
        return flags, "unet_flags"
    try:
        return json.loads(Path(flags).read_text()), str(flags)
    except (OSError, ValueError) as e:
        raise OptionError(f"unet_flags: {flags} is not a readable JSON file ({e})", "unet_flags") from None


def resolve_unet(spec: str, flags: str | Path | dict[str, Any] | None = None, condition: str = "empty") -> Source:
    """Turn ``spec`` (+ ``flags``: ``ExtractConfig.unet`` / ``unet_flags``; ``condition``: ``unet_condition``, for a
    conditional diffusers UNet) into a checkpoint and what describes it; no weights are read."""
    path = Path(spec).expanduser()
    if path.is_dir() and is_diffusers_folder(path):
        return DiffusersSource.resolve(spec, path, condition)
    if spec not in PRESETS and not path.exists() and _HUB_ID.match(spec):
        return DiffusersSource.resolve(spec, hub_folder(spec), condition)
    return _resolve_state_dict(spec, flags)


def _resolve_state_dict(spec: str, flags: str | Path | dict[str, Any] | None) -> UNetSource | MonaiSource:
    """A preset, a pretrain folder or a state-dict file with its flags: an ADM source, or a MONAI one where the flags
    name MONAI's class."""
    if spec in PRESETS:
        preset = PRESETS[spec]
        path = models_dir() / preset.filename
        if not path.is_file():
            raise UNetNotFoundError(_missing_preset_message(spec, preset))
        return UNetSource(spec, path, read_flags(flags) if flags is not None else dict(preset.flags))
    path = Path(spec).expanduser()
    if path.is_dir():
        ckpt, side_flags = path / "model.pt", path / "flags.json"
        if not ckpt.is_file():
            raise UNetNotFoundError(f"unet {path} is a directory without model.pt "
                                    f"(expected a `pipeline pretrain` output folder)")
    elif path.is_file():
        ckpt, side_flags = path, path.with_name("flags.json")
    else:
        known = ", ".join(PRESETS)
        raise UNetNotFoundError(f"unet {spec!r} is neither a preset ({known}) nor an existing file or folder")
    if flags is None:
        if not side_flags.is_file():
            raise UNetNotFoundError(f"no flags for checkpoint {ckpt}: pass unet_flags=FLAGS.json "
                                    f"(guided-diffusion create_model flags) or put flags.json beside it",
                                    "unet_flags")
        flags = side_flags
    raw, where = _raw_flags(flags)
    if is_monai_flags(raw):
        return MonaiSource.resolve(spec, ckpt.resolve(), raw, where)
    return UNetSource(spec, ckpt.resolve(), read_flags(flags))
