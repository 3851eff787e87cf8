"""Choosing the store a hub's ``database`` setting names: SQLite (the default) or PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .base import HubStore, StoreError
from .sqlite import SqliteStore

DEFAULT_FILE = "hub.sqlite3"


def is_postgres(database: str) -> bool:
    return database.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{host}"


def sqlite_file(database: str, data_dir: Path) -> Path | None:
    """The SQLite file ``database`` names (relative paths from the data directory); None for PostgreSQL."""
    if is_postgres(database):
        return None
    if not database:
        return data_dir / DEFAULT_FILE
    return data_dir / database.removeprefix("sqlite:///")


def open_store(database: str, data_dir: Path, *, min_free_bytes: int = 0, pool_size: int = 8) -> HubStore:
    """The store ``database`` names; a clear :class:`StoreError` when it cannot be opened."""
    path = sqlite_file(database, data_dir)
    if path is None:
        try:
            from .postgres import PostgresStore
        except ImportError as exc:
            raise StoreError(
                "a PostgreSQL database needs psycopg: pip install 'hashfed[postgresql]'"
            ) from exc
        return PostgresStore(database, pool_size=pool_size)
    try:
        return SqliteStore(path, min_free_bytes=min_free_bytes)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open the hub's database {path}: {exc}") from exc
