"""Cache identity: the key dictionary, its canonical JSON and hash, and where stores live.

The key names everything that determines the cached arrays (dataset content, preprocessing,
UNet weights and flags, noise seed, text encoder, dtype, format version). Which (step, block)
pairs are stored is not part of it: pairs are arrays inside one store.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common.errors import OptionError

#: 3: the masks under both resizings (``mask``: nearest, ``mask_authors``: the authors'), so one store serves
#: both; 2: text tokens encoded one text per forward (batch-independent bits); 1: in batches of up to 32 texts
FORMAT_VERSION = 3
#: versions this textdiff reads; it writes only FORMAT_VERSION, so no store mixes two encodings
READABLE_FORMAT_VERSIONS = (1, 2, 3)

_KEY_FIELDS = ("dataset", "preprocessing", "unet", "noise_seed", "text", "dtype", "compute_dtype")


def sha256_files(paths: Sequence[Path | str]) -> str:
    """Hex sha256 over the files' bytes in the given order; memoised per process on (path, size, mtime)."""
    stamps = []
    for p in paths:
        st = Path(p).stat()
        stamps.append((str(Path(p).resolve()), st.st_size, st.st_mtime_ns))
    return _sha256_stamped(tuple(stamps))


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of one file's bytes (memoised like :func:`sha256_files`)."""
    return sha256_files([path])


@functools.lru_cache(maxsize=4096)
def _sha256_stamped(stamps: tuple[tuple[str, int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path, _, _ in stamps:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no optional whitespace; NaN/inf and non-JSON types raise."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def make_key(
    *, dataset: dict, preprocessing: dict, unet: dict, noise_seed: int, text: dict, dtype: str,
    compute_dtype: str = "float32",
) -> dict:
    """The full cache key (with "format_version"), normalised to plain JSON types.

    Raises TypeError naming the field when a value is not JSON-able (a Path, a numpy scalar...).
    """
    key: dict[str, Any] = {
        "dataset": dataset,
        "preprocessing": preprocessing,
        "unet": unet,
        "noise_seed": noise_seed,
        "text": text,
        "dtype": dtype,
        "compute_dtype": compute_dtype,  # the UNet's arithmetic (autocast changes the features)
    }
    if isinstance(noise_seed, bool) or not isinstance(noise_seed, int):
        raise TypeError(f"cache key field 'noise_seed' must be an int, got {noise_seed!r}")
    for name in _KEY_FIELDS:
        try:
            canonical_json(key[name])
        except (TypeError, ValueError) as e:
            raise TypeError(f"cache key field {name!r} is not JSON-able: {e}") from e
    key["format_version"] = FORMAT_VERSION
    # Round trip so tuples become lists: the key read back from a store then compares equal.
    return json.loads(canonical_json(key))


def key_hash(key: dict) -> str:
    """Hex sha256 of the key's canonical JSON."""
    return hashlib.sha256(canonical_json(key).encode("utf-8")).hexdigest()


def default_cache_dir() -> Path | str:
    """$TEXTDIFF_CACHE_DIR (a folder or an fsspec URL), else $XDG_CACHE_HOME/textdiff, else ~/.cache/textdiff."""
    explicit = os.environ.get("TEXTDIFF_CACHE_DIR")
    if explicit:
        return explicit if "://" in explicit else Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "textdiff"


def store_path(cache_dir: Path | str, dataset_name: str, key: dict, store_format: str = "zarr") -> Path | str:
    """`cache_dir/<dataset_name>-<first 12 hex of the key hash>.zarr` (or `.h5` for store_format "h5")."""
    if not dataset_name or "/" in dataset_name or "\\" in dataset_name or dataset_name.startswith("."):
        raise ValueError(f"dataset name {dataset_name!r} cannot be used in a store file name")
    if store_format not in ("zarr", "h5"):
        raise OptionError(f"store_format must be zarr or h5, got {store_format!r}", "store_format")
    name = f"{dataset_name}-{key_hash(key)[:12]}.{store_format}"
    if isinstance(cache_dir, str) and "://" in cache_dir:  # an fsspec URL (zarr stores only)
        return f"{cache_dir.rstrip('/')}/{name}"
    return Path(cache_dir) / name
