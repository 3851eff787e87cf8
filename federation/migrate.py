"""``hashfed migrate-store``: move a hub's log from its SQLite file to a PostgreSQL database.

The log is what moves: its entries are appended to the new store in order
(which stores the tree hashes afresh), and the projection is then rebuilt
from them through the one apply path (:func:`federation.node.Node.rebuild`),
checking every entry again. Before hub.toml is switched over, the copy is
compared with the original: the same entries, the same root at every
collection's size, the same projection. The SQLite file is left as it was,
so an interrupted or refused move changes nothing the hub serves from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from . import merkle
from .config import ConfigError, DataDir, HubConfig
from .dirlock import DirectoryLock
from .durable import write_atomically
from .node import Node, StoredTree
from .store.base import HubStore, StoreError
from .store.opening import is_postgres, open_store, redact, sqlite_file

CHUNK = 2_000
"""Entries copied per transaction."""


@dataclass(frozen=True)
class Moved:
    collection: str
    entries: int
    root: bytes


def migrate_store(
    data: DataDir, target: str, progress: Callable[[str, int, int], None] | None = None
) -> list[Moved]:
    """Copy ``data``'s log to the PostgreSQL database ``target``, check it, and point hub.toml at it.

    Refuses while the hub serves (its directory lock), when the hub already
    uses PostgreSQL, and when ``target`` is not an empty database.
    """
    config = data.config()
    source_file = sqlite_file(config.database, data.path)
    if source_file is None:
        raise ConfigError(f"{data.path} already keeps its log in PostgreSQL ({redact(config.database)})")
    if not is_postgres(target):
        raise ConfigError(f"--to {target!r} is not a postgresql:// URL")
    lock = DirectoryLock(data.path)
    lock.acquire()  # the hub must not append while its log is copied
    try:
        source = open_store(config.database, data.path)
        try:
            destination = open_store(target, data.path, pool_size=2)
        except StoreError as exc:
            source.close()
            raise ConfigError(str(exc)) from exc
        try:
            if destination.collections():
                raise ConfigError(
                    f"{redact(target)} already holds collections; give an empty database "
                    "(after an interrupted move: dropdb and createdb it again); nothing was changed"
                )
            destination.claim(config.name)
            moved = [_copy(source, destination, name, progress) for name in source.collections()]
            _rebuild_and_compare(data, config, source, destination)
        finally:
            source.close()
            destination.close()
        write_atomically(data.config_file, replace(config, database=target).to_toml())
        return moved
    finally:
        lock.release()


def _copy(
    source: HubStore, destination: HubStore, collection: str, progress: Callable[[str, int, int], None] | None
) -> Moved:
    """Append ``collection``'s entries to ``destination`` in order, with its source record and evidence."""
    size = source.log_size(collection)
    record = source.source(collection)
    if record is None:
        destination.create_collection(collection)
    else:
        with destination.write_source(replace(record, forked=False)):
            pass  # creates the mirrored collection with its source record
        for body in source.evidence(collection):
            destination.add_evidence(collection, "copied by hashfed migrate-store", body)
        if not record.forked and source.evidence(collection):
            destination.resume_source(collection)
    position = 0
    while position < size:
        chunk = source.entries(collection, position, CHUNK)
        with destination.write(collection) as txn:
            for entry in chunk:
                if txn.append(entry.data) != entry:
                    raise StoreError(f"collection {collection}: entry {entry.index} was copied differently")
        position += len(chunk)
        if progress is not None:
            progress(collection, position, size)
    return Moved(collection, size, merkle.root(StoredTree(source, collection), size))


def _rebuild_and_compare(data: DataDir, config: HubConfig, source: HubStore, destination: HubStore) -> None:
    """Rebuild the copy's projection from its log, then check it equals the original's."""
    node = Node(
        destination,
        name=config.name,
        federation=config.federation,
        hub_key=data.signer().verifier,
        signer=data.signer(),
        retired=data.retired_signers(),
        limits=config.limits,
        searchable=False,
    )
    for collection in source.collections():
        node.rebuild(collection)
        size = source.log_size(collection)
        checks = {
            "log size": (source.log_size(collection), destination.log_size(collection)),
            "root": (
                merkle.root(StoredTree(source, collection), size),
                merkle.root(StoredTree(destination, collection), size),
            ),
            "listings": (sorted(source.listed(collection)[0]), sorted(destination.listed(collection)[0])),
            "listing changes": (
                source.changes_since(collection, 0),
                destination.changes_since(collection, 0),
            ),
            "member keys": (source.keys(collection), destination.keys(collection)),
            "hub keys": (source.hub_keys(collection), destination.hub_keys(collection)),
            "source record": (source.source(collection), destination.source(collection)),
        }
        for what, (before, after) in checks.items():
            if before != after:
                raise StoreError(
                    f"collection {collection}: the copy's {what} differs from the original's; hub.toml "
                    "still names the SQLite file, which was not changed"
                )


def describe(moved: list[Moved], target: str, sqlite: Path) -> str:
    lines = [f"{m.collection}: {m.entries:,} entries, root {m.root.hex()[:16]}… (checked)" for m in moved]
    lines.append(
        f"hub.toml now names {redact(target)}; {sqlite} is kept as it was (remove it once the hub serves)"
    )
    return "\n".join(lines)
