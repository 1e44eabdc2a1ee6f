"""Checksum primitives, below the store: a row's CRC-32 as written, and what is wrong with a row read back.

The store's writer records :func:`checksum` per row and array; readers compare with :func:`row_problem`
(:mod:`cache.integrity` checks whole rows, above the store).
"""

from __future__ import annotations

import zlib

import numpy as np

from cache.schema import StoreError

__all__ = ["DamagedDataError", "checksum", "row_problem"]


class DamagedDataError(StoreError):
    """A row that does not read back as it was written: undecodable, NaN/Inf, or not its recorded CRC-32.
    ``reason`` is the message without the path and array in front."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def checksum(value: np.ndarray) -> int:
    """CRC-32 of an array's bytes as stored (C order), never 0: 0 in a crc array means "not recorded"."""
    return zlib.crc32(np.ascontiguousarray(value).tobytes()) or 1


def row_problem(value: np.ndarray, recorded: int, float_data: bool) -> str | None:
    """What is wrong with a row read back (None: nothing): NaN/Inf values (``float_data``; a lost chunk reads
    as NaN), or a CRC-32 other than ``recorded`` at write time (0: none recorded, not compared). A matching
    CRC settles it alone: writers refuse non-finite values."""
    actual = checksum(value) if recorded else None
    if actual == recorded:
        return None
    if float_data and not np.isfinite(value).all():
        return f"{int((~np.isfinite(value)).sum())} NaN/Inf values (missing chunk or corrupt data)"
    return None if actual is None else f"checksum {actual:08x} != {recorded:08x} recorded at write time"
