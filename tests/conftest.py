"""Shared fixtures: a real hub data directory on disk, served on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from federation.admin import change_membership, init_hub
from federation.client import HubClient
from federation.config import DataDir
from federation.envelope import Grant
from federation.hub import create_app, open_node
from federation.keys import SignerKey

FEDERATION = "testfed"
COLLECTION = "main"


@dataclass
class Federation:
    data: DataDir
    hub: SignerKey
    members: dict[str, SignerKey]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """A hub data dir with collection ``main``: acme and beta write+read, reader reads only."""
    data = DataDir(tmp_path / "hub")
    init_hub(data.path, name="testhub", federation=FEDERATION, collection=COLLECTION)
    members = {name: SignerKey.generate(name) for name in ("acme", "beta", "reader", "outsider")}
    change_membership(
        data,
        COLLECTION,
        grant=[
            Grant(members["acme"].verifier, frozenset({"read", "write"})),
            Grant(members["beta"].verifier, frozenset({"read", "write"})),
            Grant(members["reader"].verifier, frozenset({"read"})),
        ],
    )
    yield Federation(data, data.signer(), members)


@pytest.fixture
async def hub_server(federation: Federation) -> AsyncIterator[TestServer]:
    node = open_node(federation.data)
    app = create_app(node, federation.data.config())
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def clients(federation: Federation, hub_server: TestServer) -> AsyncIterator[dict[str, HubClient]]:
    url = str(hub_server.make_url(""))
    made = {name: HubClient(url, key, retries=0) for name, key in federation.members.items()}
    made["hub"] = HubClient(url, federation.hub, retries=0)
    yield made
    for client in made.values():
        await client.close()
