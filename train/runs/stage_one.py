"""What made a run's features, found and checked: its UNet checkpoint and text encoder, refused unless their
bytes are the ones the store's key (or a model folder's config.json) records: a path says nothing about content.
"""

from __future__ import annotations

from pathlib import Path

from common.errors import OptionError
from cache.store import FeatureStore
from extract.checkpoints import Source, UNetNotFoundError, recorded_flags, resolve_unet
from extract.text import TextEncoder, load_text_encoder, tokenizer_files, weight_files
from train.runs.modeldir import StageOne

__all__ = ["WeightsMismatchError", "load_checked_encoder", "resolve_checked_unet", "store_text_encoder"]

_MISMATCH = "features computed with it would not match the ones the head was trained on"


class WeightsMismatchError(ValueError):
    """A UNet checkpoint or text encoder whose content differs from the run's cache key."""

    options = ("unet", "text_encoder")  # the keywords its messages may name (common.errors)


def resolve_checked_unet(spec: str | None, stage: StageOne) -> Source:
    """The UNet source for ``spec`` (None: where ``stage`` finds it, :meth:`StageOne.unet_spec`) with the recorded
    flags (and conditioning), refused unless its bytes (and, for another backbone, its whole identity: configs,
    schedule, VAE) are the recorded ones."""
    expected = stage.unet["weights_sha256"]
    spec = spec or stage.unet_spec()
    try:
        src = resolve_unet(spec, recorded_flags(stage.unet), stage.unet.get("condition") or "empty")
    except UNetNotFoundError as e:
        made = stage.unet_source or stage.unet_file
        raise UNetNotFoundError(f"{e}\n  ({stage.where} was made with UNet {made!r}, sha256 {expected}; if the "
                                f"file moved, pass unet=PATH)") from None
    got = src.identity()["weights_sha256"]
    if got != expected:
        raise WeightsMismatchError(
            f"UNet checkpoint {src.checkpoint} has sha256 {got}, but {stage.recorded_by} records {expected}: "
            f"{_MISMATCH}. Pass unet=PATH to the checkpoint the store was extracted with.")
    if "kind" in stage.unet and src.identity() != stage.unet:
        differ = sorted(k for k in {*src.identity(), *stage.unet} if src.identity().get(k) != stage.unet.get(k))
        raise WeightsMismatchError(f"UNet {spec!r} differs from what {stage.recorded_by} records in "
                                   f"{', '.join(differ)}: {_MISMATCH}")
    return src


def load_checked_encoder(spec: str | None, stage: StageOne, device: str) -> TextEncoder:
    """The text encoder ``spec``, refused unless its weights and tokenizer are the recorded ones."""
    text_key = stage.text
    if not spec:
        raise OptionError(f"{stage.where} does not record which text encoder made it; pass text_encoder=... "
                          f"the one named {text_key.get('source_name')!r} in its key", "text_encoder")
    encoder = load_text_encoder(spec, device=device)
    ident = encoder.identity()
    source = Path(encoder.source)
    for what, field, files in (("weights", "weights_sha256", weight_files(source)),
                               ("tokenizer", "tokenizer_sha256", tokenizer_files(source))):
        if ident[field] != text_key[field]:
            names = ", ".join(str(p) for p in files)
            raise WeightsMismatchError(
                f"text encoder {spec!r} {what} ({names}) have sha256 {ident[field]}, but {stage.recorded_by} "
                f"records {text_key[field]} ({text_key.get('source_name')}): {_MISMATCH}. "
                f"Pass text_encoder=DIR holding the encoder the store was extracted with.")
    if ident["dim"] != text_key["dim"]:
        raise WeightsMismatchError(f"text encoder {spec!r} is {ident['dim']}-d, {stage.recorded_by} says "
                                   f"{text_key['dim']}")
    return encoder


def store_text_encoder(store: FeatureStore, text_encoder: str | None = None, device: str = "cpu") -> TextEncoder:
    """The text encoder that made ``store`` (``text_encoder``, if it moved; else the one the store recorded),
    refused unless its weights and tokenizer are the ones its key records."""
    stage = StageOne.of_store(store)
    return load_checked_encoder(text_encoder or stage.text_encoder_source, stage, device)


