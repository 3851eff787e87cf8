"""SQLite storage (WAL): the embedded default.

Each thread gets its own connection. Writes take ``BEGIN IMMEDIATE`` so the
hub and a CLI command writing to the same file (``hashfed member grant``
while the hub serves) are serialised by SQLite itself, and commit with
``synchronous=FULL`` so an acknowledged entry survives a crash or power loss.

The queries are :mod:`.sql_store`'s, shared with PostgreSQL; the tables and
their version are in :mod:`.sqlite_schema`.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..durable import create_private_file
from ..state import KeyRecord
from .base import SourceRecord
from .sql_store import PROJECTION_TABLES, SqlStore
from .sql_txn import Connection, SqlTxn
from .sqlite_schema import SCHEMA, SCHEMA_VERSION, ensure_schema
from .storage_faults import check_reserve, storage_fault

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL is cut back to after a checkpoint: a large batch's WAL does not keep its space for ever."""

__all__ = ["PROJECTION_TABLES", "SCHEMA", "SCHEMA_VERSION", "SqlTxn", "SqliteStore"]


def _rollback(conn: sqlite3.Connection) -> None:
    """Roll back if a transaction is still open (SQLite rolls back by itself after some errors)."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):  # SQLite's own rollback on the next statement finishes it
            conn.execute("ROLLBACK")


def _truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the WAL into the database and truncate it; False if that could not be done now."""
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        return False
    return not busy


class SqliteStore(SqlStore):
    """The hub's storage in one SQLite file (implements ``HubStore``)."""

    def __init__(self, path: Path, *, min_free_bytes: int = 0) -> None:
        super().__init__()
        self.path = path
        self.min_free_bytes = min_free_bytes
        """Writes are refused while the file system has less free space than this."""
        self._storage_failed = False
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        if not path.exists():
            create_private_file(path)  # SQLite gives its -wal and -shm files the database's mode
        ensure_schema(self._conn(), path)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
            conn.execute(f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        yield self._conn()

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _lock_collection(self, conn: Connection, collection: str) -> int | None:
        """``BEGIN IMMEDIATE`` already holds the whole file: read the size."""
        row = conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()
        return None if row is None else int(row[0])

    def _unchanged_since(self, name: str) -> tuple[tuple[int, int], object | None]:
        """This thread's cached answer ``name`` if nothing was committed since, by anyone.

        ``data_version`` moves when another connection commits; ``total_changes``
        when this one does. Together they say whether a cached read still holds,
        for the cost of one pragma instead of a query.
        """
        conn = self._conn()
        version = (int(conn.execute("PRAGMA data_version").fetchone()[0]), conn.total_changes)
        cache: dict[str, tuple[tuple[int, int], object]] = self._local.__dict__.setdefault("cache", {})
        cached = cache.get(name)
        return version, (cached[1] if cached is not None and cached[0] == version else None)

    def _remember(self, name: str, version: tuple[int, int], value: object) -> None:
        self._local.__dict__.setdefault("cache", {})[name] = (version, value)

    def collections(self) -> list[str]:
        version, cached = self._unchanged_since("collections")
        if isinstance(cached, list):
            return list(cached)
        names = super().collections()
        self._remember("collections", version, names)
        return list(names)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction (``BEGIN IMMEDIATE``): committed when the block ends, else rolled back.

        A full, read-only or failing disk raises :class:`StorageUnavailable`
        with nothing written; the WAL is then checkpointed and truncated so
        the space a failed transaction took is given back.
        """
        check_reserve(self.path.parent, self.min_free_bytes)
        conn = self._conn()
        if self._storage_failed:
            self._storage_failed = not _truncate_wal(conn)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                _rollback(conn)
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            fault = storage_fault(exc, self.path.parent)
            if fault is None:
                raise
            _rollback(conn)  # a COMMIT that failed on a full disk leaves the transaction open
            self._storage_failed = not _truncate_wal(conn)
            raise fault from exc

    def key_memberships(self, key_id: str) -> list[tuple[str, KeyRecord]]:
        """Every collection granting ``key_id``; read on every signed request, so cached until a commit."""
        version, cached = self._unchanged_since(f"key:{key_id}")
        if isinstance(cached, list):
            return list(cached)
        memberships = super().key_memberships(key_id)
        self._remember(f"key:{key_id}", version, memberships)
        return list(memberships)

    def sources(self) -> list[SourceRecord]:
        version, cached = self._unchanged_since("sources")
        if isinstance(cached, list):
            return list(cached)
        records = super().sources()
        self._remember("sources", version, records)
        return list(records)
