"""Segment a new image with a trained run: stage one for that image alone, then the run's head.

The features must be the ones the head was trained on, so everything that made the run's store is
taken from the store, never from defaults: the UNet checkpoint and the text encoder recorded in its
``extract`` attributes (verified by sha256 against the cache key, since a path says nothing about
content), the key's UNet flags, noise seed, size, colour order, text length and compute dtype, and
the store's fixed UNet batch shape (``forward_batch``, zero padding included: each sample's
activations are then computed exactly as during extraction). Features and tokens are rounded to
float16 and back, as the store keeps them. Per block the steps are concatenated on channels in the
run's order, as in :class:`train.data.SplitFeatures`, and the token mask is the run's
(:func:`train.data.visible_tokens`). A model that reads images gets the image alone. What a model
reads comes from the registry (:attr:`train.models.ModelSpec.reads`); the probabilities from
:func:`train.models.probabilities`, the forward pass evaluate uses.

``Predictor.from_run`` loads the models once; :func:`predict` is the one-shot wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from cache.errors import OptionError
from cache.store import FeatureStore
from extract.checkpoints import UNetNotFoundError, resolve_unet
from extract.datasets import read_image
from extract.diffusion import shared_noise
from extract.devices import resolve_device
from extract.features import FeatureExtractor
from extract.shared import to_unit_range
from extract.text import TextEncoder, load_text_encoder, tokenizer_files, weight_files
from train.config import PredictConfig
from train.data import ImageSample, Sample, visible_tokens
from train.models import load_run, probabilities, spec_of


__all__ = ["FeatureInputs", "ImageInputs", "Predictor", "WeightsMismatchError", "mask_path", "predict",
           "store_text_encoder"]

_MISMATCH = "features computed with it would not match the ones the head was trained on"


class WeightsMismatchError(ValueError):
    """A UNet checkpoint or text encoder whose content differs from the run's cache key."""

    options = ("unet", "text_encoder")  # the keywords its messages may name (cache.errors)


def mask_path(out: Path, image: Path) -> Path:
    """Where the mask goes: ``out`` itself, or ``out/<image stem>_mask.png`` when ``out`` is a directory
    (an existing one, or a path without a suffix)."""
    out = Path(out)
    return out / f"{Path(image).stem}_mask.png" if out.is_dir() or not out.suffix else out


def _resolve_checked_unet(spec: str | None, key: dict[str, Any], where: str) -> Any:
    """The UNet source for ``spec`` with the key's flags, refused unless its bytes are the key's."""
    expected = key["unet"]["weights_sha256"]
    if not spec:
        raise UNetNotFoundError(f"{where} does not record which UNet checkpoint made it; pass unet=PATH "
                                f"to the checkpoint with sha256 {expected}")
    try:
        src = resolve_unet(spec, key["unet"]["flags"])
    except UNetNotFoundError as e:
        raise UNetNotFoundError(f"{e}\n  ({where} was made with UNet {spec!r}, sha256 {expected}; if the "
                                f"file moved, pass unet=PATH)") from None
    got = src.identity()["weights_sha256"]
    if got != expected:
        raise WeightsMismatchError(
            f"UNet checkpoint {src.checkpoint} has sha256 {got}, but the run's cache key records {expected}: "
            f"{_MISMATCH}. Pass unet=PATH to the checkpoint the store was extracted with.")
    return src


def _load_checked_encoder(spec: str | None, key: dict[str, Any], where: str, device: str) -> TextEncoder:
    """The text encoder ``spec``, refused unless its weights and tokenizer are the key's."""
    text_key = key["text"]
    if not spec:
        raise OptionError(f"{where} does not record which text encoder made it; pass text_encoder=... "
                          f"the one named {text_key.get('source_name')!r} in its key", "text_encoder")
    encoder = load_text_encoder(spec, device=device)
    ident = encoder.identity()
    source = Path(encoder.source)
    for what, field, files in (("weights", "weights_sha256", weight_files(source)),
                               ("tokenizer", "tokenizer_sha256", tokenizer_files(source))):
        if ident[field] != text_key[field]:
            names = ", ".join(str(p) for p in files)
            raise WeightsMismatchError(
                f"text encoder {spec!r} {what} ({names}) have sha256 {ident[field]}, but the run's cache key "
                f"records {text_key[field]} ({text_key.get('source_name')}): {_MISMATCH}. "
                f"Pass text_encoder=DIR holding the encoder the store was extracted with.")
    if ident["dim"] != text_key["dim"]:
        raise WeightsMismatchError(f"text encoder {spec!r} is {ident['dim']}-d, the run's key says {text_key['dim']}")
    return encoder


def store_text_encoder(store: FeatureStore, text_encoder: str | None = None, device: str = "cpu") -> TextEncoder:
    """The text encoder that made ``store`` (``text_encoder``, if it moved; else the one its ``extract``
    attributes name), refused unless its weights and tokenizer are the key's."""
    made = dict(store.attrs.get("extract") or {})
    return _load_checked_encoder(text_encoder or made.get("text_encoder"), store.key, f"store {store.path}", device)


def _target(size: int) -> torch.Tensor:
    return torch.zeros(1, size, size, dtype=torch.long)  # no ground truth for a new image


@dataclass
class FeatureInputs:
    """A new image as a features-reading model takes it: its features from the store's UNet, its
    text through the store's encoder (None when the model takes no text), the run's token mask.
    ``text_optional``: the run was fitted with text dropout, so an empty text means no text (every
    token withheld, as ``evaluate --text none``)."""

    extractor: FeatureExtractor
    encoder: TextEncoder | None
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    max_length: int
    token_dim: int
    pad_to: int | None
    attend_padding: bool
    text_optional: bool = False

    @classmethod
    def for_run(cls, config: dict[str, Any], store: FeatureStore, unet: str | None, text_encoder: str | None,
                device: torch.device) -> FeatureInputs:
        """The run's UNet and text encoder, verified against its store's key."""
        key, made = store.key, dict(store.attrs.get("extract") or {})
        where = f"store {store.path}"
        encoder = (store_text_encoder(store, text_encoder, str(device))
                   if spec_of(config).needs_text(config["head"]) else None)
        size = int(key["preprocessing"]["size"])
        src = _resolve_checked_unet(unet or made.get("unet"), key, where)
        compute = key.get("compute_dtype", "float32")
        extractor = FeatureExtractor(src.load(), shared_noise(size, int(key["noise_seed"])), device=device,
                                     autocast=compute != "float32")
        if compute != "float32":
            extractor.compute_dtype = getattr(torch, compute)  # the store's, whatever this device's default
        pad_to = store.attrs.get("forward_batch")
        return cls(extractor=extractor, encoder=encoder, blocks=tuple(int(b) for b in config["blocks"]),
                   steps=tuple(int(s) for s in config["steps"]), max_length=int(key["text"]["max_length"]),
                   token_dim=int(store.attrs["token_dim"]), pad_to=int(pad_to) if pad_to else None,
                   attend_padding=bool(config.get("fit", {}).get("attend_padding", False)),
                   text_optional=float(config.get("fit", {}).get("text_dropout", 0.0)) > 0)

    def features(self, image: np.ndarray) -> list[torch.Tensor]:
        """Per block (1, len(steps)·C, h, w) float32 for one uint8 (3, S, S) image, as the store holds them."""
        x0 = torch.from_numpy(to_unit_range(image[None]))
        n = len(self.steps)
        x0, t = x0.repeat(n, 1, 1, 1), torch.tensor(self.steps)
        chunk = self.pad_to or n
        out: dict[int, list[torch.Tensor]] = {b: [] for b in self.blocks}
        for start in range(0, n, chunk):
            got = self.extractor.samples(x0[start:start + chunk], t[start:start + chunk], self.blocks,
                                         pad_to=self.pad_to)
            for b in self.blocks:
                out[b].append(got[b])
        feats = []
        for b in self.blocks:
            with np.errstate(over="ignore", invalid="ignore"):
                f16 = np.asarray(torch.cat(out[b]).numpy(), dtype=np.float16)  # the store's rounding
            if not np.isfinite(f16).all():
                raise ValueError(f"features of block {b} are not finite in float16 (overflow or NaN)")
            feats.append(torch.from_numpy(np.concatenate(list(f16), axis=0)[None]).float())
        return feats

    def tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, L, D) float32 tokens rounded through float16, and the (1, L) bool mask the model attends with
        (all False, no text, when the model takes none or a ``text_optional`` run is given an empty text)."""
        if self.encoder is None or (self.text_optional and not text.strip()):
            emb = np.zeros((1, self.max_length, self.token_dim), dtype=np.float16)
            mask = np.zeros((1, self.max_length), dtype=bool)
            return torch.from_numpy(emb).float(), torch.from_numpy(mask)
        if not text.strip():
            raise ValueError("the text is empty, but this run's head attends to the text (a run fitted with "
                             "text dropout predicts without it)")
        emb, mask = self.encoder.encode([text], self.max_length)
        return (torch.from_numpy(emb.astype(np.float16)).float(),
                torch.from_numpy(visible_tokens(np.asarray(mask, dtype=bool), self.attend_padding)))

    def truncated(self, text: str) -> bool:
        """True when ``text`` has more tokens than the run's max_length (the rest is cut, as in extraction)."""
        return self.encoder is not None and self.encoder.token_counts([text])[0] > self.max_length

    def sample(self, image: np.ndarray, text: str) -> Sample:
        """The model's input for one uint8 (3, S, S) image and its text."""
        return Sample(self.features(image), *self.tokens(text), _target(image.shape[-1]))


@dataclass
class ImageInputs:
    """A new image as an images-reading model takes it: the image alone, in [-1, 1]."""

    encoder: None = None

    @classmethod
    def for_run(cls, config: dict[str, Any], store: FeatureStore, unet: str | None, text_encoder: str | None,
                device: torch.device) -> ImageInputs:
        """Nothing to load."""
        return cls()

    def truncated(self, text: str) -> bool:
        """The text is not read."""
        return False

    def sample(self, image: np.ndarray, text: str) -> ImageSample:
        """The model's input for one uint8 (3, S, S) image (the text is not read)."""
        return ImageSample(torch.from_numpy(to_unit_range(image[None])), _target(image.shape[-1]))


#: how a new image is read, by what a model reads (:attr:`train.models.ModelSpec.reads`)
INPUTS: dict[str, Callable[..., FeatureInputs | ImageInputs]] = {"features": FeatureInputs.for_run,
                                                                  "images": ImageInputs.for_run}


@dataclass
class Predictor:
    """A run's model with what reads a new image as its store did (:data:`INPUTS`)."""

    config: dict[str, Any]
    model: torch.nn.Module
    store: FeatureStore
    inputs: FeatureInputs | ImageInputs
    size: int
    color_order: str
    precision: str = PredictConfig.precision

    @classmethod
    def from_run(cls, run: Path, cache: Path | None = None, *, unet: str | None = None,
                 text_encoder: str | None = None, device: str | None = None,
                 precision: str = PredictConfig.precision) -> Predictor:
        """Load run ``run`` (its store: ``cache`` or the one it recorded) and verify + load its models.

        ``unet`` / ``text_encoder`` override where the store says its models are (if they moved);
        their content is checked against the key either way.
        """
        dev = resolve_device(device)
        config, model, store = load_run(Path(run), cache, dev)
        prep = store.key["preprocessing"]
        if prep.get("image_resize") != "pil-bilinear":
            raise ValueError(f"store {store.path}: unsupported image_resize {prep.get('image_resize')!r}")
        inputs = INPUTS[spec_of(config).reads](config, store, unet, text_encoder, dev)
        return cls(config=config, model=model, store=store, inputs=inputs, size=int(prep["size"]),
                   color_order=prep.get("color_order", "rgb"), precision=precision)

    @property
    def encoder(self) -> TextEncoder | None:
        """The run's text encoder (None when its model takes no text)."""
        return self.inputs.encoder

    def features(self, image: np.ndarray) -> list[torch.Tensor]:
        """The image's features, as the store holds them (a features-reading run)."""
        return self.inputs.features(image)

    def tokens(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The text's tokens and the mask the model attends with (a features-reading run)."""
        return self.inputs.tokens(text)

    def truncated(self, text: str) -> bool:
        """True when ``text`` has more tokens than the run's max_length (the rest is cut, as in extraction)."""
        return self.inputs.truncated(text)

    def probabilities(self, image: np.ndarray, text: str) -> np.ndarray:
        """float32 (num_classes, S, S) class probabilities for a uint8 (3, S, S) image and its text."""
        return probabilities(self.model, self.inputs.sample(image, text), self.size, self.precision)[0].cpu().numpy()

    def __call__(self, image: Path, text: str, out: Path, original_size: bool = False,
                 console: Console | None = None) -> np.ndarray:
        """Segment ``image``; write the mask PNG ({0, 255}) to ``out``; return the {0, 1} uint8 mask written."""
        img, (h, w) = read_image(Path(image), self.size, self.color_order)
        if console is not None and self.truncated(text):
            console.print(f"[yellow]note[/]: the text is longer than the run's {self.max_length} tokens "
                          "and is truncated, as during extraction")
        mask = self.probabilities(img, text).argmax(0).astype(np.uint8)
        if original_size and (h, w) != mask.shape:
            mask = np.asarray(Image.fromarray(mask, "L").resize((w, h), Image.Resampling.NEAREST))
        path = mask_path(Path(out), Path(image))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask * 255, "L").save(path, format="PNG")
        return mask


def predict(run: Path, image: Path, text: str, out: Path, cache: Path | None = None,
            original_size: bool = PredictConfig.original_size,
            *, unet: str | None = None, text_encoder: str | None = None, device: str | None = None,
            precision: str = PredictConfig.precision,
            console: Console | None = None) -> np.ndarray:
    """Segment one new image with run ``run``; write the mask PNG ({0, 255}) to ``out`` (a file, or a
    directory → ``<stem>_mask.png``, see :func:`mask_path`) at the store's size, or at the image's own size with
    ``original_size``; return the {0, 1} uint8 mask written.

    Raises FileNotFoundError naming a missing image (before any model is loaded) and
    :class:`WeightsMismatchError` when the UNet or text encoder found differs from the run's cache key.
    """
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"image not found: {image}")
    predictor = Predictor.from_run(run, cache, unet=unet, text_encoder=text_encoder, device=device,
                                   precision=precision)
    return predictor(image, text, out, original_size=original_size, console=console)
