"""SQLite storage (WAL): the embedded default.

Each thread gets its own connection. Writes take ``BEGIN IMMEDIATE`` so the
hub and a CLI command writing to the same file (``hashfed member grant``
while the hub serves) are serialised by SQLite itself, and commit with
``synchronous=FULL`` so an acknowledged entry survives a crash or power loss.

The tables and their version are in :mod:`.sqlite_schema`; the SQL for
mirrored collections (``sources``, ``evidence``) is in :mod:`.sqlite_sources`.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ..durable import create_private_file
from ..keys import VerifierKey
from ..merkle import HashKey
from ..state import HubKeyRecord, KeyRecord, ListingChange
from .base import EntryRecord, ListingDetail, MemberView, SourceRecord, StoreError
from .sqlite_schema import PROJECTION_TABLES, SCHEMA, SCHEMA_VERSION, ensure_schema
from .sqlite_sources import (
    read_evidence,
    read_source,
    read_sources,
    record_evidence,
    record_source,
    resume_source,
)
from .sqlite_txn import SqliteTxn, key_record_from_row, read_hub_keys, read_tree
from .storage_faults import check_reserve, storage_fault

JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024
"""Bytes the WAL is cut back to after a checkpoint: a large batch's WAL does not keep its space for ever."""

__all__ = ["PROJECTION_TABLES", "SCHEMA", "SCHEMA_VERSION", "SqliteStore", "SqliteTxn"]


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


def _in_chunks(hashes: Sequence[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """The distinct hashes in chunks small enough for one ``IN (?, …)``, each with its placeholders."""
    unique = list(dict.fromkeys(hashes))
    for start in range(0, len(unique), size):
        chunk = unique[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


class SqliteStore:
    """The hub's storage in one SQLite file (implements ``HubStore``)."""

    def __init__(self, path: Path, *, min_free_bytes: int = 0) -> None:
        self.path = path
        self.min_free_bytes = min_free_bytes
        """Writes are refused while the file system has less free space than this."""
        self._storage_failed = False
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._parsed_keys: dict[str, VerifierKey] = {}
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
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for reads that span several queries."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

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
        names = [row[0] for row in self._conn().execute("SELECT name FROM collections ORDER BY name")]
        self._remember("collections", version, names)
        return list(names)

    def create_collection(self, name: str) -> None:
        conn = self._conn()
        try:
            conn.execute("INSERT INTO collections (name) VALUES (?)", (name,))
        except sqlite3.IntegrityError as exc:
            raise StoreError(f"collection {name} already exists") from exc

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
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

    @contextmanager
    def write(self, collection: str) -> Iterator[SqliteTxn]:
        """Open a write transaction; it commits when the block ends without an exception."""
        with self._immediate() as conn:
            row = conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()
            if row is None:
                raise StoreError(f"no collection named {collection}")
            yield SqliteTxn(conn, collection, int(row[0]))

    @contextmanager
    def rebuild(self, collection: str) -> Iterator[SqliteTxn]:
        """A write transaction with the collection's projection emptied, to replay its log into."""
        with self._immediate() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (collection,)).fetchone() is None:
                raise StoreError(f"no collection named {collection}")
            for table in PROJECTION_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE collection = ?", (collection,))
            yield SqliteTxn(conn, collection, 0)

    def log_size(self, collection: str) -> int:
        row = self._conn().execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()
        if row is None:
            raise StoreError(f"no collection named {collection}")
        return int(row[0])

    def read_hashes(self, collection: str, keys: Sequence[HashKey]) -> list[bytes]:
        return read_tree(self._conn(), collection, keys)

    def entries(
        self, collection: str, start: int, limit: int, max_bytes: int | None = None
    ) -> list[EntryRecord]:
        """Up to ``limit`` entries from ``start``; with ``max_bytes``, stop before their data passes it.

        The first entry is always returned, whatever its size, so a reader can make progress.
        """
        rows = self._conn().execute(
            "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND idx >= ? ORDER BY idx LIMIT ?",
            (collection, start, limit),
        )
        records: list[EntryRecord] = []
        held = 0
        for i, h, d in rows:
            held += len(d)
            if max_bytes is not None and records and held > max_bytes:
                break
            records.append(EntryRecord(int(i), bytes(h), bytes(d)))
        return records

    def entry_by_leaf(self, collection: str, leaf: bytes) -> EntryRecord | None:
        row = (
            self._conn()
            .execute(
                "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND leaf_hash = ?",
                (collection, leaf),
            )
            .fetchone()
        )
        return EntryRecord(int(row[0]), bytes(row[1]), bytes(row[2])) if row else None

    def hub_keys(self, collection: str) -> list[HubKeyRecord]:
        """The collection's hub key rotations, in log order."""
        return read_hub_keys(self._conn(), collection)

    def keys(self, collection: str) -> list[KeyRecord]:
        rows = self._conn().execute(
            "SELECT key, rights, granted, revoked FROM keys WHERE collection = ? ORDER BY granted, key_id",
            (collection,),
        )
        return [key_record_from_row(row) for row in rows]

    def key_memberships(self, key_id: str) -> list[tuple[str, KeyRecord]]:
        """Every collection granting ``key_id``; read on every signed request, so cached until a commit."""
        version, cached = self._unchanged_since(f"key:{key_id}")
        if isinstance(cached, list):
            return list(cached)
        rows = self._conn().execute(
            "SELECT collection, key, rights, granted, revoked FROM keys WHERE key_id = ?", (key_id,)
        )
        memberships = [(row[0], key_record_from_row(row[1:], self._parsed_keys)) for row in rows]
        self._remember(f"key:{key_id}", version, memberships)
        return list(memberships)

    def changes_since(self, collection: str, position: int) -> tuple[list[ListingChange], int]:
        with self._read() as conn:
            size = int(
                conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()[0]
            )
            rows = conn.execute(
                "SELECT idx, type, hash, listed FROM changes WHERE collection = ? AND idx >= ? ORDER BY idx, ordinal",
                (collection, position),
            ).fetchall()
        return [ListingChange(int(i), t, h, bool(listed)) for i, t, h, listed in rows], size

    def listed(self, collection: str, signal: str | None = None) -> tuple[list[tuple[str, str]], int]:
        """Every listed (type, hash) of a collection, or of one type, and the log size they reflect."""
        with self._read() as conn:
            size = int(
                conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()[0]
            )
            if signal is None:
                rows = conn.execute(
                    "SELECT DISTINCT type, hash FROM listings WHERE collection = ?", (collection,)
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT DISTINCT type, hash FROM listings WHERE collection = ? AND type = ?",
                    (collection, signal),
                ).fetchall()
        return [(t, h) for t, h in rows], size

    def contents(self, collection: str, signal: str, hashes: Sequence[str]) -> dict[str, bytes]:
        """The content kept beside listed hashes of a type that has one (a video's frames)."""
        found: dict[str, bytes] = {}
        with self._read() as conn:
            for chunk, marks in _in_chunks(hashes):
                rows = conn.execute(
                    f"SELECT hash, content FROM contents WHERE collection = ? AND type = ? AND hash IN ({marks})",
                    (collection, signal, *chunk),
                ).fetchall()
                found.update((hash_hex, bytes(content)) for hash_hex, content in rows)
        return found

    def details(self, collection: str, signal: str, hashes: Sequence[str]) -> dict[str, ListingDetail]:
        """Submitters, labels, first index and opinion counts of listed hashes."""
        result: dict[str, ListingDetail] = {}
        with self._read() as conn:
            for chunk, marks in _in_chunks(hashes):
                listing_rows = conn.execute(
                    f"SELECT hash, member, labels, since FROM listings WHERE collection = ? AND type = ? AND hash IN ({marks})",
                    (collection, signal, *chunk),
                ).fetchall()
                opinion_rows = conn.execute(
                    f"SELECT hash, verdict, count(*) FROM opinions WHERE collection = ? AND type = ? AND hash IN ({marks}) "
                    "GROUP BY hash, verdict",
                    (collection, signal, *chunk),
                ).fetchall()
                counts: dict[str, dict[str, int]] = {}
                for hash_hex, verdict, count in opinion_rows:
                    counts.setdefault(hash_hex, {})[verdict] = int(count)
                grouped: dict[str, list[tuple[str, list[str], int]]] = {}
                for hash_hex, member, labels, since in listing_rows:
                    grouped.setdefault(hash_hex, []).append((member, json.loads(labels), int(since)))
                for hash_hex, rows in grouped.items():
                    opinion = counts.get(hash_hex, {})
                    result[hash_hex] = ListingDetail(
                        submitters=tuple(sorted(member for member, _, _ in rows)),
                        labels=tuple(sorted({label for _, labels, _ in rows for label in labels})),
                        first_index=min(since for _, _, since in rows),
                        positive=opinion.get("positive", 0),
                        negative=opinion.get("negative", 0),
                    )
        return result

    def member_views(
        self, collection: str, signal: str, hashes: Sequence[str]
    ) -> dict[str, list[MemberView]]:
        """Per listed hash, each member that lists it or gave an opinion on it, by member name."""
        result: dict[str, list[MemberView]] = {}
        with self._read() as conn:
            for chunk, marks in _in_chunks(hashes):
                listing_rows = conn.execute(
                    f"SELECT hash, member, labels FROM listings WHERE collection = ? AND type = ? AND hash IN ({marks})",
                    (collection, signal, *chunk),
                ).fetchall()
                opinion_rows = conn.execute(
                    f"SELECT hash, member, verdict FROM opinions WHERE collection = ? AND type = ? AND hash IN ({marks})",
                    (collection, signal, *chunk),
                ).fetchall()
                views: dict[str, dict[str, MemberView]] = {}
                for hash_hex, member, labels in listing_rows:
                    views.setdefault(hash_hex, {})[member] = MemberView(
                        member, True, tuple(json.loads(labels))
                    )
                for hash_hex, member, verdict in opinion_rows:
                    if hash_hex not in views:
                        continue  # opinions on a hash nobody lists any more
                    held = views[hash_hex].get(member, MemberView(member, False))
                    views[hash_hex][member] = replace(held, verdict=verdict)
                for hash_hex, by_member in views.items():
                    result[hash_hex] = [by_member[name] for name in sorted(by_member)]
        return result

    # ---- mirrored collections (SQL in .sqlite_sources) ---------------------

    def sources(self) -> list[SourceRecord]:
        version, cached = self._unchanged_since("sources")
        if isinstance(cached, list):
            return list(cached)
        records = read_sources(self._conn())
        self._remember("sources", version, records)
        return list(records)

    def source(self, name: str) -> SourceRecord | None:
        return read_source(self._conn(), name)

    @contextmanager
    def write_source(self, record: SourceRecord) -> Iterator[SqliteTxn]:
        """A write transaction on a mirrored collection that also records ``record``.

        The collection and its source row are created by the first such
        transaction, and the source row (its checkpoints) is written in the
        same transaction as the entries: if the block raises, neither the
        entries nor the new checkpoints are kept.
        """
        with self._immediate() as conn:
            yield SqliteTxn(conn, record.name, record_source(conn, record))

    def add_evidence(self, name: str, detected: str, body: str) -> None:
        """Keep fork evidence for a source and stop it, in one transaction."""
        with self._immediate() as conn:
            record_evidence(conn, name, detected, body)

    def evidence(self, name: str) -> list[str]:
        return read_evidence(self._conn(), name)

    def resume_source(self, name: str) -> bool:
        """Clear a source's stop (its evidence is kept); False if it was not stopped."""
        with self._immediate() as conn:
            return resume_source(conn, name)
