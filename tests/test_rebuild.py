"""Restart the long way: replaying the log rebuilds exactly the projection ingest built."""

from __future__ import annotations

import base64
import json

import pytest

from federation.admin import rebuild
from federation.envelope import Addition, OpinionItem, Removal
from federation.hub import open_node
from federation.merkle import leaf_hash
from federation.node import Node
from federation.signals import MD5, PDQ
from federation.store.base import StoreError
from tests.conftest import Federation
from tests.helpers import database_sql, node_lookup

BRIDGE = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"
ROTATED = "b0a10efd71cc3f429413d48d0ffffe12e34e0e17ada952a9d29684210aa9e5af"
MD5_HASH = "0" * 31 + "1"


def _snapshot(node: Node) -> tuple[object, ...]:
    queries = [(PDQ, BRIDGE), (PDQ, ROTATED), (MD5, MD5_HASH)]
    return (
        node.store.keys("main"),
        node_lookup(node, ["main"], queries, 31),
        node.store.log_size("main"),
        node.checkpoint("main").split("\n")[:3],
    )


async def test_rebuild_reproduces_the_projection(federation: Federation, clients: dict) -> None:  # type: ignore[type-arg]
    acme, beta, reader = clients["acme"], clients["beta"], clients["reader"]
    await acme.submit("main", [Addition("pdq", BRIDGE, ("a",)), Addition("md5", MD5_HASH)])
    await beta.submit("main", [Addition("pdq", BRIDGE, ("b",)), Addition("pdq", ROTATED, ("c",))])
    await reader.give_opinions("main", [OpinionItem("pdq", BRIDGE, "negative", "a test image")])
    await acme.submit("main", [], [Removal("md5", MD5_HASH)])
    await beta.submit("main", [Addition("pdq", ROTATED, ("d",))])

    node = open_node(federation.data)
    node.load()
    before = _snapshot(node)
    node.store.close()

    assert rebuild(federation.data) == {"main": before[2]}

    node = open_node(federation.data)
    node.load()
    assert _snapshot(node) == before
    node.store.close()


def _tamper_membership_payload(data: bytes) -> bytes:
    """Rewrite entry 1 (acme's grant) to give the reader write rights, keeping the old signature."""
    envelope = json.loads(data)
    payload = base64.b64decode(envelope["payload"]).replace(b'["read"]', b'["read","write"]')
    envelope["payload"] = base64.b64encode(payload).decode()
    return json.dumps(envelope, separators=(",", ":")).encode()


@pytest.mark.parametrize("rehash", [False, True], ids=["leaf-hash-stale", "leaf-hash-recomputed"])
def test_rebuild_refuses_a_tampered_log(federation: Federation, rehash: bool) -> None:
    data = bytes(database_sql(federation.data, "SELECT data FROM entries WHERE idx = 1")[0][0])
    tampered = _tamper_membership_payload(data)
    assert tampered != data
    leaf = leaf_hash(tampered) if rehash else leaf_hash(data)
    database_sql(
        federation.data, "UPDATE entries SET data = ?, leaf_hash = ? WHERE idx = 1", (tampered, leaf)
    )
    with pytest.raises(StoreError, match="entry 1"):
        rebuild(federation.data)


def test_rebuild_refuses_a_damaged_interior_tree_hash(federation: Federation) -> None:
    """Proofs read interior hashes, so a damaged one must be caught even when the root is intact."""
    database_sql(federation.data, "UPDATE tree SET hash = ? WHERE level = 0 AND idx = 0", (bytes(32),))
    with pytest.raises(StoreError, match=r"tree hash \(0, 0\)"):
        rebuild(federation.data)
