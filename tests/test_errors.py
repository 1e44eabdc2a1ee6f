"""Library errors name the caller's keyword (``steps``, ``store_format``); the CLI names its flag instead."""

from __future__ import annotations

from pathlib import Path

import pytest

from cache import gc_candidates
from common.errors import OptionError, naming
from cli_support import in_flags
from extract.config import ExtractConfig, PretrainConfig
from extract.pretrain import pretrain
from extract.run import run_extract
from helpers import error_line, quiet



def test_extract_names_store_format(tmp_path: Path) -> None:
    cfg = ExtractConfig(dataset="synthetic", unet="unused.pt", text_encoder="minilm", store_format="h6",
                        cache_dir=tmp_path)
    with pytest.raises(OptionError, match=r"^store_format must be one of") as info:
        run_extract(cfg, console=quiet())
    assert info.value.option == "store_format" and "--" not in str(info.value)
    line = error_line(["extract", "--dataset", "synthetic", "--unet", "unused.pt", "--text-encoder", "minilm",
                       "--store-format", "h6", "--cache-dir", str(tmp_path)])
    assert line.startswith("error: --store-format must be one of") and "'h6'" in line


def test_pretrain_names_crop_and_size(tmp_path: Path) -> None:
    cfg = PretrainConfig(dataset="synthetic", out=tmp_path / "pre", size=32, crop=48)
    with pytest.raises(OptionError, match=r"^crop 48 must be between 1 and size=32$") as info:
        pretrain(cfg, console=quiet())
    assert info.value.option == "crop" and info.value.options == ("crop", "size")
    line = error_line(["pretrain", "--dataset", "synthetic", "--out", str(tmp_path / "pre"), "--size", "32",
                       "--crop", "48"])
    assert line == "error: --crop 48 must be between 1 and --size 32"


def test_cache_gc_names_older_than_and_keep(tmp_path: Path) -> None:
    with pytest.raises(OptionError, match=r"older_than_days=DAYS and/or keep=N") as info:
        gc_candidates(tmp_path)
    assert info.value.option == "older_than_days" and "--" not in str(info.value)
    assert error_line(["cache", "gc", "--cache-dir", str(tmp_path)]).endswith("--older-than DAYS and/or --keep N")
    with pytest.raises(OptionError, match="^keep must be >= 0"):
        gc_candidates(tmp_path, keep=-1)
    assert error_line(["cache", "gc", "--cache-dir", str(tmp_path), "--keep", "-1"]) == \
        "error: --keep must be >= 0, got -1"


def test_in_flags_turns_only_the_named_keywords() -> None:
    e = OptionError("out is not empty: pass resume=True, or out=DIR; text_encoder='minilm' keep=3", "out", "resume",
                    "text_encoder")
    assert in_flags(e) == "--out is not empty: pass --resume, or --out DIR; --text-encoder minilm keep=3"
    path = OptionError("/runs/out is not empty: choose another out=DIR (not my_out=1 or x/out=2)", "out")
    assert in_flags(path) == "/runs/out is not empty: choose another --out DIR (not my_out=1 or x/out=2)"
    spaced = naming(PermissionError(13, "pass a writable cache_dir='a b'"), "cache_dir")
    assert in_flags(spaced) == "[Errno 13] pass a writable --cache-dir 'a b'"
    assert in_flags(ValueError("steps=3")) == "steps=3"  # names no keywords: as it is
