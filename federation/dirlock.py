"""One serving process per data directory.

Two hubs serving one directory would each accept a signed request replayed
to both (replay protection lives in each process) and each sign checkpoints
of their own. ``hashfed serve`` therefore holds an exclusive lock on
``DIR/hub.lock`` while it runs; the file names the holder's process id so a
second ``serve`` can say which process to stop. Admin commands do not take
the lock: they write through SQLite, which serialises them with the hub.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .config import ConfigError

LOCK_FILE = "hub.lock"


class DirectoryLock:
    """Held from :meth:`acquire` until :meth:`release` or the process ends (the OS drops it then)."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(
                f"another hashfed process (pid {holder}) is already serving {self.path.parent}; "
                "stop it first: two hubs on one data directory would both accept one signed request"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
