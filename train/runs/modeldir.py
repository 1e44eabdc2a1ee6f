"""An exported model folder (``pipeline export``), laid out as a Hugging Face Hub model repository, and
:class:`StageOne`: what made a run's features, which is all a predictor needs besides the weights.

A model folder holds::

    config.json        the run's config.json less its local paths (``head``, ``blocks``, ``steps``, the fit
                       settings, dataset, training ids) and :meth:`StageOne.to_json`: the store's preprocessing,
                       the UNet (its file name, preset if any, flags and sha256: no path), the text encoder (its
                       name, weights and tokenizer sha256, dim, max length), noise seed, compute dtype, UNet
                       batch shape
    model.safetensors  the model's state dict (safetensors: no pickle; ``safetensors.numpy.load_file`` reads it)
    README.md          the model card, with the YAML front matter the Hub reads

Nothing in the folder names a place on the machine that wrote it: ``predict`` finds the UNet by
:meth:`StageOne.unet_spec` (a file of the recorded name beside config.json or in the models folder). This
module is the only one that names these files (as :mod:`train.runs.rundir` names a run folder's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import atomic
from train.runs.rundir import RUN_ENTRIES, WEIGHTS, load_state_file, read_json, read_run_json, save_weights, write_json

if TYPE_CHECKING:
    import torch

    from cache.store import FeatureStore

__all__ = ["FORMAT", "FORMAT_VERSION", "MODEL_CARD", "MODEL_CONFIG", "MODEL_WEIGHTS", "StageOne", "export_again",
           "is_local", "is_model_dir", "placeholder", "read_model_dir", "write_model_dir"]

FORMAT = "textdiff-model"
FORMAT_VERSION = 1
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = WEIGHTS  # model.safetensors, as in a run folder
MODEL_CARD = "README.md"
#: how the model card's front matter names its library (:func:`is_model_dir` of a folder whose config is damaged)
CARD_LIBRARY = "library_name: textdiff"


def is_local(spec: str) -> bool:
    """``spec`` names a place on this machine (an absolute path, or one that exists here), not a name another
    machine resolves as well (a UNet preset, a text encoder's name or Hub id)."""
    path = Path(spec).expanduser()
    return path.is_absolute() or path.exists()


def placeholder(spec: str) -> str:
    """``spec`` as another machine may read it: a local path as its file or folder name in angle brackets
    (``/data/MoNuSeg`` → ``<MoNuSeg>``), a name as it is."""
    return f"<{Path(spec).expanduser().name}>" if is_local(spec) else spec


def _checkpoints() -> Any:
    """:mod:`extract.checkpoints`, imported on first use (it loads the UNet's code, which a fit never needs)."""
    import extract.checkpoints

    return extract.checkpoints


def _unet_file(source: str | None) -> str | None:
    """The checkpoint file name of a recorded UNet: a preset's file, or a path's last part."""
    if not source:
        return None
    presets = _checkpoints().PRESETS
    return presets[source].filename if source in presets else Path(source).name


@dataclass(frozen=True)
class StageOne:
    """What made a run's features: its store's key (preprocessing, UNet, text encoder, noise seed, compute
    dtype), the store's UNet batch shape and token width, and where the store found its UNet and text
    encoder. Read from a store (:meth:`of_store`) or a model folder's config.json (:meth:`from_json`)."""

    preprocessing: dict[str, Any]      # size, image_resize, color_order, ...
    unet: dict[str, Any]               # flags, weights_sha256
    text: dict[str, Any]               # source_name, weights_sha256, tokenizer_sha256, dim, max_length
    noise_seed: int
    compute_dtype: str
    forward_batch: int | None          # UNet samples per forward, zero padding included (None: older stores)
    token_dim: int
    unet_source: str | None            # a preset name or a checkpoint path, as extract recorded it (a model
                                       # folder: its preset, or the path an older export recorded)
    unet_file: str | None              # the checkpoint's file name (a preset's: its published file)
    text_encoder_source: str | None    # a name (minilm, ...) or a folder, as extract recorded it
    key_hash: str                      # the store's key hash (provenance)
    where: str                         # "store PATH" / "model folder PATH", for messages
    recorded_by: str                   # who records the hashes, for messages
    folder: Path | None = None         # the model folder it was read from (None: a store)
    device_type: str | None = None     # where the features were computed (cpu, cuda; None: older stores)

    @property
    def size(self) -> int:
        return int(self.preprocessing["size"])

    @property
    def color_order(self) -> str:
        return str(self.preprocessing.get("color_order", "rgb"))

    @property
    def unet_preset(self) -> str | None:
        """The UNet's preset name, if it was one."""
        return self.unet_source if self.unet_source in _checkpoints().PRESETS else None

    @classmethod
    def of_store(cls, store: FeatureStore) -> StageOne:
        """A store's (its key, and what ``extract`` recorded in its attributes)."""
        key, made = store.key, dict(store.attrs.get("extract") or {})
        batch = store.attrs.get("forward_batch")
        return cls(preprocessing=dict(key["preprocessing"]), unet=dict(key["unet"]), text=dict(key["text"]),
                   noise_seed=int(key["noise_seed"]), compute_dtype=key.get("compute_dtype", "float32"),
                   forward_batch=int(batch) if batch else None, token_dim=int(store.attrs["token_dim"]),
                   unet_source=made.get("unet"), unet_file=_unet_file(made.get("unet")),
                   text_encoder_source=made.get("text_encoder"),
                   key_hash=store.key_hash, where=f"store {store.path}", recorded_by="the run's cache key",
                   device_type=store.attrs.get("device_type"))

    def to_json(self) -> dict[str, Any]:
        """Its entries of a model folder's config.json: names, never a local path (the UNet by its file name,
        preset and sha256; a text encoder from a local folder by its ``source_name`` alone)."""
        text = self.text_encoder_source
        return {"preprocessing": self.preprocessing,
                "unet": {"file": self.unet_file, "preset": self.unet_preset, **self.unet},
                "text_encoder": {"source": None if text is None or is_local(text) else text, **self.text},
                "noise_seed": self.noise_seed,
                "compute_dtype": self.compute_dtype, "forward_batch": self.forward_batch,
                "token_dim": self.token_dim, "store_key_hash": self.key_hash, "device_type": self.device_type}

    @classmethod
    def from_json(cls, config: dict[str, Any], folder: Path) -> StageOne:
        """From a model folder's config.json (:meth:`to_json`'s entries; an older export's ``unet.source``, a
        path or preset, is read too)."""
        try:
            unet, text = dict(config["unet"]), dict(config["text_encoder"])
            path, preset, file = (unet.pop(k, None) for k in ("source", "preset", "file"))
            return cls(preprocessing=dict(config["preprocessing"]), unet=unet, text=text,
                       noise_seed=int(config["noise_seed"]), compute_dtype=config.get("compute_dtype", "float32"),
                       forward_batch=config.get("forward_batch"), token_dim=int(config["token_dim"]),
                       unet_source=path or preset, unet_file=file or _unet_file(path or preset),
                       text_encoder_source=text.pop("source", None), key_hash=config.get("store_key_hash", ""),
                       where=f"model folder {folder}", recorded_by=f"{Path(folder) / MODEL_CONFIG}",
                       folder=Path(folder), device_type=config.get("device_type"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{Path(folder) / MODEL_CONFIG}: not a textdiff model config ({e!r} missing or "
                             f"malformed); {export_again(folder)}") from None

    def unet_places(self) -> list[Path]:
        """Where a model folder looks for a file of the UNet's recorded name: beside its config.json, then in
        the models folder (a store: nowhere, it records where its UNet was)."""
        return [self.folder, _checkpoints().models_dir()] if self.folder is not None and self.unet_file else []

    def unet_spec(self) -> str:
        """Where the UNet is when no ``unet`` is passed: a store's recorded preset or path; for a model folder,
        the path an older export recorded if it is still there, else the first of :meth:`unet_places` holding
        a file (or a diffusers folder) of the recorded name. :class:`UNetNotFoundError` (one line naming them) when
        none does."""
        source = self.unet_source
        if source and (self.folder is None or (not self.unet_preset and Path(source).exists())):
            return source
        name = self.unet_file or ""
        found = [place / name for place in self.unet_places() if name and (place / name).exists()]
        if found:
            return str(found[0])
        raise _checkpoints().UNetNotFoundError(self._unet_missing())

    def _unet_missing(self) -> str:
        """The one line saying which UNet checkpoint was looked for, and where."""
        sha, source = self.unet["weights_sha256"], self.unet_source
        if not self.unet_places():
            return (f"{self.where} does not record which UNet checkpoint made it; pass unet=PATH to the checkpoint "
                    f"with sha256 {sha}")
        preset = _checkpoints().PRESETS[source].url if self.unet_preset else None
        named = f"preset {source}, published at {preset}; " if preset else ""
        gone = f" nor at {source}, where it was exported from" if source and not preset else ""
        return (f"{self.where} needs the UNet checkpoint {self.unet_file} ({named}sha256 {sha}), found neither "
                f"beside its {MODEL_CONFIG} ({self.folder}) nor in the models folder ({_checkpoints().models_dir()}, "
                f"$TEXTDIFF_MODELS_DIR){gone}; put it there or pass unet=PATH")


def export_again(folder: Path) -> str:
    """What to do about a damaged file of the model folder ``folder``."""
    return f"export the run again (`pipeline export RUN --out {folder}`)"


def is_model_dir(path: Path) -> bool:
    """``path`` is a folder written by ``pipeline export``: its config.json says so, or (that file damaged or
    gone, an export cut short) its model card's front matter names textdiff as its library."""
    path = Path(path)
    try:
        if read_json(path / MODEL_CONFIG).get("format") == FORMAT:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    card = path / MODEL_CARD
    try:
        return card.is_file() and CARD_LIBRARY in card.read_text(errors="replace").split("\n---", 1)[0]
    except OSError:
        return False


def read_model_dir(path: Path) -> tuple[dict[str, Any], StageOne, dict[str, torch.Tensor]]:
    """A model folder's config, its :class:`StageOne` and its state dict (CPU tensors, from safetensors); a file
    missing or damaged is one :class:`train.runs.rundir.RunFileError` naming it."""
    path = Path(path)
    if not is_model_dir(path):
        raise FileNotFoundError(f"{path / MODEL_CONFIG} not found or not a textdiff model config: is {path} a "
                                f"`pipeline export` folder?")
    remedy = export_again(path)
    config = read_run_json(path / MODEL_CONFIG, {k: v for k, v in RUN_ENTRIES.items() if k != "cache"}, remedy)
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path / MODEL_CONFIG}: format_version {config.get('format_version')}, this textdiff "
                         f"reads {FORMAT_VERSION}")
    stage = StageOne.from_json(config, path)
    return config, stage, load_state_file(path / MODEL_WEIGHTS, remedy=remedy)


def write_model_dir(out: Path, config: dict[str, Any], state: dict[str, torch.Tensor], card: str) -> None:
    """Write a model folder: ``config`` (with the format marked), the weights and the card, each atomically
    (temporary file, then rename); the config last, so that a folder without it was not finished."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_CONFIG).unlink(missing_ok=True)
    save_weights(out, state)  # model.safetensors, as a run folder's
    atomic.write_text(out / MODEL_CARD, card)
    write_json(out / MODEL_CONFIG, {"format": FORMAT, "format_version": FORMAT_VERSION, **config})
