"""The feature cache: keys (identity of a store) and the feature store (zarr folder or URL, or HDF5 file)."""

from __future__ import annotations

from cache.key import (
    FORMAT_VERSION,
    canonical_json,
    default_cache_dir,
    key_hash,
    make_key,
    sha256_file,
    sha256_files,
    store_path,
)
from cache.store import FeatureStore, SplitLayout, StoreError, list_stores

__all__ = [
    "FORMAT_VERSION",
    "FeatureStore",
    "SplitLayout",
    "StoreError",
    "canonical_json",
    "default_cache_dir",
    "key_hash",
    "list_stores",
    "make_key",
    "sha256_file",
    "sha256_files",
    "store_path",
]
