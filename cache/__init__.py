"""The feature cache: stage one's output and stage two's input, one store per cache key.

Modules (each imports only those above it; ``cache`` imports neither ``extract`` nor ``train``):

``OptionError`` (an argument with a bad value, named by its keyword: the CLI names its flag) is
:mod:`common.errors`'s, exported here too.
- ``key``: a store's identity (the key dictionary and its hash) and where it lives in a cache folder.
- ``backends``: zarr folder or URL, or HDF5 file, behind one small interface.
- ``schema``: the arrays of a store (names, paths, specs), ``SplitLayout``, ``StoreError``.
- ``checksums``: a row's CRC-32 and what is wrong with a row read back; ``DamagedDataError`` (below the store).
- ``writes``: ``StoreWriter``, the store's write half: pair arrays, rows checked then written atomically, repair.
- ``store``: ``FeatureStore``: create or open, read (numpy or dask); writes through ``writes``.
- ``integrity``: the one row checker (``check_rows``), above the store.
- ``lock``: one writer per local store.
- ``catalogue``: the stores of a cache folder: list, match a dataset's, remove, collect old ones.
- ``maintenance``: verify a store's rows, and repair (unmark) the damaged ones.
- ``export``: the same store in the other format.
"""

from __future__ import annotations

from cache.catalogue import (StoreEntry, gc_candidates, last_written, list_stores, matching_stores, remove_stores,
                             store_bytes, store_paths)
from common.errors import OptionError, naming
from cache.export import export_store, export_target
from cache.checksums import DamagedDataError, checksum
from cache.integrity import RowArray, RowCheck, base_arrays, check_rows, first_damaged, pair_array
from cache.key import (FORMAT_VERSION, canonical_json, default_cache_dir, key_hash, make_key, sha256_file,
                       sha256_files, store_path)
from cache.lock import writer_lock
from cache.maintenance import VerifyReport, repair_store, verify_store
from cache.schema import BASE_ARRAYS, SplitLayout, StoreError, feat_rel
from cache.store import FeatureStore, format_of, remove_leftovers

__all__ = [
    "BASE_ARRAYS",
    "DamagedDataError",
    "FORMAT_VERSION",
    "FeatureStore",
    "OptionError",
    "RowArray",
    "RowCheck",
    "SplitLayout",
    "StoreEntry",
    "StoreError",
    "VerifyReport",
    "base_arrays",
    "canonical_json",
    "check_rows",
    "checksum",
    "default_cache_dir",
    "export_store",
    "export_target",
    "feat_rel",
    "first_damaged",
    "format_of",
    "gc_candidates",
    "key_hash",
    "last_written",
    "list_stores",
    "make_key",
    "matching_stores",
    "naming",
    "pair_array",
    "remove_leftovers",
    "remove_stores",
    "repair_store",
    "sha256_file",
    "sha256_files",
    "store_bytes",
    "store_path",
    "verify_store",
    "writer_lock",
]
