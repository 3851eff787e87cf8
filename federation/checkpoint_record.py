"""The hub's durable record of the last checkpoint it signed for each collection.

A checkpoint, once published, binds the hub: every later checkpoint must
extend it, or mirrors record a fork and stop. The log in the database is the
truth about entries, but a database can come back from a crash shorter than
it was (a cut WAL), or with a damaged tree-hash row; a hub that signed from
it then would publish two histories. So the hub keeps the last note it
signed outside the database, in ``signed/<collection>.note`` (written and
fsynced before the note is served), and checks the stored log against it at
start and before every signing: the log must be at least as long, hold the
same root at that size, and the new root must be proven consistent with it.

The record never replaces the log; it only lets the hub notice that its
database no longer matches what it already told the world, and refuse.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from . import merkle
from .checkpoint import Checkpoint, CheckpointError, open_note
from .durable import make_private_directory, write_atomically
from .keys import VerifierKey
from .store.base import StoreError
from .store.storage_faults import storage_refusal

RECOVERY_HINT = (
    "restore the database from a backup holding at least those entries (docs/operations.md, "
    "'Restoring from a backup'); never sign from this one"
)


class HistoryMismatch(RuntimeError):
    """The stored log contradicts a checkpoint this hub already signed; it must not sign from it."""


class CheckpointRecord:
    """Last signed note per collection: on disk under ``directory``, or in memory when it is None.

    An in-memory record (a node built by tests or tools without a data
    directory) still refuses to sign two histories within one process.
    """

    def __init__(self, directory: Path | None, hub_keys: Sequence[VerifierKey]) -> None:
        self.directory = directory
        self.hub_keys = list(hub_keys)
        """Every key this hub signs with or signed with (a rotation changes it)."""
        self._memory: dict[str, str] = {}
        self._lock = threading.Lock()

    def _path(self, collection: str) -> Path:
        assert self.directory is not None
        return self.directory / f"{quote(collection, safe='')}.note"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the record against other threads and processes of this hub while checking and signing."""
        with self._lock:
            if self.directory is None:
                yield
                return
            make_private_directory(self.directory)
            fd = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def last(self, collection: str) -> Checkpoint | None:
        """The last checkpoint signed for ``collection``, or None if this hub never signed one."""
        if self.directory is None:
            note = self._memory.get(collection)
        else:
            path = self._path(collection)
            try:
                note = path.read_text()
            except FileNotFoundError:
                return None
        if note is None:
            return None
        try:
            return open_note(note, self.hub_keys)
        except CheckpointError as exc:
            raise HistoryMismatch(
                f"the record of the last checkpoint signed for {collection} "
                f"({self._path(collection) if self.directory else 'memory'}) is damaged: {exc}; "
                "restore it from the backup of this data directory, or from any mirror's checkpoint.txt "
                "for this collection (the newest one any mirror holds)"
            ) from exc

    def remember(self, collection: str, note: str) -> None:
        """Keep ``note`` as the last signed checkpoint; durable before this returns."""
        if self.directory is None:
            self._memory[collection] = note
            return
        try:
            write_atomically(self._path(collection), note)
        except OSError as exc:
            raise storage_refusal(exc, f"recording the checkpoint of {collection} before signing it") from exc


def check_extends(
    collection: str, last: Checkpoint | None, size: int, root: bytes, reader: merkle.HashReader
) -> None:
    """Raise :class:`HistoryMismatch` unless the log of ``size`` entries with ``root`` extends ``last``.

    The consistency proof is read from the stored tree and checked against
    the recorded root, so stored hashes that changed since ``last`` was
    signed are found here, before anything is signed over them.
    """
    if last is None:
        return
    if size < last.size:
        raise HistoryMismatch(
            f"collection {collection}: the log holds {size} entries, but this hub already signed a "
            f"checkpoint of {last.size} entries; {RECOVERY_HINT}"
        )
    try:
        proof = merkle.consistency_proof(reader, last.size, size)
        merkle.verify_consistency(last.size, size, last.root, root, proof)
    except (merkle.ProofError, StoreError) as exc:
        raise HistoryMismatch(
            f"collection {collection}: the stored log of {size} entries does not extend the checkpoint "
            f"of {last.size} entries this hub already signed ({exc}); its stored tree hashes or entries "
            f"were changed or lost; {RECOVERY_HINT}"
        ) from exc


def check_stored_log(collection: str, last: Checkpoint | None, size: int, reader: merkle.HashReader) -> None:
    """At start: raise :class:`HistoryMismatch` unless the stored log of ``size`` entries extends ``last``."""
    if last is None:
        return
    try:
        root = merkle.root(reader, size)
    except StoreError as exc:
        raise HistoryMismatch(
            f"collection {collection}: the stored tree cannot be read ({exc}); {RECOVERY_HINT}"
        ) from exc
    check_extends(collection, last, size, root, reader)
