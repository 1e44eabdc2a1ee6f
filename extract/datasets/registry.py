"""The registry of dataset readers: each reader registers under its name; :func:`open_dataset` dispatches.

A reader is a function ``(root, wanted, skip_bad, **options) -> Dataset``: ``root`` the dataset's
folder (None when not given), ``wanted`` the splits asked for (None: every split present), and the
options it declares when it registers. The readers of this package (``monuseg``, ``qata``, ``folder``
in :mod:`extract.datasets.layouts`, ``synthetic`` in :mod:`extract.datasets.synthetic`) register
when the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extract.datasets.core import SPLIT_ALIASES, DatasetError

if TYPE_CHECKING:
    from extract.datasets.dataset import Dataset

Reader = Callable[..., "Dataset"]


@dataclass(frozen=True)
class Registered:
    """A reader and the options it accepts."""

    read: Reader
    options: frozenset[str]


READERS: dict[str, Registered] = {}


def register(name: str, options: Sequence[str] = ()) -> Callable[[Reader], Reader]:
    """Register the decorated reader as dataset ``name``, accepting keyword ``options``."""

    def decorate(read: Reader) -> Reader:
        if name in READERS:
            raise ValueError(f"dataset {name!r} is registered twice")
        READERS[name] = Registered(read, frozenset(options))
        return read

    return decorate


def open_dataset(name: str, root: Path | str | None = None, *, splits: Sequence[str] | None = None,
                 skip_bad: bool = False, **options: Any) -> Dataset:
    """Read dataset ``name`` ("monuseg" | "qata" | "folder" | "synthetic") from ``root``.

    ``splits`` restricts the splits read (default: every split present). ``skip_bad`` drops items with
    structural problems (recorded in ``Dataset.skipped``) instead of raising. Options: qata
    ``layout`` ("auto" | "sgseg" | "lvit"); synthetic ``seed`` (0), ``counts`` ({"train": 32, "val": 8,
    "test": 16}), ``native_size`` (128).
    """
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r} (expected one of {sorted(READERS)})")
    reader = READERS[name]
    unknown = set(options) - reader.options
    if unknown:
        accepted = ", ".join(sorted(reader.options)) or "none"
        raise DatasetError(f"{name}: unknown option(s) {sorted(unknown)} (accepted: {accepted})")
    return reader.read(root, wanted_splits(splits), skip_bad, **options)


def wanted_splits(splits: Sequence[str] | None) -> list[str] | None:
    """``splits`` in canonical names (``valid`` → ``val``), without repeats; None stays None (every split)."""
    if splits is None:
        return None
    bad = [s for s in splits if s not in SPLIT_ALIASES]
    if bad:
        raise DatasetError(f"unknown split(s) {bad} (expected train, val, test)")
    return list(dict.fromkeys(SPLIT_ALIASES[s] for s in splits))
