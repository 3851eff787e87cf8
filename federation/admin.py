"""Hub-side administration: creating a data directory, collections and memberships.

These write straight to the hub's database through the same node code the
server uses, so they work whether or not the hub is serving; a serving hub
sees the new entries on its next request.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, DataDir, HubConfig
from .dirlock import DirectoryLock
from .durable import fsync_directory, make_private_directory, write_atomically
from .envelope import Grant
from .hub.server import open_node
from .keys import (
    SignerKey,
    VerifierKey,
    check_collection_name,
    check_name,
    load_signer_file,
    write_signer_file,
)
from .node import Accepted
from .state import KeyRecord
from .store.base import StoreError
from .store.opening import is_postgres, open_store, sqlite_file
from .store.storage_faults import free_bytes, is_read_only


def init_hub(path: Path, *, name: str, federation: str, collection: str, database: str = "") -> VerifierKey:
    """Create a hub data directory with its key, database, config and first collection.

    ``database`` is hub.toml's setting: empty for SQLite in the directory, or
    a PostgreSQL URL, which must name an empty database (``createdb``).
    """
    check_name(name)
    check_name(federation)
    check_collection_name(collection)
    config = HubConfig(name=name, federation=federation, database=database)
    data = DataDir(path)
    if data.config_file.exists():
        raise ConfigError(f"{path} is already a hub data directory")
    if is_postgres(database):
        _claim_database(config, path)
    make_private_directory(path)
    signer = SignerKey.generate(name)
    write_signer_file(signer, data.signer_file)
    write_atomically(data.verifier_file, signer.verifier.encode() + "\n")
    write_atomically(data.key_chain_file, signer.verifier.encode() + "\n")  # grows with each rotation
    write_atomically(data.config_file, config.to_toml())
    if not is_postgres(database):
        _claim_database(config, path)
    add_collection(data, collection)
    return signer.verifier


def _claim_database(config: HubConfig, path: Path) -> None:
    """Mark the database as this hub's before anything is written to it; refuse another hub's."""
    try:
        store = open_store(config.database, path)
    except StoreError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        store.claim(config.name)
    except StoreError as exc:
        raise ConfigError(
            f"{exc}: give `hashfed init --db` an empty database (createdb NAME); to run another "
            "replica of that hub, copy its data directory instead"
        ) from exc
    finally:
        store.close()


def add_collection(data: DataDir, collection: str, grants: Sequence[Grant] = ()) -> Accepted:
    check_collection_name(collection)
    node = open_node(data, searchable=False)
    try:
        return node.create_collection(collection, grants)
    except StoreError as exc:
        raise ConfigError(str(exc)) from exc
    finally:
        node.store.close()


def change_membership(
    data: DataDir, collection: str, grant: Sequence[Grant] = (), revoke: Sequence[str] = ()
) -> Accepted:
    node = open_node(data, searchable=False)
    try:
        if collection not in node.collections():
            known = ", ".join(node.collections()) or "none"
            raise ConfigError(f"no collection named {collection!r} (this hub has: {known})")
        return node.change_membership(collection, grant, revoke)
    finally:
        node.store.close()


def list_members(data: DataDir) -> list[tuple[str, KeyRecord]]:
    node = open_node(data, searchable=False)
    try:
        return [(c, record) for c in node.collections() for record in node.store.keys(c)]
    finally:
        node.store.close()


def rebuild(data: DataDir) -> dict[str, int]:
    """Replay every collection's log into a fresh projection; return entries replayed per collection."""
    check_room_to_rebuild(data)
    # Index snapshots derive from the projection about to be rebuilt: drop them first
    # (a crash mid-way must not leave old ones), and the next start builds afresh.
    for snapshot in data.index_dir.glob("*.json"):
        snapshot.unlink(missing_ok=True)
    for segment in data.index_dir.glob("*"):
        if segment.is_dir():
            shutil.rmtree(segment, ignore_errors=True)
    node = open_node(data, searchable=False)
    try:
        return {collection: node.rebuild(collection) for collection in node.collections()}
    finally:
        node.store.close()


def check_room_to_rebuild(data: DataDir) -> None:
    """Refuse to start a rebuild that cannot finish: before anything is deleted or rewritten.

    The rebuild rewrites every projection table in one transaction, whose WAL
    can grow as large as the database; that much must be free above the
    ``min_free_bytes`` reserve.
    """
    if is_read_only(data.path) or not os.access(data.path, os.W_OK):
        raise ConfigError(
            f"{data.path} is read-only; `hashfed rebuild` needs to write there; nothing was changed"
        )
    database = sqlite_file(data.config().database, data.path)
    if database is None:
        return  # PostgreSQL: the server's disk is the server's to watch
    needed = sum(_size(path) for path in (database, database.with_name(database.name + "-wal")))
    reserve = data.config().min_free_bytes
    free = free_bytes(data.path)
    if free - reserve < needed:
        raise ConfigError(
            f"`hashfed rebuild` may need up to {needed:,} bytes for its transaction, but the disk holding "
            f"{data.path} has {free:,} bytes free (and keeps {reserve:,} in reserve, min_free_bytes); "
            "free space first; nothing was changed"
        )


def _size(path: Path) -> int:
    """A file's size, 0 if it is not there (SQLite removes its WAL when the last connection closes)."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def rotate_hub_key(
    data: DataDir, overlap_seconds: int
) -> tuple[VerifierKey, VerifierKey, dict[str, int | None]]:
    """Hand every own collection over to a new hub key; return (old key, new key, rotation index per collection).

    Resumable: the new key is written (``hub.key.next``) before any entry
    names it, each collection already handed over is skipped, and the old key
    is kept in ``retired/`` before ``hub.key`` is replaced, so a crash at any
    point leaves a directory the same command finishes. The hub must be
    stopped: a serving hub would hold only the old key.
    """
    lock = DirectoryLock(data.path)
    lock.acquire()  # refuses while `hashfed serve` runs
    try:
        old = data.signer()
        if data.next_signer_file.exists():
            new = load_signer_file(data.next_signer_file)
        else:
            new = SignerKey.generate(old.name)
            write_signer_file(new, data.next_signer_file)
        node = open_node(data, searchable=False)
        node.keys.add(new)
        try:
            rotated = {
                collection: (
                    None
                    if (accepted := node.rotate_key(collection, new, overlap_seconds)) is None
                    else accepted.entry.index
                )
                for collection in node.own_collections()
            }
        finally:
            node.store.close()
        make_private_directory(data.retired_dir)
        if all(key.key_id != old.key_id for key in data.retired_signers()):  # not kept by an earlier try
            number = len(data.retired_signers()) + 1
            write_signer_file(old, data.retired_dir / f"{number:04d}-{old.key_id.replace('+', '-')}.key")
        chain = [key.verifier.encode() for key in data.retired_signers()] + [new.verifier.encode()]
        write_atomically(data.key_chain_file, "\n".join(chain) + "\n")
        write_atomically(data.verifier_file, new.verifier.encode() + "\n")
        os.replace(data.next_signer_file, data.signer_file)
        fsync_directory(data.path)
        return old.verifier, new.verifier, rotated
    finally:
        lock.release()
