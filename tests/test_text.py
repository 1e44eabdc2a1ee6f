"""Tests for extract/text.py: offline MiniLM, a tiny local BERT directory, max-length policy, errors."""
from __future__ import annotations

import socket
import time
from pathlib import Path

import numpy as np
import pytest

from extract.text import TextEncoder, TextEncoderError, choose_max_length, load_text_encoder

TINY_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "lesion", "##s", "in", "upper", "lower",
              "left", "right", "lung", "and", "."]
CAPTION = "Bilateral pulmonary infection, two infected areas, upper left lung and lower right lung."


def _no_network(*args, **kwargs):
    raise AssertionError("text encoder tried to open a network connection")


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    """The bundled MiniLM, loaded with HF_HUB_OFFLINE=1 and sockets blocked."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", _no_network)
        return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A seeded 1-layer BertModel (hidden 32, 64 positions) with a 16-word WordPiece vocab."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("tiny_bert")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(TINY_VOCAB) + "\n")
    out = root / "model"
    BertTokenizer(vocab=str(vocab), model_max_length=128).save_pretrained(out)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(TINY_VOCAB), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> TextEncoder:
    return load_text_encoder(str(tiny_dir))


def test_minilm_loads_offline(minilm):
    assert minilm.spec == "minilm"
    assert minilm.dim == 384 and minilm.model_max_length == 512
    assert Path(minilm.source, "model.safetensors").is_file()
    ident = minilm.identity()
    assert "spec" not in ident and ident["dim"] == 384
    assert ident["source_name"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert len(ident["weights_sha256"]) == 64 and ident == minilm.identity()


def test_minilm_encode_shapes_mask_padding(minilm):
    texts = ["hello world", CAPTION, ""]
    hidden, mask = minilm.encode(texts, max_length=40)
    assert hidden.shape == (3, 40, 384) and hidden.dtype == np.float32
    assert mask.shape == (3, 40) and mask.dtype == bool
    counts = minilm.token_counts(texts)
    assert counts[0] == 4 and counts[2] == 2  # [CLS] hello world [SEP]; [CLS] [SEP]
    assert mask.sum(axis=1).tolist() == counts
    for row, n in zip(mask, counts):  # right padding: tokens first, then padding
        assert row[:n].all() and not row[n:].any()
    assert np.isfinite(hidden).all()


def test_minilm_deterministic_and_text_sensitive(minilm):
    texts = ["Lesions in the upper left lung.", "Lesions in the upper left lung.", "Lesions in the lower right."]
    a, _ = minilm.encode(texts, max_length=16)
    b, _ = minilm.encode(texts, max_length=16)
    assert np.array_equal(a, b)
    assert np.array_equal(a[0], a[1])  # one text, one result: the same bits wherever it sits
    assert np.abs(a[0] - a[2]).max() > 1e-2


def test_a_texts_tokens_do_not_depend_on_its_batch(minilm, monkeypatch):
    """Every forward has the one shape (1, L): a text alone, among others, or in another order encodes to the
    same bits (a resumed extraction, a cluster shard and predict encode other batches than the first run)."""
    texts = ["Lesions in the upper left lung.", CAPTION, "", "hello world", "Bilateral pulmonary infection."]
    shapes: list[tuple[int, ...]] = []
    forward = minilm.model.forward
    monkeypatch.setattr(minilm.model, "forward", lambda **kw: (shapes.append(tuple(kw["input_ids"].shape)),
                                                               forward(**kw))[1])
    together, mask = minilm.encode(texts, max_length=24)
    assert set(shapes) == {(1, 24)} and len(shapes) == len(texts)
    for i, text in enumerate(texts):
        alone, alone_mask = minilm.encode([text], max_length=24)
        assert np.array_equal(alone[0], together[i]) and np.array_equal(alone_mask[0], mask[i])
    reordered, _ = minilm.encode(texts[::-1], max_length=24)
    assert np.array_equal(reordered[::-1], together)


def test_minilm_truncation_keeps_prefix(minilm):
    long_h, long_m = minilm.encode([CAPTION], max_length=48)
    short_h, short_m = minilm.encode([CAPTION], max_length=10)
    assert short_m.sum() == 10 and long_m.sum() == minilm.token_counts([CAPTION])[0]
    assert short_h.shape == (1, 10, 384)


def test_encode_empty_and_bad_max_length(minilm):
    hidden, mask = minilm.encode([], max_length=8)
    assert hidden.shape == (0, 8, 384) and mask.shape == (0, 8)
    with pytest.raises(TextEncoderError, match="512"):
        minilm.encode(["x"], max_length=513)
    with pytest.raises(TextEncoderError, match="max_length 2"):
        minilm.encode(["x"], max_length=2)
    with pytest.raises(TypeError, match="text 1"):
        minilm.token_counts(["ok", None])


def test_choose_max_length_default_and_requested(minilm):
    texts = ["hello world", CAPTION, "a"]
    counts = minilm.token_counts(texts)
    assert counts[0] == 4 and counts[2] == 3 and counts[1] > 10
    assert choose_max_length(minilm, texts, None) == (counts[1], 0)
    assert choose_max_length(minilm, texts, 10) == (10, 1)  # --max-length 10 cuts the caption
    assert choose_max_length(minilm, texts, 4) == (4, 1)    # exactly fitting is not truncation
    assert choose_max_length(minilm, texts, 3) == (3, 2)
    with pytest.raises(TextEncoderError, match="512"):
        choose_max_length(minilm, texts, 600)
    with pytest.raises(ValueError, match="no texts"):
        choose_max_length(minilm, [], None)


def test_choose_max_length_caps_at_model_limit(tiny):
    assert tiny.model_max_length == 64  # positions (64) < tokenizer's 128
    texts = ["the lung " * 50, "the lung"]
    assert tiny.token_counts(texts) == [102, 4]
    assert choose_max_length(tiny, texts, None) == (64, 1)


def test_tiny_local_directory(tiny, tiny_dir, minilm):
    assert tiny.spec == str(tiny_dir) and tiny.source == str(tiny_dir.resolve())
    assert tiny.dim == 32 and tiny.source_name == "model"
    # [CLS] lesion ##s in the upper left lung . [SEP]
    assert tiny.token_counts(["Lesions in the upper left lung."]) == [10]
    hidden, mask = tiny.encode(["Lesions in the upper left lung.", "the lung"], max_length=12)
    assert hidden.shape == (2, 12, 32) and mask.sum(axis=1).tolist() == [10, 4]
    ident = tiny.identity()
    assert ident["dim"] == 32 and ident["weights_sha256"] != minilm.identity()["weights_sha256"]


def test_weights_hash_is_sha256_of_weight_file(tiny, tiny_dir):
    import hashlib

    expected = hashlib.sha256((tiny_dir / "model.safetensors").read_bytes()).hexdigest()
    assert tiny.identity()["weights_sha256"] == expected


def test_bioclinicalbert_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    start = time.monotonic()
    with pytest.raises(TextEncoderError) as info:
        load_text_encoder("bioclinicalbert")
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "text_encoder='minilm'" in message and "Bio_ClinicalBERT" in message
    assert "local directory" in message and "HF_HUB_OFFLINE" in message


def test_bad_specs(tmp_path):
    with pytest.raises(TextEncoderError, match="neither a known name"):
        load_text_encoder(str(tmp_path / "no" / "such" / "dir"))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    with pytest.raises(TextEncoderError, match="config.json") as info:
        load_text_encoder(str(empty))
    assert str(empty) in str(info.value) and "text_encoder='minilm'" in str(info.value)
