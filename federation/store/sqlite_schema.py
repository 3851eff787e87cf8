"""The SQLite store's schema: its tables, its version, and the check made on open.

:mod:`.sqlite` creates the tables with :func:`ensure_schema` when it opens a
file; ``PROJECTION_TABLES`` are the ones ``rebuild`` empties and recomputes
from the log.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .base import StoreError

SCHEMA_VERSION = 1
PROJECTION_TABLES = ("keys", "seqs", "listings", "contents", "opinions", "changes", "hub_keys")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS collections (
    name TEXT PRIMARY KEY,
    size INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS entries (
    collection TEXT NOT NULL, idx INTEGER NOT NULL, leaf_hash BLOB NOT NULL, data BLOB NOT NULL,
    PRIMARY KEY (collection, idx)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS entries_by_leaf ON entries (collection, leaf_hash);
CREATE TABLE IF NOT EXISTS tree (
    collection TEXT NOT NULL, level INTEGER NOT NULL, idx INTEGER NOT NULL, hash BLOB NOT NULL,
    PRIMARY KEY (collection, level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS keys (
    collection TEXT NOT NULL, key_id TEXT NOT NULL, key TEXT NOT NULL, rights TEXT NOT NULL,
    granted INTEGER NOT NULL, revoked INTEGER,
    PRIMARY KEY (collection, key_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_id ON keys (key_id);
CREATE TABLE IF NOT EXISTS hub_keys (
    collection TEXT NOT NULL, idx INTEGER NOT NULL, key TEXT NOT NULL, previous TEXT NOT NULL,
    previous_until INTEGER NOT NULL,
    PRIMARY KEY (collection, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seqs (
    collection TEXT NOT NULL, key_id TEXT NOT NULL, seq INTEGER NOT NULL,
    PRIMARY KEY (collection, key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS listings (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, member TEXT NOT NULL,
    labels TEXT NOT NULL, quality INTEGER, since INTEGER NOT NULL,
    PRIMARY KEY (collection, type, hash, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS contents (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, content BLOB NOT NULL,
    PRIMARY KEY (collection, type, hash)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS opinions (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, member TEXT NOT NULL,
    verdict TEXT NOT NULL, note TEXT, idx INTEGER NOT NULL,
    PRIMARY KEY (collection, type, hash, member)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    collection TEXT NOT NULL, idx INTEGER NOT NULL, ordinal INTEGER NOT NULL,
    type TEXT NOT NULL, hash TEXT NOT NULL, listed INTEGER NOT NULL,
    PRIMARY KEY (collection, idx, ordinal)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sources (
    name TEXT PRIMARY KEY, hub TEXT NOT NULL, origin_collection TEXT NOT NULL, key TEXT NOT NULL,
    federation TEXT NOT NULL, url TEXT NOT NULL, checkpoint TEXT, target TEXT,
    forked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, detected TEXT NOT NULL, body TEXT NOT NULL
);
"""
"""Tables ``sources`` and ``evidence`` (mirrored collections, federation.sync) and
``contents`` (what a signal type keeps beside a listed hash: a video's frames) and ``hub_keys``
(hub key rotations) were added
after version 1 without changing it: ``CREATE TABLE IF NOT EXISTS`` adds them to an
older file on open, and nothing that reads version 1 needs them."""


def ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create any missing tables and refuse a file written with another schema version."""
    conn.executescript(SCHEMA)
    conn.execute(
        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0]
    if int(version) != SCHEMA_VERSION:
        raise StoreError(f"{path} has schema version {version}; this hashfed reads version {SCHEMA_VERSION}")
