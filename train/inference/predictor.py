"""Segment new images with a trained run (or an exported model folder): stage one for them, then the model.

The features must be the ones the head was trained on, so everything that made the run's store is
taken from the store (or, for a model folder written by ``pipeline export``, from its config.json:
:class:`train.runs.modeldir.StageOne`), never from defaults: the UNet checkpoint and the text encoder the
store recorded (verified by sha256 against the recorded hashes, since a path says nothing about
content), the key's UNet flags, noise seed, size, colour order, text length and compute dtype, and
the store's fixed UNet batch shape (``forward_batch``, zero padding included: each sample's
activations are then computed exactly as during extraction, whatever its batch neighbours, so many
images share each forward). Features and tokens are rounded to float16 and back, as the store keeps
them. Per block the steps are concatenated on channels in the run's order, as in
:class:`train.data.readers.SplitFeatures`, and the token mask is the run's (:func:`train.data.readers.visible_tokens`).
A model that reads images gets the image alone. What a model reads comes from the registry
(:attr:`train.registry.ModelSpec.reader`); the probabilities from :func:`train.registry.probabilities`, the
forward pass evaluate uses, in evaluate's batches.

``Predictor.from_run`` loads the models once; :func:`predict` is the one-shot wrapper;
:mod:`train.inference.batch` runs a folder or a list of images.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from common.errors import OptionError
from cache.key import canonical_json
from extract.datasets import read_image
from common.devices import dtype_named, resolve_device
from extract.features import FeatureExtractor
from extract.shared import dihedral, to_unit_range
from extract.text import TextEncoder
from extract.textviews import rewrite_text
from train.config import TTA_VIEWS, PredictConfig
from train.data.readers import ImageSample, Sample, visible_tokens
from train.runs.modeldir import StageOne, is_model_dir
from train.runs.stage_one import load_checked_encoder, resolve_checked_unet
from train.registry import probabilities, spec_of, tta_probabilities
from train.runs.loading import load_model_dir, load_run


__all__ = ["FeatureInputs", "ImageInputs", "Predictor", "mask_path", "predict", "resize_to", "warn_device", "withheld"]

def mask_path(out: Path, image: Path) -> Path:
    """Where the mask goes: ``out`` itself, or ``out/<image stem>_mask.png`` when ``out`` is a directory
    (an existing one, or a path without a suffix)."""
    out = Path(out)
    return out / f"{Path(image).stem}_mask.png" if out.is_dir() or not out.suffix else out


def _target(n: int, size: int) -> torch.Tensor:
    return torch.zeros(n, size, size, dtype=torch.long)  # no ground truth for a new image


def _batch(images: np.ndarray) -> np.ndarray:
    """uint8 images (N, 3, S, S); one (3, S, S) image as a batch of one."""
    return images[None] if images.ndim == 3 else images


def _texts(texts: str | Sequence[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


def withheld(text: str) -> bool:
    """An empty (or blank) text: no text, every token withheld (the one meaning of "no text")."""
    return not text.strip()


@dataclass
class FeatureInputs:
    """New images as a features-reading model takes them: their features from the run's UNet, their texts
    through the run's encoder (None when the model takes no text), the run's token mask. An empty text is no
    text: every token withheld, as ``evaluate --text none`` withholds it (``text_dropout``: the run was fitted
    to predict without text as well)."""

    extractor: FeatureExtractor
    encoder: TextEncoder | None
    blocks: tuple[int, ...]
    steps: tuple[int, ...]
    max_length: int
    token_dim: int
    pad_to: int | None
    attend_padding: bool
    text_dropout: bool = False

    @classmethod
    def for_run(cls, config: dict[str, Any], stage: StageOne, unet: str | None, text_encoder: str | None,
                device: torch.device) -> FeatureInputs:
        """The run's UNet and text encoder, verified against what made its features."""
        encoder = (load_checked_encoder(text_encoder or stage.text_encoder_source, stage, str(device))
                   if spec_of(config).needs_text(config["head"]) else None)
        src = resolve_checked_unet(unet, stage)
        extractor = FeatureExtractor.for_model(src.load(), stage.size, stage.noise_seed, device=device,
                                               compute_dtype=dtype_named(stage.compute_dtype))  # the store's, on any device
        return cls(extractor=extractor, encoder=encoder, blocks=tuple(int(b) for b in config["blocks"]),
                   steps=tuple(int(s) for s in config["steps"]), max_length=int(stage.text["max_length"]),
                   token_dim=stage.token_dim, pad_to=stage.forward_batch,
                   attend_padding=bool(config.get("fit", {}).get("attend_padding", False)),
                   text_dropout=float(config.get("fit", {}).get("text_dropout", 0.0)) > 0)

    def images_per_forward(self) -> int:
        """Images whose steps fill one UNet forward of the store's batch shape."""
        return max(1, (self.pad_to or 0) // len(self.steps))

    def features(self, images: np.ndarray, texts: Sequence[str] | None = None) -> list[torch.Tensor]:
        """Per block (N, len(steps)·C, h, w) float32 for uint8 images (N, 3, S, S) (or one (3, S, S)), as the
        store holds them: the N × steps samples go through the UNet ``pad_to`` at a time, the store's batch shape
        (zero padding included), so that each is computed as during extraction; rounded through float16.
        ``texts``: the images' texts, which a backbone conditioned on them reads."""
        images = _batch(images)
        n, k = len(images), len(self.steps)
        per_sample = None
        if self.extractor.backbone.reads_text:
            if texts is None or len(texts) != n:
                raise ValueError(f"this run's UNet is conditioned on each image's text: pass {n} texts")
            per_sample = [text for text in texts for _ in range(k)]  # image-major, then step
        x0 = torch.from_numpy(to_unit_range(images)).repeat_interleave(k, dim=0)  # image-major, then step
        t = torch.tensor(self.steps).repeat(n)
        chunk = self.pad_to or k
        out: dict[int, list[torch.Tensor]] = {b: [] for b in self.blocks}
        for start in range(0, n * k, chunk):
            got = self.extractor.samples(x0[start:start + chunk], t[start:start + chunk], self.blocks,
                                         pad_to=self.pad_to, dtype=torch.float16,  # the store's rounding
                                         texts=None if per_sample is None else per_sample[start:start + chunk])
            for b in self.blocks:
                out[b].append(got[b])
        feats = []
        for b in self.blocks:
            f16 = torch.cat(out[b])
            if not torch.isfinite(f16).all():
                raise ValueError(f"features of block {b} are not finite in float16 (overflow or NaN)")
            feats.append(f16.reshape(n, k * f16.shape[1], *f16.shape[2:]).float())
        return feats

    def tokens(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, L, D) float32 tokens rounded through float16, and the (N, L) bool mask the model attends with. An
        empty text (and every text, for a model that reads none) is no text: zero tokens, none attended
        (:func:`withheld`), as ``evaluate --text none`` gives it."""
        texts = _texts(texts)
        emb = np.zeros((len(texts), self.max_length, self.token_dim), dtype=np.float16)
        mask = np.zeros((len(texts), self.max_length), dtype=bool)
        given = [i for i, t in enumerate(texts) if not withheld(t)] if self.encoder is not None else []
        if given:
            got, real = self.encoder.encode([texts[i] for i in given], self.max_length)
            emb[given] = got.astype(np.float16)
            mask[given] = visible_tokens(np.asarray(real, dtype=bool), self.attend_padding)
        return torch.from_numpy(emb).float(), torch.from_numpy(mask)

    def truncations(self, texts: Sequence[str]) -> list[bool]:
        """Per text, True when it has more tokens than the run's max_length (the rest is cut, as in extraction)."""
        if self.encoder is None:
            return [False] * len(texts)
        return [n > self.max_length for n in self.encoder.token_counts(list(texts))]

    def sample(self, images: np.ndarray, texts: str | Sequence[str]) -> Sample:
        """The model's input for uint8 images (N, 3, S, S) (or one) and their texts (an empty one: no text)."""
        images = _batch(images)
        return Sample(self.features(images, _texts(texts)), *self.tokens(texts), _target(len(images), images.shape[-1]))

    def no_text_note(self, texts: Sequence[str]) -> str | None:
        """What to tell a user whose images have no text, for a head that reads text: predicted without it, and
        how well this run does that (fitted with text dropout or not); None when every image has a text."""
        n = sum(withheld(t) for t in texts)
        if not n or self.encoder is None:
            return None
        how = ("this run was fitted with text dropout to predict without text too" if self.text_dropout else
               "this run was not fitted with text dropout, so expect a worse mask than with a text")
        return f"{n} image(s) have no text: predicted with every token withheld, as evaluate's text mode none; {how}"


@dataclass
class ImageInputs:
    """New images as an images-reading model takes them: the images alone, in [-1, 1]."""

    encoder: None = None

    @classmethod
    def for_run(cls, config: dict[str, Any], stage: StageOne, unet: str | None, text_encoder: str | None,
                device: torch.device) -> ImageInputs:
        """Nothing to load."""
        return cls()

    def images_per_forward(self) -> int:
        """No UNet: one."""
        return 1

    def truncations(self, texts: Sequence[str]) -> list[bool]:
        """The texts are not read."""
        return [False] * len(texts)

    def no_text_note(self, texts: Sequence[str]) -> str | None:
        """The texts are not read: nothing to say."""
        return None

    def sample(self, images: np.ndarray, texts: str | Sequence[str]) -> ImageSample:
        """The model's input for uint8 images (N, 3, S, S) (or one) (the texts are not read)."""
        images = _batch(images)
        return ImageSample(torch.from_numpy(to_unit_range(images)), _target(len(images), images.shape[-1]))


def resize_to(array: np.ndarray, height_width: tuple[int, int], mode: str) -> np.ndarray:
    """A (S, S) mask (``mode`` "L": nearest) or probability map ("F": bilinear) at (height, width)."""
    h, w = height_width
    if array.shape == (h, w):
        return array
    resample = Image.Resampling.NEAREST if mode == "L" else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array, mode).resize((w, h), resample))


@dataclass
class Predictor:
    """A run's (or an exported model folder's) model with what reads a new image as its store did (its registry
    entry's :meth:`train.registry.ModelSpec.new_image_inputs`)."""

    config: dict[str, Any]
    model: torch.nn.Module
    stage_one: StageOne
    inputs: FeatureInputs | ImageInputs
    precision: str = PredictConfig.precision
    tta: str = PredictConfig.tta  # test-time augmentation: none, flips or d4 (train.config.TTA_VIEWS)

    @classmethod
    def from_run(cls, run: Path, cache: Path | str | None = None, *, unet: str | None = None,
                 text_encoder: str | None = None, device: str | None = None,
                 precision: str = PredictConfig.precision, tta: str = PredictConfig.tta) -> Predictor:
        """Load ``run`` and verify + load its UNet and text encoder: a run folder (its store: ``cache`` or the
        one it recorded) or a model folder written by ``pipeline export`` (no store needed).

        ``unet`` / ``text_encoder`` override where the store (or the model folder) says its models are (if they
        moved); their content is checked against the recorded hashes either way.
        """
        dev = resolve_device(device)
        if is_model_dir(Path(run)):
            if cache is not None:
                raise OptionError(f"cache: {run} is an exported model folder, which needs no store", "cache")
            config, model, stage = load_model_dir(Path(run), dev)
        else:
            config, model, store = load_run(Path(run), cache, dev)
            stage = StageOne.of_store(store)
        if stage.preprocessing.get("image_resize") != "pil-bilinear":
            raise ValueError(f"{stage.where}: unsupported image_resize {stage.preprocessing.get('image_resize')!r}")
        if tta not in TTA_VIEWS:
            raise OptionError(f"tta must be one of {list(TTA_VIEWS)}, got {tta!r}", "tta")
        inputs = spec_of(config).new_image_inputs().for_run(config, stage, unet, text_encoder, dev)
        return cls(config=config, model=model, stage_one=stage, inputs=inputs, precision=precision, tta=tta)

    def device_note(self) -> str | None:
        """A warning when this predictor computes on another device type than the store's features were (float32
        rounds differently on a CPU and a GPU: masks may differ from the store's in a few pixels); else None."""
        made, here = self.stage_one.device_type, next(self.model.parameters()).device.type
        if made is None or made == here:
            return None
        return (f"{self.stage_one.where} computed its features on {made}, this prediction runs on {here}: float32 "
                f"rounds differently there, so a mask may differ from the store's in a few pixels")

    @property
    def size(self) -> int:
        """The store's image size: the model's input and output size."""
        return self.stage_one.size

    @property
    def color_order(self) -> str:
        return self.stage_one.color_order

    @property
    def encoder(self) -> TextEncoder | None:
        """The run's text encoder (None when its model takes no text)."""
        return self.inputs.encoder

    def features(self, images: np.ndarray, texts: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The images' features, as the store holds them (a features-reading run; see :class:`FeatureInputs`;
        ``texts``: for a backbone conditioned on each image's text)."""
        return self.inputs.features(images, texts)

    def tokens(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The texts' tokens and the mask the model attends with (a features-reading run)."""
        return self.inputs.tokens(texts)

    def truncated(self, text: str) -> bool:
        """True when ``text`` has more tokens than the run's max_length (the rest is cut, as in extraction)."""
        return self.inputs.truncations([text])[0]

    def truncations(self, texts: Sequence[str]) -> list[bool]:
        """:meth:`truncated` of each text."""
        return self.inputs.truncations(texts)

    def head_batch(self) -> int:
        """Images per forward of the model: evaluate's rule (:attr:`train.registry.ModelSpec.batch_size`)."""
        return spec_of(self.config).batch_size(self.config["head"], self.size)

    def group_size(self) -> int:
        """Images :meth:`probabilities` best takes at once: whole UNet forwards of the store's batch shape
        and whole model batches."""
        head = self.head_batch()
        return head * -(-self.inputs.images_per_forward() // head)

    def fingerprint(self) -> str:
        """sha256 of what the outputs depend on: the model's arguments and weights, what it reads, and the
        key of the store its features come from (the same for a run and its exported folder)."""
        digest = hashlib.sha256(canonical_json({
            "head": self.config["head"], "blocks": self.config.get("blocks"), "steps": self.config.get("steps"),
            "attend_padding": bool(self.config.get("fit", {}).get("attend_padding", False)),
            "store": self.stage_one.key_hash, "empty_text": "withheld"}).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()

    def probabilities(self, images: np.ndarray, texts: str | Sequence[str]) -> np.ndarray:
        """float32 (K, S, S) class probabilities for one uint8 (3, S, S) image and its text, or (N, K, S, S) for
        images (N, 3, S, S) and N texts: stage one for all of them (:meth:`FeatureInputs.features`), then the
        model :meth:`head_batch` images at a time. An empty text is no text (:func:`withheld`)."""
        one = images.ndim == 3
        if self.tta != "none":
            out = np.stack([self._averaged(img, text) for img, text in zip(_batch(images), _texts(texts), strict=True)])
            return out[0] if one else out
        sample = self.inputs.sample(images, texts)
        n, batch = len(_batch(images)), self.head_batch()
        out = np.concatenate([probabilities(self.model, sample.part(i, i + batch), self.size, self.precision)
                              .cpu().numpy() for i in range(0, n, batch)])
        return out[0] if one else out

    def _averaged(self, image: np.ndarray, text: str) -> np.ndarray:
        """(K, S, S): the mean probabilities over :attr:`tta`'s views of one image, each view with its own text
        (rewritten in the run's dataset's words, as its store's views have them; an empty text stays none),
        the views in one forward: what ``evaluate --tta`` computes for a store's image."""
        views = TTA_VIEWS[self.tta]
        dataset = str(self.config.get("dataset", ""))
        imgs = np.stack([dihedral(image, v) for v in views])
        texts = [text if withheld(text) else rewrite_text(text, v, dataset) for v in views]
        sample = self.inputs.sample(imgs, texts)
        return tta_probabilities(self.model, sample, self.size, views, self.precision)[0].cpu().numpy()

    def __call__(self, image: Path, text: str, out: Path, original_size: bool = False,
                 console: Console | None = None) -> np.ndarray:
        """Segment ``image``; write the mask PNG ({0, 255}) to ``out``; return the {0, 1} uint8 mask written."""
        img, hw = read_image(Path(image), self.size, self.color_order)
        if console is not None and self.truncated(text):
            console.print(f"[yellow]note[/]: the text is longer than the run's {self.stage_one.text['max_length']} "
                          "tokens and is truncated, as during extraction")
        note = self.inputs.no_text_note([text])
        if console is not None and note:
            console.print(f"[yellow]note[/]: {note}", highlight=False, soft_wrap=True)
        mask = self.probabilities(img, text).argmax(0).astype(np.uint8)
        if original_size:
            mask = resize_to(mask, hw, "L")
        path = mask_path(Path(out), Path(image))
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask * 255, "L").save(path, format="PNG")
        return mask


def predict(run: Path, image: Path, text: str, out: Path, cache: Path | None = None,
            original_size: bool = PredictConfig.original_size,
            *, unet: str | None = None, text_encoder: str | None = None, device: str | None = None,
            precision: str = PredictConfig.precision, tta: str = PredictConfig.tta,
            console: Console | None = None) -> np.ndarray:
    """Segment one new image with run ``run`` (a run folder or an exported model folder); write the mask PNG ({0, 255}) to ``out`` (a file, or a
    directory → ``<stem>_mask.png``, see :func:`mask_path`) at the store's size, or at the image's own size with
    ``original_size``; return the {0, 1} uint8 mask written.

    Raises FileNotFoundError naming a missing image (before any model is loaded) and
    :class:`WeightsMismatchError` when the UNet or text encoder found differs from the recorded hashes.
    """
    image = Path(image)
    if not image.is_file():
        raise FileNotFoundError(f"image not found: {image}")
    predictor = Predictor.from_run(run, cache, unet=unet, text_encoder=text_encoder, device=device,
                                   precision=precision, tta=tta)
    warn_device(predictor, console)
    return predictor(image, text, out, original_size=original_size, console=console)


def warn_device(predictor: Predictor, console: Console | None) -> None:
    """Print :meth:`Predictor.device_note`, if any."""
    note = predictor.device_note()
    if console is not None and note:
        console.print(f"[yellow]warning[/]: {note}", highlight=False, soft_wrap=True)
