"""One way to write a file so that a reader never sees half of it: a temporary file beside it, renamed over it.

Standard library only (``train/runs/rundir.py`` runs under a bare ``python3``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["TMP_SUFFIX", "atomic_write", "write_bytes", "write_json", "write_stream", "write_text", "tmp_path"]

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path | str) -> Path:
    """The temporary file :func:`atomic_write` writes ``path`` through (``<name>.tmp`` beside it)."""
    path = Path(path)
    return path.with_name(path.name + TMP_SUFFIX)


def atomic_write(path: Path | str, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then rename it over ``path`` (atomic on
    one file system); on failure the temporary file is removed and ``path`` keeps its old content."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_stream(path: Path | str, write: Callable[[IO[bytes]], Any]) -> Path:
    """``write(f)`` into ``path`` through an open binary file (for writers that add a suffix to a file name,
    as ``np.save`` does), atomically."""
    def fill(tmp: Path) -> None:
        with tmp.open("wb") as f:
            write(f)

    return atomic_write(path, fill)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """``data`` into ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path | str, text: str) -> Path:
    """``text`` (UTF-8) into ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path | str, obj: Any) -> Path:
    """``obj`` as indented JSON (and a newline) into ``path``, atomically."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")
