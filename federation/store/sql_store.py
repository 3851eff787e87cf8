"""What the SQLite and PostgreSQL stores share: every query of ``HubStore``, over a connection.

A subclass says how to get a connection (:meth:`SqlStore._connection`), how
to run a write transaction (:meth:`SqlStore._transaction`) and how to take a
collection for writing (:meth:`SqlStore._lock_collection`): SQLite takes the
whole file with ``BEGIN IMMEDIATE``, PostgreSQL locks the collection's row,
so that one collection's log indexes are assigned one after another, with no
gap, whichever replica appends.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace

from ..keys import VerifierKey
from ..merkle import HashKey
from ..state import HubKeyRecord, KeyRecord, ListingChange
from .base import EntryRecord, ListingDetail, MemberView, SourceRecord, StoreError
from .sql_sources import (
    read_evidence,
    read_source,
    read_sources,
    record_evidence,
    record_source,
    resume_source,
)
from .sql_txn import Connection, SqlTxn, key_record_from_row, read_hub_keys, read_tree, rows_by_hash

PROJECTION_TABLES = ("keys", "seqs", "listings", "contents", "opinions", "changes", "hub_keys")
"""What ``rebuild`` empties and recomputes from the log."""


def _size_of(conn: Connection, collection: str) -> int:
    row = conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()
    if row is None:
        raise StoreError(f"no collection named {collection}")
    return int(row[0])


class SqlStore(ABC):
    """``HubStore`` over SQL; subclasses bring the connections and the write transactions."""

    shared = False
    """True when other hub processes, anywhere, may append to the same log (PostgreSQL)."""

    def __init__(self) -> None:
        self._parsed_keys: dict[str, VerifierKey] = {}

    def unavailable(self) -> str | None:
        """Why the storage cannot be used now, or None (a database server that cannot be reached)."""
        return None

    @abstractmethod
    def _connection(self) -> AbstractContextManager[Connection]:
        """A connection for single statements that need no snapshot."""

    @abstractmethod
    def _snapshot(self) -> AbstractContextManager[Connection]:
        """A read-only transaction: several queries that see one state of the database."""

    @abstractmethod
    def _transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction, committed when the block ends, else rolled back."""

    @abstractmethod
    def _lock_collection(self, conn: Connection, collection: str) -> int | None:
        """Within a write transaction: hold ``collection`` for writing; its log size, None if absent."""

    def _written(self, conn: Connection, collection: str) -> None:  # noqa: B027 - a hook, empty by default
        """Within a write transaction on ``collection``, just before it commits (PostgreSQL notifies)."""

    def _committed(self, rows: int) -> None:  # noqa: B027 - a hook, empty by default
        """After a write transaction that wrote ``rows`` rows committed (PostgreSQL keeps its statistics)."""

    @abstractmethod
    def close(self) -> None: ...

    # ---- whose database this is -------------------------------------------------

    def owner(self) -> str | None:
        """The name of the hub this database was made for (None for a database made before it was kept)."""
        with self._connection() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'hub'").fetchone()
        return None if row is None else str(row[0])

    def claim(self, hub: str) -> None:
        """Mark a new database as ``hub``'s; refuse one that holds another hub's log."""
        with self._transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'hub'").fetchone()
            if row is not None and row[0] != hub:
                raise StoreError(f"the database belongs to hub {row[0]}, not {hub}")
            if row is None and conn.execute("SELECT 1 FROM collections").fetchone() is not None:
                raise StoreError("the database already holds a hub's collections")
            conn.execute("INSERT INTO meta (key, value) VALUES ('hub', ?) ON CONFLICT DO NOTHING", (hub,))

    # ---- collections and writes --------------------------------------------

    def collections(self) -> list[str]:
        with self._connection() as conn:
            return [row[0] for row in conn.execute("SELECT name FROM collections ORDER BY name")]

    def create_collection(self, name: str) -> None:
        with self._transaction() as conn:
            added = conn.execute("INSERT INTO collections (name) VALUES (?) ON CONFLICT DO NOTHING", (name,))
            if not added.rowcount:
                raise StoreError(f"collection {name} already exists")

    @contextmanager
    def write(self, collection: str) -> Iterator[SqlTxn]:
        """Open a write transaction; it commits when the block ends without an exception."""
        with self._transaction() as conn:
            size = self._lock_collection(conn, collection)
            if size is None:
                raise StoreError(f"no collection named {collection}")
            txn = SqlTxn(conn, collection, size)
            yield txn
            txn.flush()
            self._written(conn, collection)
        self._committed(txn.rows_written)

    @contextmanager
    def rebuild(self, collection: str) -> Iterator[SqlTxn]:
        """A write transaction with the collection's projection emptied, to replay its log into."""
        with self._transaction() as conn:
            if self._lock_collection(conn, collection) is None:
                raise StoreError(f"no collection named {collection}")
            for table in PROJECTION_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE collection = ?", (collection,))
            txn = SqlTxn(conn, collection, 0)
            yield txn
            txn.flush()
            self._written(conn, collection)
        self._committed(txn.rows_written)

    # ---- the log -------------------------------------------------------------

    def log_size(self, collection: str) -> int:
        with self._connection() as conn:
            return _size_of(conn, collection)

    def read_hashes(self, collection: str, keys: Sequence[HashKey]) -> list[bytes]:
        with self._connection() as conn:
            return read_tree(conn, collection, keys)

    def entries(
        self, collection: str, start: int, limit: int, max_bytes: int | None = None
    ) -> list[EntryRecord]:
        """Up to ``limit`` entries from ``start``; with ``max_bytes``, stop before their data passes it.

        The first entry is always returned, whatever its size, so a reader can make progress.
        """
        records: list[EntryRecord] = []
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND idx >= ? ORDER BY idx LIMIT ?",
                (collection, start, limit),
            )
            held = 0
            for i, h, d in rows:
                held += len(d)
                if max_bytes is not None and records and held > max_bytes:
                    break
                records.append(EntryRecord(int(i), bytes(h), bytes(d)))
        return records

    def entry_by_leaf(self, collection: str, leaf: bytes) -> EntryRecord | None:
        with self._connection() as conn:
            row = conn.execute(
                "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND leaf_hash = ?",
                (collection, leaf),
            ).fetchone()
        return EntryRecord(int(row[0]), bytes(row[1]), bytes(row[2])) if row else None

    # ---- the projection ----------------------------------------------------

    def hub_keys(self, collection: str) -> list[HubKeyRecord]:
        """The collection's hub key rotations, in log order."""
        with self._connection() as conn:
            return read_hub_keys(conn, collection)

    def keys(self, collection: str) -> list[KeyRecord]:
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT key, rights, granted, revoked FROM keys WHERE collection = ? ORDER BY granted, key_id",
                (collection,),
            ).fetchall()
        return [key_record_from_row(row) for row in rows]

    def key_memberships(self, key_id: str) -> list[tuple[str, KeyRecord]]:
        """Every collection granting ``key_id`` (read on every signed request)."""
        with self._connection() as conn:
            rows = conn.execute(
                "SELECT collection, key, rights, granted, revoked FROM keys WHERE key_id = ?", (key_id,)
            ).fetchall()
        return [(row[0], key_record_from_row(row[1:], self._parsed_keys)) for row in rows]

    def changes_since(self, collection: str, position: int) -> tuple[list[ListingChange], int]:
        with self._snapshot() as conn:
            size = _size_of(conn, collection)
            rows = conn.execute(
                "SELECT idx, type, hash, listed FROM changes WHERE collection = ? AND idx >= ? ORDER BY idx, ordinal",
                (collection, position),
            ).fetchall()
        return [ListingChange(int(i), t, h, bool(listed)) for i, t, h, listed in rows], size

    def listed(self, collection: str, signal: str | None = None) -> tuple[list[tuple[str, str]], int]:
        """Every listed (type, hash) of a collection, or of one type, and the log size they reflect."""
        with self._snapshot() as conn:
            size = _size_of(conn, collection)
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
        with self._snapshot() as conn:
            rows = rows_by_hash(conn, "SELECT hash, content FROM contents", collection, signal, hashes)
        return {hash_hex: bytes(content) for hash_hex, content in rows}

    def details(self, collection: str, signal: str, hashes: Sequence[str]) -> dict[str, ListingDetail]:
        """Submitters, labels, first index and opinion counts of listed hashes."""
        with self._snapshot() as conn:
            listing_rows = rows_by_hash(
                conn, "SELECT hash, member, labels, since FROM listings", collection, signal, hashes
            )
            opinion_rows = rows_by_hash(
                conn,
                "SELECT hash, verdict, count(*) FROM opinions",
                collection,
                signal,
                hashes,
                " GROUP BY hash, verdict",
            )
        counts: dict[str, dict[str, int]] = {}
        for hash_hex, verdict, count in opinion_rows:
            counts.setdefault(hash_hex, {})[verdict] = int(count)
        grouped: dict[str, list[tuple[str, list[str], int]]] = {}
        for hash_hex, member, labels, since in listing_rows:
            grouped.setdefault(hash_hex, []).append((member, json.loads(labels), int(since)))
        result: dict[str, ListingDetail] = {}
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
        with self._snapshot() as conn:
            listing_rows = rows_by_hash(
                conn, "SELECT hash, member, labels FROM listings", collection, signal, hashes
            )
            opinion_rows = rows_by_hash(
                conn, "SELECT hash, member, verdict FROM opinions", collection, signal, hashes
            )
        views: dict[str, dict[str, MemberView]] = {}
        for hash_hex, member, labels in listing_rows:
            views.setdefault(hash_hex, {})[member] = MemberView(member, True, tuple(json.loads(labels)))
        for hash_hex, member, verdict in opinion_rows:
            if hash_hex not in views:
                continue  # opinions on a hash nobody lists any more
            held = views[hash_hex].get(member, MemberView(member, False))
            views[hash_hex][member] = replace(held, verdict=verdict)
        return {
            hash_hex: [by_member[name] for name in sorted(by_member)] for hash_hex, by_member in views.items()
        }

    # ---- mirrored collections (SQL in .sql_sources) --------------------------

    def sources(self) -> list[SourceRecord]:
        with self._connection() as conn:
            return read_sources(conn)

    def source(self, name: str) -> SourceRecord | None:
        with self._connection() as conn:
            return read_source(conn, name)

    @contextmanager
    def write_source(self, record: SourceRecord) -> Iterator[SqlTxn]:
        """A write transaction on a mirrored collection that also records ``record``.

        The collection and its source row are created by the first such
        transaction, and the source row (its checkpoints) is written in the
        same transaction as the entries: if the block raises, neither the
        entries nor the new checkpoints are kept.
        """
        with self._transaction() as conn:
            record_source(conn, record)
            size = self._lock_collection(conn, record.name)
            if size is None:
                raise StoreError(f"no collection named {record.name}")
            txn = SqlTxn(conn, record.name, size)
            yield txn
            txn.flush()
            self._written(conn, record.name)
        self._committed(txn.rows_written)

    def add_evidence(self, name: str, detected: str, body: str) -> None:
        """Keep fork evidence for a source and stop it, in one transaction."""
        with self._transaction() as conn:
            record_evidence(conn, name, detected, body)

    def evidence(self, name: str) -> list[str]:
        with self._connection() as conn:
            return read_evidence(conn, name)

    def resume_source(self, name: str) -> bool:
        """Clear a source's stop (its evidence is kept); False if it was not stopped."""
        with self._transaction() as conn:
            return resume_source(conn, name)
