"""MONAI's ``DiffusionModelUNet`` as a backbone: a state-dict file plus a JSON of its constructor arguments,
``{"_class_name": "DiffusionModelUNet", "spatial_dims": 2, "in_channels": 3, ..., "scheduler": {...}}``; the
optional ``scheduler`` holds MONAI ``DDPMScheduler`` arguments (default: its 1000-step linear schedule), whose
``add_noise`` is the forward process. 2-D, unconditional models only. MONAI is an optional extra
(``pip install 'textdiff[monai]'``), imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.key import sha256_file
from common.errors import OptionError
from common.statedict import mismatch
from extract.backbones.base import Backbone, decoder_units

CLASS_NAME = "DiffusionModelUNet"


def _monai() -> tuple[Any, Any]:
    try:
        from monai.networks.nets import DiffusionModelUNet
        from monai.networks.schedulers import DDPMScheduler
    except ImportError as e:
        raise OptionError(f"unet: a MONAI DiffusionModelUNet needs MONAI and einops ({e.name} is missing): "
                          f"pip install 'textdiff[monai]'", "unet") from None
    return DiffusionModelUNet, DDPMScheduler


def is_monai_flags(flags: Any) -> bool:
    """Constructor arguments that name MONAI's class."""
    return isinstance(flags, dict) and flags.get("_class_name") == CLASS_NAME


@dataclass(frozen=True)
class MonaiSource:
    """A resolved MONAI ``--unet``: the state-dict file, the constructor and scheduler arguments."""

    spec: str
    checkpoint: Path
    args: dict[str, Any]
    scheduler: dict[str, Any] = field(default_factory=dict)
    condition: None = None

    @classmethod
    def resolve(cls, spec: str, checkpoint: Path, flags: dict[str, Any], where: str) -> MonaiSource:
        args = {k: v for k, v in flags.items() if k not in ("_class_name", "scheduler")}
        if int(args.get("spatial_dims", 0)) != 2:
            raise OptionError(f"unet_flags: {where} must give spatial_dims 2 (textdiff segments 2-D images), got "
                              f"{args.get('spatial_dims')!r}", "unet_flags")
        if args.get("with_conditioning") or args.get("num_class_embeds"):
            raise OptionError(f"unet_flags: {where} describes a conditioned MONAI UNet (with_conditioning / "
                              f"num_class_embeds); textdiff reads unconditional ones", "unet_flags")
        return cls(spec, checkpoint, args, dict(flags.get("scheduler") or {}))

    def recorded(self) -> str:
        return str(self.checkpoint)

    def identity(self) -> dict[str, Any]:
        return {"kind": "monai", "class": CLASS_NAME, "config": self.args, "scheduler": self.scheduler,
                "weights_sha256": sha256_file(self.checkpoint)}

    def build(self) -> nn.Module:
        net_cls, _ = _monai()
        try:
            return net_cls(**self.args)
        except (TypeError, ValueError) as e:
            raise OptionError(f"unet_flags: {CLASS_NAME}({self.args}) cannot be built: {e}", "unet_flags") from None

    def load(self) -> MonaiBackbone:
        from extract.unet import load_state_dict_file
        net = self.build()
        sd = load_state_dict_file(self.checkpoint)
        report = mismatch(net.state_dict(), sd, self.checkpoint.name)
        if report:
            raise OptionError(f"unet: {self.checkpoint} does not fit {CLASS_NAME} with these arguments: "
                              f"{'; '.join(report)}", "unet")
        net.load_state_dict(sd)
        return MonaiBackbone(net, _monai()[1](**self.scheduler), self.args)

    def shell(self) -> MonaiBackbone:
        """The UNet on the meta device (no weights read)."""
        with torch.device("meta"):
            return MonaiBackbone(self.build(), None, self.args)

    def block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        return self.shell().block_shapes(size)


class MonaiBackbone(Backbone):
    """A loaded ``DiffusionModelUNet`` and its ``DDPMScheduler``."""

    kind = "monai"

    def __init__(self, net: nn.Module, scheduler: Any, args: dict[str, Any]):
        self.module, self.scheduler, self.args = net, scheduler, args
        self.noise_channels = int(args["in_channels"])

    def named_units(self) -> list[tuple[str, nn.Module]]:
        return decoder_units(self.module.up_blocks, lambda b: b.upsampler)

    def meta_copy(self) -> MonaiBackbone:
        with torch.device("meta"):
            return MonaiBackbone(type(self.module)(**self.args), None, self.args)

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(z0, noise.expand_as(z0), t.long())

    def _denoise(self, zt: torch.Tensor, t: torch.Tensor, texts: Sequence[str] | None) -> None:
        self.module(zt, t)
