"""Hub-side administration: creating a data directory, collections and memberships.

These write straight to the hub's database through the same node code the
server uses, so they work whether or not the hub is serving; a serving hub
sees the new entries on its next request.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .config import ConfigError, DataDir, HubConfig
from .envelope import Grant
from .hub.server import open_node
from .keys import SignerKey, VerifierKey, check_collection_name, check_name, write_signer_file
from .node import Accepted
from .state import KeyRecord
from .store.base import StoreError


def init_hub(path: Path, *, name: str, federation: str, collection: str) -> VerifierKey:
    """Create a hub data directory with its key, database, config and first collection."""
    check_name(name)
    check_name(federation)
    check_collection_name(collection)
    data = DataDir(path)
    if data.config_file.exists():
        raise ConfigError(f"{path} is already a hub data directory")
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    signer = SignerKey.generate(name)
    write_signer_file(signer, data.signer_file)
    data.verifier_file.write_text(signer.verifier.encode() + "\n")
    data.config_file.write_text(HubConfig(name=name, federation=federation).to_toml())
    add_collection(data, collection)
    return signer.verifier


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
    # Index snapshots derive from the projection about to be rebuilt: drop them first
    # (a crash mid-way must not leave old ones), and the next start builds afresh.
    for snapshot in data.index_dir.glob("*.pdq.*"):
        snapshot.unlink()
    node = open_node(data, searchable=False)
    try:
        return {collection: node.rebuild(collection) for collection in node.collections()}
    finally:
        node.store.close()
