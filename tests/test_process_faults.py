"""One server per data directory, and an answer that never hides an append."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from federation.client import HubClient
from federation.hub.app import RUNTIME
from tests.conftest import Federation
from tests.faults import free_port, hashfed, start_hashfed, wait_exit
from tests.helpers import assert_problem, batch_doc, envelope, item, open_hub, pdq


async def test_a_second_serve_on_the_same_directory_is_refused_naming_the_first(
    federation: Federation, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "first.log"
    first = start_hashfed("serve", str(federation.data.path), "--port", str(port), log=log)
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                try:
                    async with session.get(f"http://127.0.0.1:{port}/v1/health") as response:
                        if response.status == 200:
                            break
                except aiohttp.ClientError:
                    await asyncio.sleep(0.05)
        second = await asyncio.to_thread(
            hashfed, "serve", str(federation.data.path), "--port", str(free_port())
        )
        assert second.returncode == 2
        assert f"another hashfed process (pid {first.pid}) is already serving" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert wait_exit(first, 60) == 0, log.read_text()
    assert "serving plain HTTP: fine on loopback or behind a TLS-terminating proxy" in log.read_text()
    # Once the first has stopped, the directory can be served again.
    third = start_hashfed(
        "serve", str(federation.data.path), "--port", str(free_port()), log=tmp_path / "third.log"
    )
    assert wait_exit(third, 3) is None  # still serving: not refused


async def test_an_append_whose_indexing_fails_is_reported_as_appended(
    federation: Federation,
    hub_server: TestServer,
    clients: dict[str, HubClient],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The entry is in the log: the answer must say so, and a resubmission answers that entry."""
    async with aiohttp.ClientSession() as session:
        hub = await open_hub(federation, hub_server, clients, session)
        catalog = hub_server.app[RUNTIME].node.indexes
        real_catch_up = catalog.catch_up

        def failing(collection: str) -> int:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(catalog, "catch_up", failing)
        signed = envelope(federation.members["acme"], batch_doc("acme", [item("pdq", pdq(42))]))
        reply = await hub.post(signed)
        body = assert_problem(reply, 503, "appended-not-indexed")
        size = len(await hub.leaves())
        assert f"entry {size - 1} was appended" in body["detail"]

        monkeypatch.setattr(catalog, "catch_up", real_catch_up)
        again = await hub.post(signed)
        assert again.status == 200 and again.json()["index"] == size - 1
        assert (await hub.matches([("pdq", pdq(42))]))[0][0]["hash"] == pdq(42)
