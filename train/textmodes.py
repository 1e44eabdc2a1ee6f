"""Which text a head is given: at evaluation (``evaluate --text``) and in training (``fit --text-dropout``).

The modes of an evaluation (:data:`TEXT_MODES`), each against the same features and masks:

    as-is      each image's own text (the plain evaluation, ``eval-<split>/``)
    none       every token withheld (:meth:`train.data.readers.Sample.withhold_text`)
    shuffled   each image gets another image's text: a seeded derangement of the split's stored token rows
    mirrored   each image's text with its positional words swapped (left ↔ right, upper ↔ lower:
               :func:`extract.textviews.mirror_text`), re-encoded with the store's own text encoder

Text dropout withholds the whole text of a training sample with probability p, the same helper as
``none``; whether sample k of epoch e is withheld is a function of (seed, e, k) (:func:`dropped`), so a
fit stays bit-identical on a CPU and a resumed fit needs no extra random state. A model that reads no
text (the plain U-Net, ``fusion="none"``) is refused both (:func:`check_reads_text`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from common.errors import OptionError
from cache.store import FeatureStore
from train.config import TEXT_MODES
from train.data.readers import SplitData
from train.registry import ModelSpec

__all__ = ["TEXT_MODES", "apply_text_mode", "check_reads_text", "check_text_mode", "derangement", "dropped"]

_DROPOUT_STREAM = 0x7E47  # keeps the dropout draws apart from every other generator seeded with the fit's seed


def check_text_mode(text: str) -> None:
    """Refuse a mode other than :data:`TEXT_MODES` (an :class:`OptionError` naming ``text``)."""
    if text not in TEXT_MODES:
        raise OptionError(f"text must be one of {list(TEXT_MODES)}, got {text!r}", "text")


def check_reads_text(spec: ModelSpec, head: dict[str, Any], setting: str, keyword: str, owner: str = "") -> None:
    """Refuse ``setting`` (``keyword=VALUE``, an :class:`OptionError` naming ``keyword``) for a model that reads
    no text; ``owner``: whose model it is (a run), for the message."""
    if not spec.needs_text(head):
        kind = spec.name if spec.name != "textdiff" else f"textdiff, fusion {head.get('fusion')!r}"
        raise OptionError(f"{setting} needs a model that reads text; {owner or 'this model'} ({kind}) reads none",
                          keyword)


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of ``range(n)`` with no fixed point (Sattolo's algorithm: one random cycle),
    so that ``perm[k] != k`` for every k; n >= 2."""
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # j < i: never in place
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def dropped(seed: int, epoch: int, n: int, p: float) -> torch.Tensor:
    """(n,) bool: which of the ``n`` training samples (positions in the training selection) have their text
    withheld in ``epoch``, each with probability ``p``; a function of (seed, epoch, sample) alone."""
    draws = np.random.default_rng([_DROPOUT_STREAM, seed, epoch]).random(n)
    return torch.from_numpy(draws < p)


def apply_text_mode(data: SplitData, text: str, store: FeatureStore, *, seed: int = 0,
                    text_encoder: str | None = None, device: str = "cpu") -> None:
    """Give ``data``'s rows the text of mode ``shuffled`` or ``mirrored`` (their tokens, masks and texts);
    ``as-is`` and ``none`` leave ``data`` as it is (``none`` withholds per batch). ``seed``: the derangement's;
    ``text_encoder``: where the store's encoder is, if it moved (``mirrored``; its hashes are checked)."""
    check_text_mode(text)
    if text == "shuffled":
        if len(data) < 2:
            raise OptionError(f"text='shuffled' needs at least 2 images in the split, it has {len(data)}", "text")
        perm = derangement(len(data), seed)
        tokens, mask = data.text_rows()
        data.replace_text(tokens[perm], mask[perm], [data.texts[p] for p in perm])
    elif text == "mirrored":
        tokens, mask, texts = _mirrored(data.texts, store, text_encoder, device)
        data.replace_text(tokens, mask, texts)


def _mirrored(texts: list[str], store: FeatureStore, text_encoder: str | None, device: str
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The texts mirrored, and their tokens from the store's encoder at its length, rounded as the store keeps them."""
    from extract.textviews import mirror_text
    from train.runs.stage_one import store_text_encoder

    mirrored = [mirror_text(t, store.key["dataset"].get("name", "")) for t in texts]
    encoder = store_text_encoder(store, text_encoder, device)
    emb, mask = encoder.encode(mirrored, int(store.key["text"]["max_length"]))
    return np.asarray(emb).astype(np.float16), np.asarray(mask, dtype=bool), mirrored
