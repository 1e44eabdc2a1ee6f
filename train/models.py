"""The model registry: every model a run can train, and the one forward pass of a run.

Each :class:`ModelSpec` declares how its model is built (from its constructor-argument dataclass and
the training data, or from a run's ``config.json``), what it reads from a store (``"features"``:
cached features + text tokens, :class:`train.data.SplitFeatures`, or the store's images, ``SplitImages``),
its evaluation batch-size rule and whether it needs text. fit, evaluate and predict ask the registry
and never name a model. :func:`logits` / :func:`probabilities` are the forward pass (training,
validation, evaluation and prediction alike); :func:`load_run` loads a finished run, :func:`load_model_dir` an exported model folder.

    textdiff     the TextDiff head (train/model.py) on cached diffusion features and text
    plain-unet   the plain U-Net baseline (train/plain_unet.py) on the images ("unet" in older configs)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.errors import OptionError
from cache.store import FeatureStore
from common.statedict import mismatch
from extract.devices import precision_context, resolve_device
from train.config import ALIASES, MEMORY_BUDGET_GB, MODEL_ARGS, TextDiffArgs, model_name
from train import rundir
from train.data import GIB, ImageSample, Reading, Sample, SplitData, SplitFeatures, SplitImages
from train.model import TextDiffHead
from train.modeldir import MODEL_CONFIG, MODEL_WEIGHTS, StageOne, export_again, read_model_dir
from train.plain_unet import PlainUNet
from train.rundir import IDENTITY_KEYS, Malformed, open_run, read_model_files, reading

__all__ = ["ALIASES", "IDENTITY_KEYS", "MODELS", "ModelSpec", "load_model_dir", "load_run", "logits", "model_spec", "open_split", "probabilities",
           "reading_of", "spec_of"]

_ACTIVATION_BUDGET = 1 * GIB    # per forward batch, for the upsampled, concatenated maps


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
        """What reads a new image as the store did (:class:`train.predict.FeatureInputs` / ``ImageInputs``)."""
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
    ModelSpec("textdiff", TextDiffHead, MODEL_ARGS["textdiff"], SplitFeatures, "train.predict:FeatureInputs",
              _build_head, _head_batch, lambda head: head.get("fusion", "cross-attn") != "none"),
    ModelSpec("plain-unet", PlainUNet, MODEL_ARGS["plain-unet"], SplitImages, "train.predict:ImageInputs",
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
    """What a run reads, as it was trained: its blocks, steps, padding attention and memory budget."""
    fit = config.get("fit", {})
    return Reading(tuple(config["blocks"]), tuple(config["steps"]), bool(fit.get("attend_padding", False)),
                   float(fit.get("memory_budget_gb", MEMORY_BUDGET_GB)) * GIB)


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


def _model(config: dict[str, Any], state: dict[str, torch.Tensor], device: str | torch.device | None,
           files: tuple[Path, Path], remedy: str) -> nn.Module:
    """The model of ``config`` (its ``head`` entry) with ``state``, in eval mode, on ``device``; ``files``: the
    config and weights files they were read from, one named (with ``remedy``) when they do not make a model."""
    with reading(files[0], remedy):
        model = spec_of(config).rebuild(config["head"])
    with reading(files[1], remedy):
        expected = model.state_dict()
        wrong = mismatch(expected, state)
        if wrong:
            raise Malformed(f"its tensors are not those of the model its {files[0].name} describes ({len(expected)} "
                            f"expected, {len(state)} in the file): {'; '.join(wrong)}")
        model.load_state_dict(state)
    return model.to(resolve_device(device)).eval()


def load_run(run: Path, cache: Path | str | None = None, device: str | torch.device | None = "cpu"
             ) -> tuple[dict[str, Any], nn.Module, FeatureStore]:
    """A finished run's config, its model (best weights, eval mode, on ``device``: a name for
    :func:`extract.devices.resolve_device`, None = auto) and the store it was trained on (``cache``, or the one
    it recorded; a store with another key is refused)."""
    run = Path(run)
    config, store = open_run(run, cache)
    head, state = read_model_files(run)
    files = (run / rundir.CONFIG, rundir.weights_file(run))
    return config, _model({**config, "head": head}, state, device, files, rundir.REFIT), store


def load_model_dir(path: Path, device: str | torch.device | None = "cpu") -> tuple[dict[str, Any], nn.Module, StageOne]:
    """An exported model folder's config, its model (eval mode, on ``device``) and what made its features
    (:class:`train.modeldir.StageOne`): all :class:`train.predict.Predictor` needs, without a store."""
    path = Path(path)
    config, stage, state = read_model_dir(path)
    files = (path / MODEL_CONFIG, path / MODEL_WEIGHTS)
    return config, _model(config, state, device, files, export_again(path)), stage
