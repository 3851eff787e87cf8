"""SQLite write transactions on one collection, and the row readers they share with the store."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence

from ..keys import VerifierKey
from ..merkle import HashKey, append_keys, hashes_to_store, leaf_hash
from ..state import HubKeyRecord, KeyRecord, ListingChange
from .base import EntryRecord, StoreError


def read_tree(conn: sqlite3.Connection, collection: str, keys: Sequence[HashKey]) -> list[bytes]:
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


def read_hub_keys(conn: sqlite3.Connection, collection: str) -> list[HubKeyRecord]:
    rows = conn.execute(
        "SELECT key, idx, previous, previous_until FROM hub_keys WHERE collection = ? ORDER BY idx",
        (collection,),
    )
    return [
        HubKeyRecord(VerifierKey.parse(key), int(index), VerifierKey.parse(previous), int(until))
        for key, index, previous, until in rows
    ]


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
        return read_tree(self._conn, self._collection, keys)

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
        return key_record_from_row(row) if row else None

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

    def hub_keys(self) -> list[HubKeyRecord]:
        return read_hub_keys(self._conn, self._collection)

    def put_hub_key(self, record: HubKeyRecord) -> None:
        self._conn.execute(
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
