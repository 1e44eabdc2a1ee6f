"""diffusers models as backbones: a ``UNet2DModel`` (pixel space) or a ``UNet2DConditionModel`` pipeline whose VAE
encodes the image to latents first (Stable-Diffusion-style), each with its scheduler's forward process.

``--unet`` takes a pipeline folder (``model_index.json``; ``unet/``, ``scheduler/``, and for a latent model
``vae/``, ``text_encoder/``, ``tokenizer/``), a UNet folder (``config.json``) with its ``scheduler_config.json``
beside it or in ``../scheduler/``, or a Hub id (the local Hub cache is used: these machines have no Hub access).
A conditional UNet is conditioned on the empty prompt, or (``unet_condition="text"``) on each image's own text
through the pipeline's text encoder; each text is encoded alone, so its embedding does not depend on its batch.
diffusers is an optional extra (``pip install 'textdiff[diffusers]'``), imported only here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.key import sha256_files
from common.errors import OptionError
from extract.backbones.base import Backbone, decoder_units

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")
CONDITIONS = ("empty", "text")
_WEIGHTS = ("*.safetensors", "*.bin")


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise OptionError("unet: a diffusers model needs the diffusers package: pip install 'textdiff[diffusers]'",
                          "unet") from None
    return diffusers


def _config(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise OptionError(f"unet: {path} is not a readable JSON config ({e})", "unet") from None


def _public(config: dict[str, Any]) -> dict[str, Any]:
    """A diffusers config without its bookkeeping (``_class_name``, ``_diffusers_version``, ``_name_or_path``)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


def _weights(folder: Path) -> list[Path]:
    files = sorted(p for pattern in _WEIGHTS for p in folder.glob(pattern))
    if not files:
        raise OptionError(f"unet: {folder} holds no weights (*.safetensors or *.bin)", "unet")
    return files


def is_diffusers_folder(path: Path) -> bool:
    """A pipeline folder (``model_index.json``) or a folder whose ``config.json`` names a diffusers UNet."""
    if (path / "model_index.json").is_file():
        return True
    cfg = path / "config.json"
    return cfg.is_file() and _config(cfg).get("_class_name") in UNET_CLASSES


def hub_folder(repo_id: str) -> Path:
    """The local snapshot of a Hub model (downloaded where the Hub is reachable), or a one-line error."""
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id))
    except Exception as e:  # noqa: BLE001 - offline, unknown id, no network: one line naming the id
        raise OptionError(f"unet {repo_id!r} is not a local folder and could not be fetched from the Hugging Face "
                          f"Hub ({type(e).__name__}); pass the model's folder", "unet") from None


@dataclass(frozen=True)
class DiffusersSource:
    """A resolved diffusers ``--unet``: its UNet folder, scheduler config, and for a latent pipeline its VAE and
    text-encoder folders."""

    spec: str
    checkpoint: Path  # the UNet folder
    unet_class: str
    scheduler: dict[str, Any]
    vae: Path | None
    text_encoder: Path | None
    condition: str | None  # empty / text for a conditional UNet; None otherwise

    @classmethod
    def resolve(cls, spec: str, path: Path, condition: str = "empty") -> DiffusersSource:
        """From a pipeline or UNet folder (no weights read); every missing part is a one-line error."""
        pipeline = (path / "model_index.json").is_file()
        unet_dir = path / "unet" if pipeline else path
        if not (unet_dir / "config.json").is_file():
            raise OptionError(f"unet: {path} is a diffusers pipeline without unet/config.json", "unet")
        unet_config = _config(unet_dir / "config.json")
        unet_class = unet_config.get("_class_name")
        if unet_class not in UNET_CLASSES:
            raise OptionError(f"unet: {unet_dir / 'config.json'} names {unet_class!r}; textdiff reads "
                              f"{' and '.join(UNET_CLASSES)}", "unet")
        places = [path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json",
                  path.parent / "scheduler" / "scheduler_config.json"]
        sched = next((p for p in places if p.is_file()), None)
        if sched is None:
            raise OptionError(f"unet: no scheduler config for {unet_dir} (looked for {', '.join(map(str, places[:2]))}"
                              f"): its noise schedule defines the features", "unet")
        conditional = unet_class == "UNet2DConditionModel"
        root = path if pipeline else path.parent
        vae = root / "vae" if (root / "vae" / "config.json").is_file() else None
        in_ch = int(unet_config.get("in_channels", 3))
        if in_ch != 3 and vae is None:
            raise OptionError(f"unet: {unet_dir} denoises {in_ch}-channel latents; pass the pipeline folder holding "
                              f"its vae/", "unet")
        text = root / "text_encoder" if conditional else None
        if conditional and not ((root / "text_encoder" / "config.json").is_file() and (root / "tokenizer").is_dir()):
            raise OptionError(f"unet: {unet_dir} is conditional; its pipeline folder needs text_encoder/ and "
                              f"tokenizer/ (conditioning: the empty prompt or the image's text)", "unet")
        if condition not in CONDITIONS:
            raise OptionError(f"unet_condition must be one of {CONDITIONS}, got {condition!r}", "unet_condition")
        return cls(spec, unet_dir.resolve(), unet_class, _config(sched), vae and vae.resolve(),
                   text and text.resolve(), condition if conditional else None)

    def recorded(self) -> str:
        """A Hub id as given; a folder as the pipeline (or UNet) folder's absolute path."""
        path = Path(self.spec).expanduser()
        return str(path.resolve()) if path.exists() else self.spec

    def identity(self) -> dict[str, Any]:
        """The key's entry: the kind, every config and the sha256 of every weight file that shapes the features."""
        ident: dict[str, Any] = {
            "kind": "diffusers", "class": self.unet_class, "config": _public(_config(self.checkpoint / "config.json")),
            "weights_sha256": sha256_files(_weights(self.checkpoint)), "scheduler": _public(self.scheduler)}
        if self.vae is not None:
            ident["vae"] = {"config": _public(_config(self.vae / "config.json")),
                            "weights_sha256": sha256_files(_weights(self.vae))}
        if self.text_encoder is not None:
            tok = sorted(p for p in (self.text_encoder.parent / "tokenizer").iterdir() if p.is_file())
            ident["condition"] = self.condition
            ident["text_encoder"] = {"weights_sha256": sha256_files(_weights(self.text_encoder)),
                                     "tokenizer_sha256": sha256_files(tok)}
        return ident

    def load(self) -> DiffusersBackbone:
        d = _diffusers()
        unet = getattr(d, self.unet_class).from_pretrained(str(self.checkpoint))
        sched_cls = getattr(d, str(self.scheduler.get("_class_name", "DDPMScheduler")), d.DDPMScheduler)
        scheduler = sched_cls.from_config(self.scheduler)
        vae = d.AutoencoderKL.from_pretrained(str(self.vae)) if self.vae is not None else None
        text = None
        if self.text_encoder is not None:
            from transformers import AutoModel, AutoTokenizer
            text = (AutoTokenizer.from_pretrained(str(self.text_encoder.parent / "tokenizer")),
                    AutoModel.from_pretrained(str(self.text_encoder)))
        return DiffusersBackbone(unet, scheduler, vae, text, self.condition)

    def shell(self) -> DiffusersBackbone:
        """The UNet on the meta device, from its config alone (no weights read)."""
        d = _diffusers()
        with torch.device("meta"):
            unet = getattr(d, self.unet_class).from_config(_config(self.checkpoint / "config.json"))
        factor = _vae_factor(_config(self.vae / "config.json")) if self.vae is not None else 1
        return DiffusersBackbone(unet, None, None, None, self.condition, scale=factor)

    def block_shapes(self, size: int) -> list[tuple[int, int, int]]:
        """Each unit's (C, h, w) for a ``size`` px image (a forward on the meta device)."""
        return self.shell().block_shapes(size)


def _vae_factor(vae_config: dict[str, Any]) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", (0,))) - 1)


class DiffusersBackbone(Backbone):
    """A loaded diffusers UNet (with its scheduler; a VAE and text encoder for a latent, conditional pipeline)."""

    kind = "diffusers"

    def __init__(self, unet: nn.Module, scheduler: Any, vae: nn.Module | None, text: tuple[Any, nn.Module] | None,
                 condition: str | None, *, scale: int | None = None):
        self.unet, self.scheduler, self.vae, self.text, self.condition = unet, scheduler, vae, text, condition
        parts = {"unet": unet, **({"vae": vae} if vae is not None else {}),
                 **({"text_encoder": text[1]} if text is not None else {})}
        self.module = nn.ModuleDict(parts)
        self.scale = scale if scale is not None else (_vae_factor(vae.config) if vae is not None else 1)
        self.noise_channels = int(unet.config.in_channels)
        self.reads_text = condition == "text"
        self._contexts: dict[str, torch.Tensor] = {}

    def meta_copy(self) -> DiffusersBackbone:
        """The UNet alone, rebuilt from its config on the meta device (zeros stand in for the text)."""
        with torch.device("meta"):
            unet = type(self.unet).from_config(self.unet.config)
        return DiffusersBackbone(unet, None, None, None, self.condition, scale=self.scale)

    def named_units(self) -> list[tuple[str, nn.Module]]:
        return decoder_units(self.unet.up_blocks, lambda b: (getattr(b, "upsamplers", None) or [None])[0])

    def encode(self, x0: torch.Tensor) -> torch.Tensor:
        """Pixels → the VAE latent's mean, scaled (and shifted) as its pipelines do (deterministic: no sampling)."""
        if self.vae is None:
            return x0
        z = self.vae.encode(x0).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        return (z - shift if shift is not None else z) * self.vae.config.scaling_factor

    def q_sample(self, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        if not hasattr(self.scheduler, "add_noise"):
            raise OptionError(f"unet: scheduler {type(self.scheduler).__name__} has no forward process (add_noise)",
                              "unet")
        return self.scheduler.add_noise(z0, noise.expand_as(z0), t.long())

    def _context_of(self, text: str, device: torch.device) -> torch.Tensor:
        """(L, D) hidden states of one text through the pipeline's text encoder, padded to its tokenizer's length."""
        if text not in self._contexts:
            tokenizer, encoder = self.text  # type: ignore[misc]
            ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            self._contexts[text] = encoder(ids)[0][0]
        return self._contexts[text]

    def _context(self, n: int, texts: Sequence[str] | None, device: torch.device) -> torch.Tensor | None:
        if self.condition is None:
            return None
        if self.text is None:  # a shell on the meta device
            return torch.zeros(n, 77, int(self.unet.config.cross_attention_dim))
        rows = list(texts) if self.reads_text and texts is not None else [""] * n
        if len(rows) != n:
            raise ValueError(f"{n} samples but {len(rows)} texts")
        return torch.stack([self._context_of(r, device) for r in rows])

    def _denoise(self, zt: torch.Tensor, t: torch.Tensor, texts: Sequence[str] | None) -> None:
        context = self._context(zt.shape[0], texts, zt.device)
        if context is None:
            self.unet(zt, t, return_dict=False)
        else:
            self.unet(zt, t, encoder_hidden_states=context.to(zt.dtype), return_dict=False)

