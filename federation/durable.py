"""Writing files so that a crash or power loss leaves either the old file or the new one.

A file is written under a temporary name, fsynced, renamed into place, and
then its directory is fsynced so the rename itself is on disk. Without the
last step a journal abort seconds after ``hashfed init`` can leave
``hub.toml`` present but empty. Every file is created owner-only (0600),
whatever the umask: a hub's files describe its members.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

OWNER_ONLY_FILE = 0o600
OWNER_ONLY_DIR = 0o700


def fsync_directory(path: Path) -> None:
    """Make the entries of a directory (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_directory(path: Path) -> None:
    """Create ``path`` (and its parents) if needed, and make it owner-only."""
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(OWNER_ONLY_DIR)
    if created:
        fsync_directory(path.parent)


def write_atomically(path: Path, data: bytes | str, *, mode: int = OWNER_ONLY_FILE) -> None:
    """Replace ``path`` with ``data``: whole, durable and with ``mode``, or not at all.

    The temporary file's name is unique to this process and thread, so two
    writers never share one; a crash leaves at most a ``.tmp`` file beside it.
    """
    raw = data.encode() if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        try:
            os.fchmod(fd, mode)  # the umask may have narrowed it, never widened: set it exactly
            view = memoryview(raw)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def create_private_file(path: Path) -> None:
    """Create an empty owner-only file if none exists (so a library that creates it later keeps its mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, OWNER_ONLY_FILE)
    try:
        os.fchmod(fd, OWNER_ONLY_FILE)
    finally:
        os.close(fd)
