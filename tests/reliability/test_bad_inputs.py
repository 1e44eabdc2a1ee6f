"""Bad inputs, one row each: ``pipeline extract`` on a small copy of the real MoNuSeg data (or QaTa's JSON
layout, or the generic CSV layout) with one thing broken. Each row says what the command must do:

- ``error``: exit 1 with one line ``error: ...`` holding the given words (the file or argument, and what
  is wrong), no traceback, and the cache folder byte-for-byte as it was (a lock file aside);
- ``note``: a well-defined conversion: exit 0 with a ``note`` line holding the words; the store that was
  already there is byte-for-byte unchanged.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cache.store import FeatureStore
from extract.datasets import DatasetError, check_files, open_dataset
from tests.reliability.conftest import (LVIT_FOLDERS, Result, child, cli, digest, extract_args, finish, mini_folder,
                                        mini_qata, read_xlsx, stores, unet_dir, write_xlsx)


def unlocked(files: dict[str, str]) -> dict[str, str]:
    """A cache folder's digest less its lock files (they hold the last writer's pid)."""
    return {k: v for k, v in files.items() if not k.endswith(".lock")}


def first(root: Path, split: str, kind: str) -> Path:
    """The first image (``kind="image"``) or mask of a split of the mini MoNuSeg copy."""
    return sorted((root / LVIT_FOLDERS[split] / ("img" if kind == "image" else "labelcol")).iterdir())[0]


def table(root: Path, split: str = "train") -> Path:
    folder = LVIT_FOLDERS[split]
    return root / folder / f"{folder.split('_')[0]}_text.xlsx"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def replace_image(path: Path, make: Callable[[np.ndarray], Image.Image]) -> None:
    """Rewrite an image file (same name and format) as ``make(its RGB pixels)``."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    make(rgb).save(path)


def set_text(root: Path, text: str, row: int = 1) -> None:
    rows = read_xlsx(table(root))
    rows[row][1] = text
    write_xlsx(table(root), rows)


def edit_rows(root: Path, edit: Callable[[list], list]) -> None:
    """Rewrite the training split's XLSX table's rows (header kept) as ``edit(rows)``."""
    rows = read_xlsx(table(root))
    write_xlsx(table(root), [rows[0], *edit(rows[1:])])


def edit_csv(root: Path, edit: Callable[[list], list]) -> None:
    """Rewrite the folder layout's texts.csv lines (header kept) as ``edit(lines)``."""
    lines = (root / "texts.csv").read_text().splitlines()
    (root / "texts.csv").write_text("\n".join([lines[0], *edit(lines[1:])]) + "\n")


def edit_json(root: Path, edit: Callable[[list], list]) -> None:
    """Rewrite the training entries of QaTa's annotation.json as ``edit(entries)``."""
    path = root / "prompts" / "annotation.json"
    ann = json.loads(path.read_text())
    ann["train"] = edit(ann["train"])
    path.write_text(json.dumps(ann))


def drop_first(rows: list) -> list:
    return rows[1:]


def repeat_first(rows: list) -> list:
    return [rows[0], *rows]


# --------------------------------------------------------------------------- cases

@dataclass
class Case:
    id: str
    expect: str                                        # "error" | "note" | "ok"
    words: list[str | Callable[[Path], str]]           # in the error / note line; a callable gets the root
    breaks: Callable[[Path, Path, Path], list[str]]    # (root, cache, tmp) → extra CLI arguments
    dataset: str = "monuseg"
    check: Callable[[Path, Result], None] | None = field(default=None)


def _none(*_: Path) -> list[str]:
    return []


def _do(fn: Callable[[Path], object]) -> Callable[[Path, Path, Path], list[str]]:
    """A breakage that only touches the dataset folder."""
    def breaks(root: Path, _cache: Path, _tmp: Path) -> list[str]:
        fn(root)
        return []
    return breaks


def _name(split: str, kind: str) -> Callable[[Path], str]:
    return lambda root: first(root, split, kind).name


def other_flags(_root: Path, _cache: Path, tmp: Path) -> list[str]:
    flags = json.loads((unet_dir() / "adm_tiny_flags.json").read_text())
    flags["num_channels"] *= 2
    (tmp / "flags.json").write_text(json.dumps(flags))
    return ["--unet-flags", str(tmp / "flags.json")]


def nan_weights(_root: Path, _cache: Path, tmp: Path) -> list[str]:
    sd = torch.load(unet_dir() / "adm_tiny.pt", weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point() and v.numel() > 1)
    sd[key] = sd[key].clone()
    sd[key].view(-1)[0] = float("nan")
    torch.save(sd, tmp / "nan.pt")
    return ["--unet", str(tmp / "nan.pt")]


def store_of_other_config(root: Path, cache: Path, tmp: Path) -> list[str]:
    """The good store, copied to where `--seed 1` (another noise) would write its own."""
    res = cli(extract_args(root, tmp / "scratch", "--seed", "1"))
    assert res.code == 0, res.stderr
    shutil.copytree(stores(cache)[0], cache / stores(tmp / "scratch")[0].name)
    return ["--seed", "1"]


def non_ascii_kept(root: Path, res: Result) -> None:
    store = FeatureStore.open(res.stdout.strip().splitlines()[-1])
    assert NON_ASCII in store.texts("train")


NON_ASCII = "Kerne dicht gepackt, Größe ≈ 5 µm — 細胞核が密集"

CASES = [
    Case("truncated-png", "error", [_name("train", "image"), "truncated"],
         _do(lambda r: truncate(first(r, "train", "image")))),
    Case("truncated-tiff", "error", [_name("test", "image"), "cannot read image"],
         _do(lambda r: truncate(first(r, "test", "image")))),
    Case("not-an-image", "error", [_name("train", "image"), "cannot read image"],
         _do(lambda r: first(r, "train", "image").write_text("this is a note, not a picture\n"))),
    Case("image-16-bit", "note", [_name("train", "image"), "16-bit, scaled to 8 bits"],
         _do(lambda r: replace_image(first(r, "train", "image"),
                                     lambda a: Image.fromarray(a[..., 1].astype(np.uint16) * 257)))),
    Case("image-rgba", "note", [_name("train", "image"), "alpha dropped"],
         _do(lambda r: replace_image(first(r, "train", "image"),
                                     lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 200, np.uint8)]))))),
    Case("image-grayscale", "note", [_name("train", "image"), "grayscale, replicated to RGB"],
         _do(lambda r: replace_image(first(r, "train", "image"), lambda a: Image.fromarray(a[..., 0])))),
    Case("image-mask-sizes-differ", "error", [_name("train", "mask"), "mask is 500x500 px but its image"],
         _do(lambda r: Image.open(first(r, "train", "mask")).resize((500, 500), Image.Resampling.NEAREST)
             .save(first(r, "train", "mask")))),
    Case("mask-not-binary", "error", [_name("train", "mask"), "are not binary"],
         _do(lambda r: replace_image(first(r, "train", "mask"),
                                     lambda a: Image.fromarray(np.where(a[..., 0] > 0, 255, 128).astype(np.uint8))))),
    Case("mask-empty", "note", [_name("train", "mask"), "empty mask"],
         _do(lambda r: replace_image(first(r, "train", "mask"),
                                     lambda a: Image.fromarray(np.zeros(a.shape[:2], np.uint8))))),
    Case("xlsx-missing-row", "error", ["Train_text.xlsx", "no text for this image"],
         _do(lambda r: edit_rows(r, drop_first))),
    Case("xlsx-duplicate-row", "error", ["Train_text.xlsx", "row 3", "already has a text"],
         _do(lambda r: edit_rows(r, repeat_first))),
    Case("csv-missing-row", "error", ["texts.csv", "no text for this image"],
         _do(lambda r: edit_csv(r, drop_first)), dataset="folder"),
    Case("csv-duplicate-row", "error", ["texts.csv", "row 3", "already has a text"],
         _do(lambda r: edit_csv(r, repeat_first)), dataset="folder"),
    Case("json-missing-entry", "error", ["annotation.json", "no text for this image"],
         _do(lambda r: edit_json(r, drop_first)), dataset="qata"),
    Case("json-duplicate-entry", "error", ["annotation.json", "train[1]", "already has a text"],
         _do(lambda r: edit_json(r, repeat_first)), dataset="qata"),
    Case("text-non-ascii", "ok", [], _do(lambda r: set_text(r, NON_ASCII)), check=non_ascii_kept),
    Case("text-empty", "error", ["Train_text.xlsx", "row 2", "empty text"], _do(lambda r: set_text(r, "   "))),
    Case("text-10000-characters", "note", ["longer than", "truncated"],
         _do(lambda r: set_text(r, ("The nuclei are dense. " * 500)[:10_000]))),
    Case("checkpoint-for-other-flags", "error", ["adm_tiny.pt", "does not fit the UNet flags"], other_flags),
    Case("checkpoint-with-nan", "error", ["nan.pt", "NaN or infinite"], nan_weights),
    Case("store-of-another-configuration", "error", ["made with another configuration", "noise_seed"],
         store_of_other_config),
    Case("argument-steps", "error", ["--steps", "[0, 999]"], lambda *_: ["--steps", "50,5000"]),
    Case("argument-blocks", "error", ["--blocks", "out of range"], lambda *_: ["--blocks", "4,99"]),
    Case("argument-augment", "error", ["--augment", "'d8'"], lambda *_: ["--augment", "d8"]),
    Case("argument-data-root", "error", ["no-such-folder", "not found"],
         lambda root, *_: ["--data-root", str(root / "no-such-folder")]),
]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input(c: Case, case: tuple[Path, Path], tmp_path: Path) -> None:
    root, cache = case
    if c.dataset == "folder":
        root = mini_folder(tmp_path / "folder")
    elif c.dataset == "qata":
        root = mini_qata(tmp_path / "qata")
    extra = c.breaks(root, cache, tmp_path)
    before = digest(cache)
    res = cli(extract_args(root, cache, *extra, dataset=c.dataset))
    after = digest(cache)
    words = [w(root) if callable(w) else w for w in c.words]
    if c.expect == "error":
        assert res.code == 1, res.stderr
        line = res.error_line()
        assert all(w in line for w in words), (words, line)
        others = [ln for ln in res.stderr.strip().splitlines()[:-1] if not ln.startswith("check ")]
        assert not others, res.stderr  # nothing but the file check's progress line before the error
        assert unlocked(after) == unlocked(before)  # nothing written
    else:
        assert res.code == 0, res.stderr
        assert {k: after.get(k) for k in before} == before  # the existing store untouched
        if c.expect == "note":
            notes = [ln for ln in res.stderr.splitlines() if ln.startswith("note")]
            assert any(all(w in ln for w in words) for ln in notes), (words, res.stderr)
    if c.check:
        c.check(root, res)


def test_read_only_cache_folder(case: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache folder nobody may write: a complete store there is still used; new work is refused clearly."""
    root, cache = case
    if os.geteuid() == 0:  # root ignores permission bits: make the folder refuse writes the way a read-only mount does
        real_open, real_mkdir = os.open, os.mkdir

        def refuse(path, *a, **kw):
            flags = a[0] if a else kw.get("flags", 0)
            if str(path).startswith(str(cache)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, *a, **kw)

        def refuse_mkdir(path, *a, **kw):
            if str(path).startswith(str(cache)):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_mkdir(path, *a, **kw)

        monkeypatch.setattr(os, "open", refuse)
        monkeypatch.setattr(os, "mkdir", refuse_mkdir)
    else:
        for p in [cache, *cache.rglob("*")]:
            p.chmod(0o555 if p.is_dir() else 0o444)
    before = digest(cache)
    complete = cli(extract_args(root, cache))
    assert complete.code == 0 and "nothing to do" in complete.stderr, complete.stderr
    new_work = cli(extract_args(root, cache, "--steps", "50,150,250"))
    assert new_work.code == 1
    line = new_work.error_line()
    assert str(cache) in line and "not writable" in line
    assert digest(cache) == before


def test_debug_shows_the_traceback(good: tuple[Path, Path], tmp_path: Path) -> None:
    """--debug: the same failure raises (the traceback) instead of the one-line error."""
    with pytest.raises(ValueError, match=r"--steps must lie in \[0, 999\]"):
        cli(["--debug", *extract_args(good[0], tmp_path / "cache", "--steps", "50,5000")])


def test_skip_bad_drops_the_bad_files(case: tuple[Path, Path]) -> None:
    """--skip-bad: a truncated image and a non-binary mask are left out (and listed), the rest extracted."""
    root, cache = case
    truncate(first(root, "train", "image"))
    replace_image(first(root, "val", "mask"),
                  lambda a: Image.fromarray(np.where(a[..., 0] > 0, 255, 7).astype(np.uint8)))
    res = cli(extract_args(root, cache, "--skip-bad"))
    assert res.code == 0, res.stderr
    assert "skipped 2 bad item(s)" in res.stderr and first(root, "train", "image").name in res.stderr
    store = FeatureStore.open(res.stdout.strip().splitlines()[-1])
    assert first(root, "train", "image").stem not in store.ids("train") and len(store.ids("train")) == 2
    assert "val" not in store.splits() or len(store.ids("val")) == 0


def test_a_truncated_tiff_adds_no_line_of_its_own(case: tuple[Path, Path],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The decoders' chatter (tifffile's "invalid offset to first page" log, PIL's "Corrupt EXIF data"
    warning) would be more lines beside the one error line."""
    root, _ = case
    truncate(first(root, "test", "image"))
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        with pytest.raises(DatasetError, match="cannot read image"):
            check_files(open_dataset("monuseg", root))
    assert not [r for r in caplog.records if r.name.startswith("tifffile")], caplog.text
    assert not warned, [str(w.message) for w in warned]


@pytest.mark.parametrize("args, words", [
    (["--size", "abc"], ["'--size'", "valid integer", "extract --help"]),
    (["--steps", "50,x"], ["--steps", "comma-separated integers"]),
], ids=["not-an-integer", "not-a-list-of-integers"])
def test_usage_errors_are_one_line_too(good: tuple[Path, Path], tmp_path: Path, args: list[str],
                                       words: list[str]) -> None:
    """The installed command (not only the stage code): a malformed option is one ``error:`` line, exit 2."""
    res = finish(child(extract_args(good[0], tmp_path / "cache", *args)))
    assert res.code == 2, res.stderr
    line = res.error_line()
    assert all(w in line for w in words), (words, line)
    assert not (tmp_path / "cache").exists()
