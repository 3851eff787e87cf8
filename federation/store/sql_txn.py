"""Write transactions on one collection, and the row readers they share with the stores.

The SQL here is the subset SQLite and PostgreSQL agree on, written with
``?`` placeholders (:class:`~.postgres.PostgresStore` hands psycopg ``%s``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from ..keys import VerifierKey
from ..merkle import HashKey, append_keys, hashes_to_store, leaf_hash
from ..state import HubKeyRecord, KeyRecord, ListingChange
from .base import EntryRecord, StoreError


class Cursor(Protocol):
    """What the stores read from a statement (sqlite3's and psycopg's cursors both fit)."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A database connection with ``?`` placeholders, inside a transaction the store opened."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Sequence[Sequence[Any]], /) -> Any: ...


def read_tree(conn: Connection, collection: str, keys: Sequence[HashKey]) -> list[bytes]:
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


def key_record_from_row(
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


def read_hub_keys(conn: Connection, collection: str) -> list[HubKeyRecord]:
    rows = conn.execute(
        "SELECT key, idx, previous, previous_until FROM hub_keys WHERE collection = ? ORDER BY idx",
        (collection,),
    )
    return [
        HubKeyRecord(VerifierKey.parse(key), int(index), VerifierKey.parse(previous), int(until))
        for key, index, previous, until in rows
    ]


def in_chunks(hashes: Sequence[str], size: int = 500) -> Iterator[tuple[list[str], str]]:
    """The distinct hashes in chunks small enough for one ``IN (?, …)``, each with its placeholders."""
    unique = list(dict.fromkeys(hashes))
    for start in range(0, len(unique), size):
        chunk = unique[start : start + size]
        yield chunk, ",".join("?" * len(chunk))


def rows_by_hash(
    conn: Connection, select: str, collection: str, signal: str, hashes: Sequence[str], tail: str = ""
) -> list[Any]:
    """The rows of ``select`` (``SELECT … FROM table``) for some hashes of one type in a collection.

    The hashes go in ``IN (…)`` lists of at most 500; ``tail`` (a ``GROUP BY``) applies per list,
    which is enough for groups by hash.
    """
    rows: list[Any] = []
    for chunk, marks in in_chunks(hashes):
        rows.extend(
            conn.execute(
                f"{select} WHERE collection = ? AND type = ? AND hash IN ({marks}){tail}",
                (collection, signal, *chunk),
            ).fetchall()
        )
    return rows


class SqlTxn:
    """A write transaction on one collection (implements ``CollectionTxn``).

    Writes are queued and sent in runs (``executemany``) before the next
    read and when the transaction ends (:meth:`flush`), and
    :meth:`read_ahead` loads who lists the hashes an entry touches in a few
    queries: a batch of 100,000 items then costs a handful of round trips to
    PostgreSQL rather than 300,000, and SQLite saves its per-statement cost.
    """

    def __init__(self, conn: Connection, collection: str, size: int) -> None:
        self._conn = conn
        self._collection = collection
        self._size = size
        self._ordinal = 0
        self._pending: list[tuple[str, list[Sequence[Any]]]] = []
        self.rows_written = 0
        """Rows this transaction wrote (inserted, replaced or deleted one at a time)."""
        self._listers: dict[tuple[str, str], set[str]] = {}
        """Members listing each (type, hash) read ahead, kept current by this transaction's writes."""

    def _write(self, sql: str, parameters: Sequence[Any]) -> None:
        self.rows_written += 1
        if self._pending and self._pending[-1][0] == sql:
            self._pending[-1][1].append(parameters)
        else:
            self._pending.append((sql, [parameters]))

    def flush(self) -> None:
        """Send the queued writes, in order (before a read, and before the transaction commits)."""
        pending, self._pending = self._pending, []
        for sql, rows in pending:
            if len(rows) == 1:
                self._conn.execute(sql, rows[0])
            else:
                self._conn.executemany(sql, rows)

    def _read(self) -> Connection:
        self.flush()
        return self._conn

    def read_ahead(self, keys: Sequence[tuple[str, str]]) -> None:
        by_signal: dict[str, list[str]] = {}
        for signal, hash_hex in keys:
            if (signal, hash_hex) not in self._listers:
                self._listers[(signal, hash_hex)] = set()
                by_signal.setdefault(signal, []).append(hash_hex)
        conn = self._read()
        for signal, hashes in by_signal.items():
            for hash_hex, member in rows_by_hash(
                conn, "SELECT hash, member FROM listings", self._collection, signal, hashes
            ):
                self._listers[(signal, hash_hex)].add(member)

    def log_size(self) -> int:
        return self._size

    def read_hashes(self, keys: Sequence[HashKey]) -> list[bytes]:
        return read_tree(self._read(), self._collection, keys)

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
            rows = (
                self._read()
                .execute(
                    "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? AND idx >= ? ORDER BY idx LIMIT ?",
                    (self._collection, position, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            for index, leaf, data in rows:
                yield EntryRecord(int(index), bytes(leaf), bytes(data))
            position = int(rows[-1][0]) + 1

    def key_record(self, key_id: str) -> KeyRecord | None:
        row = (
            self._read()
            .execute(
                "SELECT key, rights, granted, revoked FROM keys WHERE collection = ? AND key_id = ?",
                (self._collection, key_id),
            )
            .fetchone()
        )
        return key_record_from_row(row) if row else None

    def last_seq(self, key_id: str) -> int:
        row = (
            self._read()
            .execute("SELECT seq FROM seqs WHERE collection = ? AND key_id = ?", (self._collection, key_id))
            .fetchone()
        )
        return int(row[0]) if row else 0

    def lists(self, signal: str, hash_hex: str, member: str) -> bool:
        known = self._listers.get((signal, hash_hex))
        if known is not None:
            return member in known
        row = (
            self._read()
            .execute(
                "SELECT 1 FROM listings WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
                (self._collection, signal, hash_hex, member),
            )
            .fetchone()
        )
        return row is not None

    def listers(self, signal: str, hash_hex: str) -> int:
        known = self._listers.get((signal, hash_hex))
        if known is not None:
            return len(known)
        row = (
            self._read()
            .execute(
                "SELECT count(*) FROM listings WHERE collection = ? AND type = ? AND hash = ?",
                (self._collection, signal, hash_hex),
            )
            .fetchone()
        )
        return int(row[0])

    def hub_keys(self) -> list[HubKeyRecord]:
        return read_hub_keys(self._read(), self._collection)

    def put_hub_key(self, record: HubKeyRecord) -> None:
        self._write(
            "INSERT INTO hub_keys (collection, idx, key, previous, previous_until) VALUES (?, ?, ?, ?, ?)",
            (
                self._collection,
                record.index,
                record.key.encode(),
                record.previous.encode(),
                record.previous_until,
            ),
        )

    def put_key(self, record: KeyRecord) -> None:
        self._write(
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
        self._write(
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
        self._write(
            "INSERT INTO listings (collection, type, hash, member, labels, quality, since) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, type, hash, member) DO UPDATE SET labels = excluded.labels, quality = excluded.quality",
            (self._collection, signal, hash_hex, member, json.dumps(list(labels)), quality, index),
        )
        known = self._listers.get((signal, hash_hex))
        if known is not None:
            known.add(member)

    def delete_listing(self, signal: str, hash_hex: str, member: str) -> None:
        self._write(
            "DELETE FROM listings WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
            (self._collection, signal, hash_hex, member),
        )
        known = self._listers.get((signal, hash_hex))
        if known is not None:
            known.discard(member)

    def put_opinion(
        self, signal: str, hash_hex: str, member: str, verdict: str, note: str | None, index: int
    ) -> None:
        self._write(
            "INSERT INTO opinions (collection, type, hash, member, verdict, note, idx) VALUES (?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (collection, type, hash, member) DO UPDATE SET verdict = excluded.verdict, note = excluded.note, idx = excluded.idx",
            (self._collection, signal, hash_hex, member, verdict, note, index),
        )

    def delete_opinion(self, signal: str, hash_hex: str, member: str) -> None:
        self._write(
            "DELETE FROM opinions WHERE collection = ? AND type = ? AND hash = ? AND member = ?",
            (self._collection, signal, hash_hex, member),
        )

    def put_content(self, signal: str, hash_hex: str, content: bytes) -> None:
        # A hash's content follows from the hash itself (a vPDQ identity digests its frames).
        self._write(
            "INSERT INTO contents (collection, type, hash, content) VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (self._collection, signal, hash_hex, content),
        )

    def record_change(self, change: ListingChange) -> None:
        self._write(
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
