"""The model registry: every model a run can train, and the one forward pass of a run.

Each :class:`ModelSpec` declares how its model is built (from its constructor-argument dataclass and
the training data, or from a run's ``config.json``), what it reads from a store (``"features"``:
cached features + text tokens, :class:`train.data.readers.SplitFeatures`, or the store's images, ``SplitImages``),
its evaluation batch-size rule and whether it needs text. fit, evaluate and predict ask the registry
and never name a model. :func:`logits` / :func:`probabilities` are the forward pass (training,
validation, evaluation and prediction alike); :mod:`train.runs.loading` loads a finished run or model folder.

    textdiff     the TextDiff head (train/nets/head.py) on cached diffusion features and text
    plain-unet   the plain U-Net baseline (train/nets/plain_unet.py) on the images ("unet" in older configs)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import OptionError
from cache.store import FeatureStore
from common.devices import precision_context
from extract.shared import dihedral
from train.config import ALIASES, MEMORY_BUDGET_GB, MODEL_ARGS, TextDiffArgs, model_name
from train.data.readers import GIB, ImageSample, Reading, Sample, SplitData, SplitFeatures, SplitImages
from train.nets.head import TextDiffHead
from train.nets.plain_unet import PlainUNet

__all__ = ["ALIASES", "IDENTITY_KEYS", "MODELS", "ModelSpec", "logits", "model_spec", "open_split", "probabilities",
           "reading_of", "spec_of"]

_ACTIVATION_BUDGET = 1 * GIB    # per forward batch, for the upsampled, concatenated maps


#: a model's identity in a run's config.json ``head`` entry, beside its constructor arguments (diffusers' way);
#: ``kind`` is how older runs named the plain U-Net
IDENTITY_KEYS = ("_class_name", "kind")


@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry: its class, its constructor-argument dataclass, the reader of a store split it
    trains and is evaluated on, and how ``predict`` reads a new image for it (``inputs``, ``module:name``, imported
    on first use: it loads the UNet's code, which a fit never needs)."""

    name: str
    model_class: type[nn.Module]
    args: type
    reader: type[SplitFeatures] | type[SplitImages]
    inputs: str
    build: Callable[[Any, SplitData, FeatureStore], nn.Module]   # untrained, from args + training data
    batch_size: Callable[[dict[str, Any], int], int]        # evaluation images per forward (head, size)
    needs_text: Callable[[dict[str, Any]], bool]            # whether a new image needs its text (head)

    @property
    def reads_features(self) -> bool:
        """It reads cached features and text tokens (else the store's images)."""
        return issubclass(self.reader, SplitFeatures)

    def identity(self, model: nn.Module) -> dict[str, Any]:
        """What a run's ``config.json`` records of ``model``: its class name and constructor arguments."""
        return {"_class_name": self.model_class.__name__, **model.config}

    def rebuild(self, head: dict[str, Any]) -> nn.Module:
        """An untrained model from a run config's ``head`` (:meth:`identity`, or an older run's arguments)."""
        return self.model_class(**{k: v for k, v in head.items() if k not in IDENTITY_KEYS})

    def new_image_inputs(self) -> Any:
        """What reads a new image as the store did (:class:`train.inference.predictor.FeatureInputs` / ``ImageInputs``)."""
        module, name = self.inputs.split(":")
        return getattr(importlib.import_module(module), name)


def _head_batch(head: dict[str, Any], size: int) -> int:
    """Images per forward pass: as many as fit _ACTIVATION_BUDGET (the concat of upsampled maps dominates), 1..8."""
    maps = len(head["in_channels"]) + (head.get("fusion") == "concat")
    per_image = 2 * maps * head["dim"] * size * size * 4  # upsampled maps + their concat, float32
    return int(min(8, max(1, _ACTIVATION_BUDGET // per_image)))


def _build_head(args: TextDiffArgs, data: Any, store: FeatureStore) -> TextDiffHead:
    return TextDiffHead(in_channels=data.channels(), text_dim=int(store.attrs["token_dim"]), **asdict(args))


def _build_unet(args: Any, data: Any, store: FeatureStore) -> PlainUNet:
    """The plain U-Net of ``args``, refused (before anything is written) where the store's size cannot be halved
    ``depth`` times."""
    if store.size % 2 ** args.depth:
        raise OptionError(f"depth {args.depth} needs an image size divisible by 2^{args.depth} = {2 ** args.depth}, "
                          f"but {store.path} holds {store.size} px images: pass a depth=N with 2^N dividing "
                          f"{store.size}", "depth")
    return PlainUNet(**asdict(args))


MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("textdiff", TextDiffHead, MODEL_ARGS["textdiff"], SplitFeatures, "train.inference.predictor:FeatureInputs",
              _build_head, _head_batch, lambda head: head.get("fusion", "cross-attn") != "none"),
    ModelSpec("plain-unet", PlainUNet, MODEL_ARGS["plain-unet"], SplitImages, "train.inference.predictor:ImageInputs",
              _build_unet, lambda head, size: 4, lambda head: False),
)}
assert MODELS.keys() == MODEL_ARGS.keys()  # one registry: train.config names each model's arguments


def model_spec(name: str) -> ModelSpec:
    """The registered model ``name`` (or its older alias)."""
    return MODELS[model_name(name)]


def spec_of(config: dict[str, Any]) -> ModelSpec:
    """The model of a run's ``config.json``: the class its ``head`` entry names (``_class_name``; an older run's
    ``kind``, or none: the TextDiff head)."""
    head = config["head"]
    if "_class_name" in head:
        found = [spec for spec in MODELS.values() if spec.model_class.__name__ == head["_class_name"]]
        if not found:
            raise ValueError(f"model class {head['_class_name']!r} is not registered (textdiff knows "
                             f"{[spec.model_class.__name__ for spec in MODELS.values()]})")
        return found[0]
    return model_spec(head.get("kind", "textdiff"))


def reading_of(config: dict[str, Any]) -> Reading:
    """What a run reads, as it was trained: its blocks, steps, padding attention, memory budget and masks (a run
    made before it recorded them: the store's)."""
    fit = config.get("fit", {})
    return Reading(tuple(config["blocks"]), tuple(config["steps"]), bool(fit.get("attend_padding", False)),
                   float(fit.get("memory_budget_gb", MEMORY_BUDGET_GB)) * GIB, mask_resize=fit.get("mask_resize"))


def open_split(spec: ModelSpec, store: FeatureStore, split: str, reading: Reading,
               indices: Any = None) -> SplitData:
    """Rows ``indices`` (default all) of ``split`` as model ``spec`` reads them."""
    return spec.reader.open(store, split, reading, indices)


def logits(model: nn.Module, sample: Sample | ImageSample, size: int) -> torch.Tensor:
    """The model's class logits (B, K, size, size) for a sample (the model's mode is left as it is)."""
    return model(**sample.inputs(), out_size=size)


@torch.no_grad()
def probabilities(model: nn.Module, sample: Sample | ImageSample, size: int, precision: str = "fp32") -> torch.Tensor:
    """Class probabilities (B, K, size, size) float32 on the model's device, in evaluation mode, the sample's
    inputs moved there and the forward run at ``precision`` (fp32 | bf16 | fp16): what evaluate and predict score."""
    model.eval()
    device = next(model.parameters()).device
    with precision_context(device, precision):
        out = logits(model, sample.to(device), size)
    return torch.softmax(out.float(), dim=1)


def undo_view(t: torch.Tensor, view: int) -> torch.Tensor:
    """``t`` (..., H, W) of dihedral view ``view`` mapped back onto the original image (the inverse of
    :func:`extract.shared.dihedral`)."""
    t = t.flip(-1) if view >= 4 else t
    return torch.rot90(t, k=-(view % 4), dims=(-2, -1))


@torch.no_grad()
def tta_probabilities(model: nn.Module, sample: Sample | ImageSample, size: int, views: Sequence[int],
                      precision: str = "fp32") -> torch.Tensor:
    """(1, K, size, size): the mean class probabilities of one image over its ``views``, each mapped back.
    ``sample`` holds that image's views in ``views``' order as one batch (one forward of len(views) samples, so
    evaluate and predict run the same arithmetic); the mean sums them in that order."""
    probs = probabilities(model, sample, size, precision)
    if probs.shape[0] != len(views):
        raise ValueError(f"{len(views)} views but a batch of {probs.shape[0]}")
    total = undo_view(probs[0], views[0])
    for k in range(1, len(views)):
        total = total + undo_view(probs[k], views[k])
    return (total / len(views))[None]


def view_sample(data: SplitData, row: int, views: Sequence[int], half: bool = False) -> Sample | ImageSample:
    """One row at each of ``views``, as one batch: a features-reading split's from a store that holds the views
    (:func:`extract.tta.tta_store`), an images-reading split's by turning its image (:func:`extract.shared.dihedral`)."""
    if isinstance(data, SplitImages):
        image = data.batch([row]).image[0].numpy()
        stacked = np.stack([dihedral(image, v) for v in views])
        return ImageSample(torch.from_numpy(stacked), data.targets([row] * len(views), [0] * len(views)))
    return data.batch([row] * len(views), list(views), half=half)
