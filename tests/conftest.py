"""Shared fixtures: a real hub data directory on disk, served on loopback.

Tests that take the ``database`` fixture (directly or through ``federation``)
run once per store in the modules of ``BOTH_BACKENDS``: on SQLite, and on a
fresh database of a real PostgreSQL server (:mod:`postgres_server`).
"""

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
from tests.postgres_server import PostgresServer, start_postgres

FEDERATION = "testfed"
COLLECTION = "main"


BOTH_BACKENDS = frozenset(
    {
        "test_api",
        "test_batching",
        "test_crash",
        "test_key_rotation",
        "test_projection",
        "test_rebuild",
        "test_refusals",
        "test_signed_history",
        "test_sync_all_types",
        "test_sync_mirror",
        "test_sync_peering",
    }
)
"""Modules whose storage, projection, API, refusal, sync and crash tests run on both stores."""


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "database" in metafunc.fixturenames:
        module = metafunc.module.__name__.rpartition(".")[2]
        backends = ["sqlite", "postgresql"] if module in BOTH_BACKENDS else ["sqlite"]
        metafunc.parametrize("database", backends, indirect=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (``HASHFED_TEST_POSTGRES``, or one started here)."""
    server = start_postgres()
    if server is None:
        pytest.skip(
            "no PostgreSQL server: set HASHFED_TEST_POSTGRES=postgresql://USER@127.0.0.1:PORT/postgres, "
            "or install Debian's postgresql package (initdb, pg_ctl); .ci/run does"
        )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    """hub.toml's ``database`` setting: "" for SQLite in the data directory, or a new PostgreSQL database."""
    if getattr(request, "param", "sqlite") == "sqlite":
        yield ""
        return
    server: PostgresServer = request.getfixturevalue("postgres_server")
    with server.fresh_database() as url:
        yield url


@dataclass
class Federation:
    data: DataDir
    hub: SignerKey
    members: dict[str, SignerKey]


@pytest.fixture
def federation(tmp_path: Path, database: str) -> Iterator[Federation]:
    """A hub data dir with collection ``main``: acme and beta write+read, reader reads only."""
    data = DataDir(tmp_path / "hub")
    init_hub(data.path, name="testhub", federation=FEDERATION, collection=COLLECTION, database=database)
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
