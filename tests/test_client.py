"""The member client against a real hub."""

from __future__ import annotations

from federation.client import HubClient
from federation.envelope import Addition
from tests.helpers import md5


async def test_stream_entries_takes_entries_longer_than_a_line_buffer(clients: dict[str, HubClient]) -> None:
    """One entry may hold 100,000 hashes: a single NDJSON line of megabytes."""
    acme = clients["acme"]
    big = [Addition("md5", md5(n), ("label-" + "x" * 60,)) for n in range(8000)]
    submitted = await acme.submit("main", big)
    streamed = [entry async for entry in clients["reader"].stream_entries("main")]
    assert [index for index, _ in streamed] == list(range(submitted.index + 1))
    assert len(streamed[-1][1].canonical()) > 1_000_000
