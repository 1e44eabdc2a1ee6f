"""A finished run's (or an exported model folder's) model, rebuilt through the registry from its files, each
file named (with what to do) when it does not make the model; and a TextDiff head saved in a run folder's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cache.store import FeatureStore
from common.statedict import mismatch
from common.devices import resolve_device
from train.nets.head import TextDiffHead
from train.registry import IDENTITY_KEYS, spec_of
from train.runs import rundir
from train.runs.modeldir import MODEL_CONFIG, MODEL_WEIGHTS, StageOne, export_again, read_model_dir
from train.runs.rundir import Malformed, open_run, read_model_files, reading

__all__ = ["load_head", "load_model_dir", "load_run", "save_head"]


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
    :func:`common.devices.resolve_device`, None = auto) and the store it was trained on (``cache``, or the one
    it recorded; a store with another key is refused)."""
    run = Path(run)
    config, store = open_run(run, cache)
    head, state = read_model_files(run)
    files = (run / rundir.CONFIG, rundir.weights_file(run))
    return config, _model({**config, "head": head}, state, device, files, rundir.REFIT), store


def load_model_dir(path: Path, device: str | torch.device | None = "cpu") -> tuple[dict[str, Any], nn.Module, StageOne]:
    """An exported model folder's config, its model (eval mode, on ``device``) and what made its features
    (:class:`train.runs.modeldir.StageOne`): all :class:`train.inference.predictor.Predictor` needs, without a store."""
    path = Path(path)
    config, stage, state = read_model_dir(path)
    files = (path / MODEL_CONFIG, path / MODEL_WEIGHTS)
    return config, _model(config, state, device, files, export_again(path)), stage


def save_head(head: TextDiffHead, directory: Path | str) -> Path:
    """Write ``head`` in a run folder's layout (``config.json``'s ``head``: its identity; ``model.safetensors``)."""
    rundir.write_model_files(Path(directory), {"_class_name": type(head).__name__, **head.config}, head.state_dict())
    return Path(directory)


def load_head(directory: Path | str, map_location: str | torch.device = "cpu") -> TextDiffHead:
    """A TextDiff head from a fitted run folder or :func:`save_head`'s (strict state-dict load)."""
    config, state = read_model_files(Path(directory), map_location)
    named = config.get("_class_name", config.get("kind", TextDiffHead.__name__))
    if named != TextDiffHead.__name__:
        raise ValueError(f"{directory} holds a {named} model, not a TextDiff head")
    head = TextDiffHead(**{k: v for k, v in config.items() if k not in IDENTITY_KEYS})
    head.load_state_dict(state)
    return head
