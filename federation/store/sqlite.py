"""SQLite storage (WAL): the embedded default.

Each thread gets its own connection. Writes take ``BEGIN IMMEDIATE`` so the
hub and a CLI command writing to the same file (``hashfed member grant``
while the hub serves) are serialised by SQLite itself, and commit with
``synchronous=FULL`` so an acknowledged entry survives a crash or power loss.

The tables and their version are in :mod:`.sqlite_schema`; the SQL for
mirrored collections (``sources``, ``evidence``) is in :mod:`.sqlite_sources`.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from ..keys import VerifierKey
from ..merkle import HashKey, append_keys, hashes_to_store, leaf_hash
from ..state import KeyRecord, ListingChange
from .base import EntryRecord, ListingDetail, SourceRecord, StoreError
from .sqlite_schema import PROJECTION_TABLES, SCHEMA, SCHEMA_VERSION, ensure_schema
from .sqlite_sources import (
    read_evidence,
    read_source,
    read_sources,
    record_evidence,
    record_source,
    resume_source,
)

__all__ = ["PROJECTION_TABLES", "SCHEMA", "SCHEMA_VERSION", "SqliteStore", "SqliteTxn"]


def _read_tree(conn: sqlite3.Connection, collection: str, keys: Sequence[HashKey]) -> list[bytes]:
    """One query for a batch of stored subtree hashes."""
    found: dict[HashKey, bytes] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), 300):
        chunk = unique[start : start + 300]
        clause = " OR ".join("(level = ? AND idx = ?)" for _ in chunk)
        params: list[object] = [collection]
        for level, index in chunk:
            params.extend((level, index))
        for level, index, value in conn.execute(
            f"SELECT level, idx, hash FROM tree WHERE collection = ? AND ({clause})", params
        ):
            found[(level, index)] = value
    try:
        return [found[key] for key in keys]
    except KeyError as exc:
        raise StoreError(f"collection {collection}: stored tree hash {exc.args[0]} is missing") from exc


def _key_record(
    row: tuple[str, str, int, int | None], parsed: dict[str, VerifierKey] | None = None
) -> KeyRecord:
    """A key record from its row; ``parsed`` remembers keys already parsed (hot on every request)."""
    key_text, rights, granted, revoked = row
    key = parsed.get(key_text) if parsed is not None else None
    if key is None:
        key = VerifierKey.parse(key_text)
        if parsed is not None:
            parsed[key_text] = key
    return KeyRecord(key, frozenset(json.loads(rights)), granted, revoked)


class SqliteTxn:
    """A write transaction on one collection (implements ``CollectionTxn``)."""

    def __init__(self, conn: sqlite3.Connection, collection: str, size: int) -> None:
        self._conn = conn
        self._collection = collection
        self._size = size
        self._ordinal = 0

    def log_size(self) -> int:
        return self._size

    def read_hashes(self, keys: Sequence[HashKey]) -> list[bytes]:
        return _read_tree(self._conn, self._collection, keys)

    def append(self, data: bytes) -> EntryRecord:
        index = self._size
        leaf = leaf_hash(data)
        siblings = self.read_hashes(append_keys(index))
        self._conn.executemany(
            "INSERT INTO tree (collection, level, idx, hash) VALUES (?, ?, ?, ?)",
            [(self._collection, level, i, h) for (level, i), h in hashes_to_store(index, leaf, siblings)],
        )
        self._conn.execute(
            "INSERT INTO entries (collection, idx, leaf_hash, data) VALUES (?, ?, ?, ?)",
            (self._collection, index, leaf, data),
        )
        self._size += 1
        self._ordinal = 0
        self._conn.execute("UPDATE collections SET size = ? WHERE name = ?", (self._size, self._collection))
        return EntryRecord(index, leaf, data)

    def replayed(self, record: EntryRecord) -> None:
        """Advance past an entry already in the log (rebuilding the projection)."""
        if record.index != self._size:
            raise StoreError(f"replay out of order: expected index {self._size}, got {record.index}")
        self._size += 1
        self._ordinal = 0

    def logged_entries(self, batch: int = 1000) -> Iterator[EntryRecord]:
        position = 0
        while True:
            rows = self._conn.execute(
                "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND idx >= ? ORDER BY idx LIMIT ?",
                (self._collection, position, batch),
            ).fetchall()
            if not rows:
                return
            for index, leaf, data in rows:
                yield EntryRecord(int(index), bytes(leaf), bytes(data))
            position = int(rows[-1][0]) + 1

    def key_record(self, key_id: str) -> KeyRecord | None:
        row = self._conn.execute(
            "SELECT key, rights, granted, revoked FROM keys WHERE collection = ? AND key_id = ?",
            (self._collection, key_id),
        ).fetchone()
        return _key_record(row) if row else None

    def last_seq(self, key_id: str) -> int:
        row = self._conn.execute(
            "SELECT seq FROM seqs WHERE collection = ? AND key_id = ?", (self._collection, key_id)
        ).fetchone()
        return int(row[0]) if row else 0

    def lists(self, signal: str, hash_hex: str, member: str) -> bool:
        row = self._conn.execute(
            "SELECT 1 FROM listings WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
            (self._collection, signal, hash_hex, member),
        ).fetchone()
        return row is not None

    def listers(self, signal: str, hash_hex: str) -> int:
        row = self._conn.execute(
            "SELECT count(*) FROM listings WHERE collection = ? AND type = ? AND hash = ?",
            (self._collection, signal, hash_hex),
        ).fetchone()
        return int(row[0])

    def put_key(self, record: KeyRecord) -> None:
        self._conn.execute(
            "INSERT INTO keys (collection, key_id, key, rights, granted, revoked) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, key_id) DO UPDATE SET rights = excluded.rights, granted = excluded.granted, revoked = excluded.revoked",
            (
                self._collection,
                record.key.key_id,
                record.key.encode(),
                json.dumps(sorted(record.rights)),
                record.granted_index,
                record.revoked_index,
            ),
        )

    def set_last_seq(self, key_id: str, seq: int) -> None:
        self._conn.execute(
            "INSERT INTO seqs (collection, key_id, seq) VALUES (?, ?, ?) "
            "ON CONFLICT (collection, key_id) DO UPDATE SET seq = excluded.seq",
            (self._collection, key_id, seq),
        )

    def put_listing(
        self,
        signal: str,
        hash_hex: str,
        member: str,
        labels: Sequence[str],
        quality: int | None,
        index: int,
    ) -> None:
        self._conn.execute(
            "INSERT INTO listings (collection, type, hash, member, labels, quality, since) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, type, hash, member) DO UPDATE SET labels = excluded.labels, quality = excluded.quality",
            (self._collection, signal, hash_hex, member, json.dumps(list(labels)), quality, index),
        )

    def delete_listing(self, signal: str, hash_hex: str, member: str) -> None:
        self._conn.execute(
            "DELETE FROM listings WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
            (self._collection, signal, hash_hex, member),
        )

    def put_opinion(
        self, signal: str, hash_hex: str, member: str, verdict: str, note: str | None, index: int
    ) -> None:
        self._conn.execute(
            "INSERT INTO opinions (collection, type, hash, member, verdict, note, idx) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, type, hash, member) DO UPDATE SET verdict = excluded.verdict, note = excluded.note, idx = excluded.idx",
            (self._collection, signal, hash_hex, member, verdict, note, index),
        )

    def delete_opinion(self, signal: str, hash_hex: str, member: str) -> None:
        self._conn.execute(
            "DELETE FROM opinions WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
            (self._collection, signal, hash_hex, member),
        )

    def put_content(self, signal: str, hash_hex: str, content: bytes) -> None:
        # A hash's content follows from the hash itself (a vPDQ identity digests its frames).
        self._conn.execute(
            "INSERT OR IGNORE INTO contents (collection, type, hash, content) VALUES (?, ?, ?, ?)",
            (self._collection, signal, hash_hex, content),
        )

    def record_change(self, change: ListingChange) -> None:
        self._conn.execute(
            "INSERT INTO changes (collection, idx, ordinal, type, hash, listed) VALUES (?, ?, ?, ?, ?, ?)",
            (
                self._collection,
                change.index,
                self._ordinal,
                change.signal,
                change.hash,
                int(change.listed),
            ),
        )
        self._ordinal += 1


def _in_chunks(hashes: Sequence[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """The distinct hashes in chunks small enough for one ``IN (?, …)``, each with its placeholders."""
    unique = list(dict.fromkeys(hashes))
    for start in range(0, len(unique), size):
        chunk = unique[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


class SqliteStore:
    """The hub's storage in one SQLite file (implements ``HubStore``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._parsed_keys: dict[str, VerifierKey] = {}
        self._lock = threading.Lock()
        ensure_schema(self._conn(), path)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 30000")
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
        """A write transaction (``BEGIN IMMEDIATE``): committed when the block ends, else rolled back."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

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
        return _read_tree(self._conn(), collection, keys)

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

    def keys(self, collection: str) -> list[KeyRecord]:
        rows = self._conn().execute(
            "SELECT key, rights, granted, revoked FROM keys WHERE collection = ? ORDER BY granted, key_id",
            (collection,),
        )
        return [_key_record(row) for row in rows]

    def key_memberships(self, key_id: str) -> list[tuple[str, KeyRecord]]:
        rows = self._conn().execute(
            "SELECT collection, key, rights, granted, revoked FROM keys WHERE key_id = ?", (key_id,)
        )
        return [(row[0], _key_record(row[1:], self._parsed_keys)) for row in rows]

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
