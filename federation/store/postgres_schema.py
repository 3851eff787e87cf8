"""The PostgreSQL store's schema, as numbered migrations applied in order when a store opens.

Each migration runs once, in one transaction with its row in
``schema_migrations``, under an advisory lock, so replicas starting together
apply it once and a failed migration leaves nothing half done. A database
migrated by a newer hashfed than this one is refused rather than written.
The tables are the SQLite store's (:mod:`.sqlite_schema`), with PostgreSQL's
types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import StoreError

MIGRATION_LOCK = 0x68617368666564
"""The advisory lock key that serialises migrations (``hashfed`` in ASCII)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS = (
    Migration(
        1,
        "the log, its stored tree, the projection and mirrored collections",
        """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE collections (name TEXT PRIMARY KEY, size BIGINT NOT NULL DEFAULT 0);
CREATE TABLE entries (
    collection TEXT NOT NULL, idx BIGINT NOT NULL, leaf_hash BYTEA NOT NULL, data BYTEA NOT NULL,
    PRIMARY KEY (collection, idx)
);
CREATE UNIQUE INDEX entries_by_leaf ON entries (collection, leaf_hash);
CREATE TABLE tree (
    collection TEXT NOT NULL, level INTEGER NOT NULL, idx BIGINT NOT NULL, hash BYTEA NOT NULL,
    PRIMARY KEY (collection, level, idx)
);
CREATE TABLE keys (
    collection TEXT NOT NULL, key_id TEXT NOT NULL, key TEXT NOT NULL, rights TEXT NOT NULL,
    granted BIGINT NOT NULL, revoked BIGINT,
    PRIMARY KEY (collection, key_id)
);
CREATE INDEX keys_by_id ON keys (key_id);
CREATE TABLE hub_keys (
    collection TEXT NOT NULL, idx BIGINT NOT NULL, key TEXT NOT NULL, previous TEXT NOT NULL,
    previous_until BIGINT NOT NULL,
    PRIMARY KEY (collection, idx)
);
CREATE TABLE seqs (
    collection TEXT NOT NULL, key_id TEXT NOT NULL, seq BIGINT NOT NULL,
    PRIMARY KEY (collection, key_id)
);
CREATE TABLE listings (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, member TEXT NOT NULL,
    labels TEXT NOT NULL, quality INTEGER, since BIGINT NOT NULL,
    PRIMARY KEY (collection, type, hash, member)
);
CREATE TABLE contents (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, content BYTEA NOT NULL,
    PRIMARY KEY (collection, type, hash)
);
CREATE TABLE opinions (
    collection TEXT NOT NULL, type TEXT NOT NULL, hash TEXT NOT NULL, member TEXT NOT NULL,
    verdict TEXT NOT NULL, note TEXT, idx BIGINT NOT NULL,
    PRIMARY KEY (collection, type, hash, member)
);
CREATE TABLE changes (
    collection TEXT NOT NULL, idx BIGINT NOT NULL, ordinal INTEGER NOT NULL,
    type TEXT NOT NULL, hash TEXT NOT NULL, listed INTEGER NOT NULL,
    PRIMARY KEY (collection, idx, ordinal)
);
CREATE TABLE sources (
    name TEXT PRIMARY KEY, hub TEXT NOT NULL, origin_collection TEXT NOT NULL, key TEXT NOT NULL,
    federation TEXT NOT NULL, url TEXT NOT NULL, checkpoint TEXT, target TEXT,
    forked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE evidence (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, source TEXT NOT NULL, detected TEXT NOT NULL,
    body TEXT NOT NULL
);
""",
    ),
    Migration(
        2,
        "signatures seen by any replica, for replay protection across machines",
        """
CREATE UNLOGGED TABLE seen_signatures (signature BYTEA PRIMARY KEY, expires BIGINT NOT NULL);
CREATE INDEX seen_signatures_by_expiry ON seen_signatures (expires);
""",
    ),
    Migration(
        3,
        "rate limit buckets shared by every replica",
        # asked and granted are the last charge's, for RETURNING: an upsert's
        # update sees the requested count only through the row it would insert.
        """
CREATE UNLOGGED TABLE rate_buckets (
    key_id TEXT PRIMARY KEY,
    tokens DOUBLE PRECISION NOT NULL,
    counted DOUBLE PRECISION NOT NULL,
    asked INTEGER NOT NULL,
    granted INTEGER NOT NULL
);
""",
    ),
)
LATEST = MIGRATIONS[-1].version


def migrate(conn: Any) -> list[Migration]:
    """Apply the migrations ``conn``'s database lacks (a psycopg connection in autocommit mode).

    Returns the ones applied. Refuses a database whose schema is newer than this hashfed.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            "version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        applied = {int(row[0]) for row in conn.execute("SELECT version FROM schema_migrations")}
        newest = max(applied, default=0)
        if newest > LATEST:
            raise StoreError(
                f"the database's schema is at version {newest}, newer than this hashfed knows "
                f"(version {LATEST}): upgrade hashfed on this machine before serving it"
            )
        done: list[Migration] = []
        for migration in MIGRATIONS:
            if migration.version in applied:
                continue
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            done.append(migration)
        return done
