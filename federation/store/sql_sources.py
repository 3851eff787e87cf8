"""The mirrored-collection tables, ``sources`` and ``evidence`` (federation.sync), in both stores.

Plain functions over a connection; transactions stay with the store, which calls these inside them.
"""

from __future__ import annotations

from .base import SourceRecord, StoreError
from .sql_txn import Connection

_SOURCE_COLUMNS = "name, hub, origin_collection, key, federation, url, checkpoint, target, forked"


def _source_record(row: tuple[str, str, str, str, str, str, str | None, str | None, int]) -> SourceRecord:
    name, hub, collection, key, federation, url, checkpoint, target, forked = row
    return SourceRecord(name, hub, collection, key, federation, url, checkpoint, target, bool(forked))


def read_sources(conn: Connection) -> list[SourceRecord]:
    """Every source, by name."""
    rows = conn.execute(f"SELECT {_SOURCE_COLUMNS} FROM sources ORDER BY name").fetchall()
    return [_source_record(row) for row in rows]


def read_source(conn: Connection, name: str) -> SourceRecord | None:
    row = conn.execute(f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE name = ?", (name,)).fetchone()
    return _source_record(row) if row else None


def record_source(conn: Connection, record: SourceRecord) -> int:
    """Within a write transaction: create or update ``record``'s source row; return its log size.

    The first call for a source creates its collection too. A source already
    recorded with another origin or key, or stopped by fork evidence, and a
    collection of that name that is not mirrored, are refused.
    """
    row = conn.execute(f"SELECT {_SOURCE_COLUMNS} FROM sources WHERE name = ?", (record.name,)).fetchone()
    if row is not None:
        existing = _source_record(row)
        identity = (existing.hub, existing.collection, existing.key, existing.federation)
        if identity != (record.hub, record.collection, record.key, record.federation):
            raise StoreError(f"source {record.name} is already recorded with another origin or key")
        if existing.forked:
            raise StoreError(f"source {record.name} is stopped: fork evidence was recorded for it")
    elif conn.execute("SELECT 1 FROM collections WHERE name = ?", (record.name,)).fetchone():
        raise StoreError(f"collection {record.name} exists and is not a mirrored collection")
    else:
        conn.execute("INSERT INTO collections (name) VALUES (?)", (record.name,))
    conn.execute(
        f"INSERT INTO sources ({_SOURCE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0) "
        "ON CONFLICT (name) DO UPDATE SET url = excluded.url, checkpoint = excluded.checkpoint, "
        "target = excluded.target",
        (
            record.name,
            record.hub,
            record.collection,
            record.key,
            record.federation,
            record.url,
            record.checkpoint,
            record.target,
        ),
    )
    return int(conn.execute("SELECT size FROM collections WHERE name = ?", (record.name,)).fetchone()[0])


def record_evidence(conn: Connection, name: str, detected: str, body: str) -> None:
    """Within a write transaction: keep fork evidence for a source and mark it stopped."""
    updated = conn.execute("UPDATE sources SET forked = 1 WHERE name = ?", (name,)).rowcount
    if not updated:
        raise StoreError(f"no mirrored collection named {name}")
    conn.execute("INSERT INTO evidence (source, detected, body) VALUES (?, ?, ?)", (name, detected, body))


def read_evidence(conn: Connection, name: str) -> list[str]:
    rows = conn.execute("SELECT body FROM evidence WHERE source = ? ORDER BY id", (name,))
    return [str(row[0]) for row in rows]


def resume_source(conn: Connection, name: str) -> bool:
    """Within a write transaction: let a stopped source sync again; False if it was not stopped.

    The evidence stays: it is the record of what was seen and investigated.
    """
    row = conn.execute("SELECT forked FROM sources WHERE name = ?", (name,)).fetchone()
    if row is None:
        raise StoreError(f"no mirrored collection named {name}")
    conn.execute("UPDATE sources SET forked = 0 WHERE name = ?", (name,))
    return bool(row[0])
