"""Stage one: a frozen diffusion UNet and a text encoder turn a dataset into cached features.

Python API (``from extract import ...``; each name is imported on first use, so that importing
``extract`` — as stage two does for the shared helpers — never loads torch models or transformers)::

    from extract import ExtractConfig, PretrainConfig, run_extract, run_pretrain
    unet = run_pretrain(PretrainConfig(dataset="synthetic", out=Path("runs/unet"), size=64, iterations=300))
    store = run_extract(ExtractConfig(dataset="synthetic", unet=str(unet), text_encoder="minilm", size=64))

Module map (layers: ``cache`` ← ``extract`` ← ``train``; ``extract`` never imports ``train``):

``config``       :class:`ExtractConfig`, :class:`PretrainConfig`: the options, their defaults and help
``run``          :func:`run_extract`: plan, then execute here or on a dask cluster
``plan``         what a store lacks, as jobs (:func:`prepare`, :func:`replan`, :func:`encode_tokens`)
``execute``      a plan's jobs through the UNet into the store, reading and writing on threads
``cluster``      the plan's jobs in shards on dask.distributed workers (``--scheduler``)
``datasets/``    dataset readers (registered by name), decoding, the synthetic set, input checks
``unet``         guided-diffusion's ADM UNet (mirrors its file); :func:`create_unet`, :func:`load_unet`
``checkpoints``  where UNet weights come from (presets, pretrain folders, files, diffusers / MONAI models)
``backbones/``   one interface for every diffusion UNet: ADM, diffusers (pixel or latent), MONAI
``diffusion``    the noise schedule, q_sample, the shared noise, ancestral sampling
``features``     :class:`FeatureExtractor`: decoder activations by forward hooks
``text``         text encoders (BioClinicalBERT, MiniLM, a local folder)
``pretrain``     :func:`pretrain` (``run_pretrain`` here): train the UNet on a dataset's unlabelled images (DDPM)
``textviews``    :func:`rewrite_text`: a text said of a dihedral view of its image (per-dataset word tables)
``shared``       the image helpers both stages use: dihedral views, value scaling
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ExtractConfig": "extract.config", "PretrainConfig": "extract.config",
    "run_extract": "extract.run", "run_pretrain": "extract.pretrain",
    "open_dataset": "extract.datasets", "Dataset": "extract.datasets", "DatasetError": "extract.datasets",
    "Item": "extract.datasets", "check_files": "extract.datasets", "read_image": "extract.datasets",
    "register": "extract.datasets",
    "UNetModel": "extract.unet", "create_unet": "extract.unet", "load_unet": "extract.unet",
    "CheckpointMismatchError": "extract.unet",
    "resolve_unet": "extract.checkpoints", "UNetSource": "extract.checkpoints",
    "UNetNotFoundError": "extract.checkpoints",
    "TextEncoder": "extract.text", "TextEncoderError": "extract.text", "load_text_encoder": "extract.text",
    "FeatureExtractor": "extract.features", "shared_noise": "extract.diffusion", "Backbone": "extract.backbones",
    "resolve_device": "common.devices", "precision_context": "common.devices",
    "rewrite_text": "extract.textviews", "mirror_text": "extract.textviews",
    "dihedral": "extract.shared", "to_unit_range": "extract.shared", "stage_progress": "common.progress",
}

_RENAMED = {"run_pretrain": "pretrain"}  # ``extract.pretrain`` is the module; its function is run_pretrain here

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'extract' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), _RENAMED.get(name, name))
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
