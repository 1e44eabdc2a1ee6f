"""One writer per local store at a time: an advisory lock file beside it (``<store>.lock``).

``pipeline extract`` holds it from opening the store to its last write; a second ``extract`` of the same
store waits for it (saying so), then does only what the first left undone. The file holds the writer's
pid while it writes and is emptied when it stops: a pid found there means the last writer was killed.
``cache rm`` / ``gc`` refuse a store whose lock is held. The kernel drops a lock when its process dies
(even by SIGKILL), so a stale ``.lock`` file is harmless. Stores at URLs have no lock: their writers must
not overlap unless they are one ``--scheduler`` run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from cache.backends import Location, is_url
from common.errors import naming

LOCK_SUFFIX = ".lock"


def lock_path(store: Location) -> Path:
    """The lock file of a local store (beside it, so that it exists before the store does)."""
    return Path(f"{store}{LOCK_SUFFIX}")


def _open(lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise naming(PermissionError(e.errno, f"cache folder {lock.parent} is not writable ({e.strerror}); "
                                                  f"pass a writable cache_dir=DIR"), "cache_dir") from None
        raise


@contextlib.contextmanager
def writer_lock(store: Location, on_wait: Callable[[str], None] | None = None) -> Iterator[bool]:
    """Hold ``store``'s writer lock for the ``with`` block, which gets whether the last writer died while
    writing (its pid is still in the file: a kill leaves half-written temporary files to clean). If another
    process holds the lock, call ``on_wait`` with a sentence saying so, then wait. No-op for a URL."""
    if is_url(store):
        yield False
        return
    lock = lock_path(store)
    fd = _open(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait(f"another process ({_holder(lock)}) is writing {store}; waiting for it to finish, "
                        f"then doing what it left")
            fcntl.flock(fd, fcntl.LOCK_EX)
        died = bool(os.pread(fd, 64, 0).strip())
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield died
        finally:
            os.ftruncate(fd, 0)  # a clean end (an exception included): nothing half-written is left
    finally:
        os.close(fd)  # releases the lock


def held_by_other(store: Location) -> str | None:
    """Who holds ``store``'s writer lock ("pid N"), or None when nobody does (or it is a URL)."""
    if is_url(store) or not lock_path(store).exists():
        return None
    try:
        fd = os.open(lock_path(store), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(lock_path(store))
    finally:
        os.close(fd)
    return None


def _holder(lock: Path) -> str:
    try:
        pid = lock.read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid else "unknown pid"
