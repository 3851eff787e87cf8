"""Telling a full or read-only disk from other storage failures, and keeping a free-space reserve.

SQLite reports a full disk as ``SQLITE_FULL`` and a read-only file or mount
as ``SQLITE_READONLY``; a mount turned read-only under an open database may
surface as an I/O error instead, so those are told apart by asking the file
system. A write refused for either reason changes nothing, and the hub
answers it with a problem that names storage (507 or 503) rather than a
generic 500.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
from pathlib import Path

from .base import StorageUnavailable

FULL_CODES = frozenset({"SQLITE_FULL"})
READ_ONLY_PREFIX = "SQLITE_READONLY"
IO_ERROR_PREFIX = "SQLITE_IOERR"
CANT_OPEN = "SQLITE_CANTOPEN"


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding ``directory``."""
    info = os.statvfs(directory)
    return info.f_bavail * info.f_frsize


def is_read_only(directory: Path) -> bool:
    """True if nothing can be created in ``directory`` because its file system is read-only.

    Asks by trying: a file system that turned read-only after an error (ext4's
    ``errors=remount-ro``) may still show a writable mount in ``statvfs``.
    """
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return True
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=directory)
    except OSError as exc:
        return exc.errno == errno.EROFS
    os.close(fd)
    os.unlink(probe)
    return False


def check_reserve(directory: Path, reserve: int) -> None:
    """Refuse a write while fewer than ``reserve`` bytes are free (``min_free_bytes`` in hub.toml).

    Stopping short of a full disk keeps room for SQLite to roll back,
    checkpoint its WAL and answer reads, and for the operator to act.
    """
    if reserve <= 0:
        return
    free = free_bytes(directory)
    if free < reserve:
        raise StorageUnavailable(
            "full",
            f"the hub's storage has {free:,} bytes free, below its reserve of {reserve:,} "
            "(min_free_bytes in hub.toml); nothing was written — the operator must free space, "
            "after which writes are accepted again at once",
        )


def storage_fault(exc: BaseException, directory: Path) -> StorageUnavailable | None:
    """The :class:`StorageUnavailable` an SQLite error stands for, or None if it is not about storage."""
    if not isinstance(exc, sqlite3.Error):
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    if name in FULL_CODES or "disk is full" in str(exc):
        return StorageUnavailable(
            "full",
            f"the disk holding the database is full ({exc}); nothing was written; retry once space is freed",
        )
    if name.startswith(READ_ONLY_PREFIX) or (name.startswith(IO_ERROR_PREFIX) and is_read_only(directory)):
        return StorageUnavailable(
            "read-only",
            f"the storage holding the database is read-only ({exc}); nothing was written; reads and lookups still work",
        )
    if name.startswith(IO_ERROR_PREFIX):
        if free_bytes(directory) == 0:
            return StorageUnavailable(
                "full", f"the disk holding the database is full ({exc}); nothing was written"
            )
        return StorageUnavailable(
            "io-error",
            f"the storage holding the database failed a write ({exc}); nothing was written; check the disk",
        )
    return None


def storage_refusal(exc: OSError, doing: str) -> StorageUnavailable:
    """The :class:`StorageUnavailable` a failed file write stands for (``doing`` says what failed)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageUnavailable(
            "full", f"the hub's storage is full ({doing}: {exc.strerror}); retry once space is freed"
        )
    if exc.errno == errno.EROFS:
        return StorageUnavailable("read-only", f"the hub's storage is read-only ({doing}: {exc.strerror})")
    return StorageUnavailable("io-error", f"the hub's storage failed ({doing}: {exc.strerror or exc})")
