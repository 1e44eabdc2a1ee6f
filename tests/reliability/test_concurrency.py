"""Two ``extract`` processes on the same store at once: both succeed, the second waiting for the first
(the store's writer lock), and the store is the one a single run makes. Maintenance keeps off a store
being written."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cache.lock import held_by_other, writer_lock
from cache import StoreError, gc_candidates, remove_stores
from tests.reliability.conftest import child, digest, extract_args, finish, stores, wait_for
from tests.reliability.test_kills import assert_like_reference, reference  # noqa: F401 - the shared fixture


def test_two_extracts_of_one_store_at_once(reference: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    root, ref = reference
    cache = tmp_path / "cache"
    first, second = child(extract_args(root, cache)), child(extract_args(root, cache))
    a, b = finish(first), finish(second)
    assert a.code == 0 and b.code == 0, (a.stderr, b.stderr)
    assert a.stdout.strip() == b.stdout.strip() == str(cache / ref.name)
    said = a.stderr + b.stderr
    assert "waiting for it to finish" in said or "nothing to do" in said, said
    assert_like_reference(cache / ref.name, ref)


def test_a_second_extract_waits_then_does_nothing(reference: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    """Deterministic version: this process holds the lock until the child says it waits (however long a loaded
    machine takes it to get there; a fixed sleep let CI's child arrive after the lock was gone); it finishes after."""
    root, ref = reference
    cache = tmp_path / "cache"
    cache.mkdir()
    said: list[str] = []
    with writer_lock(cache / ref.name):
        proc = child(extract_args(root, cache))
        reader = threading.Thread(target=lambda: said.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        assert wait_for(lambda: proc.poll() is not None or "waiting for it to finish" in "".join(said), timeout=300)
        assert proc.poll() is None, "".join(said)  # still waiting
        assert held_by_other(cache / ref.name)  # (this process, seen through another file handle)
    assert proc.wait(timeout=300) == 0, "".join(said)
    reader.join(timeout=60)
    assert "waiting for it to finish" in "".join(said), "".join(said)
    assert proc.stdout is not None and proc.stdout.read().strip() == str(cache / ref.name)
    assert_like_reference(cache / ref.name, ref)


def test_rm_and_gc_keep_off_a_store_being_written(reference: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    _, ref = reference
    before = digest(ref.parent)
    with writer_lock(ref):
        with pytest.raises(StoreError, match="being written by another process"):
            remove_stores([ref])
        assert gc_candidates(ref.parent, keep=0) == []
    assert digest(ref.parent) == before and stores(ref.parent) == [ref]
