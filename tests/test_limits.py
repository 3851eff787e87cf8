"""Load and abuse limits (docs/operations.md): each is a hub.toml setting, each is enforced.

Every hub here is served the way ``hashfed serve`` serves it (``start_server``:
the connection-limited site) on 127.0.0.1, from a hub.toml holding non-default
values. Shed requests are RFC 9457 problems with ``Retry-After``; slow clients
are cut off. The body size limit is tested with a non-default value in
test_refusals.py (``test_body_over_the_configured_limit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from helpers import (
    COLLECTION,
    Hub,
    Reply,
    assert_problem,
    batch_doc,
    envelope,
    item,
    md5,
    opinion_doc,
    pdq,
    wait_ready,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from federation.client import HubClient, HubError
from federation.config import ConfigError, HubConfig
from federation.httpsig import SignatureRefused, VerifiedRequest
from federation.hub import create_app, open_node
from federation.hub.app import RUNTIME, HubRuntime
from federation.hub.limits import ADMISSION, Guard, RateLimited, RateLimiter, RequestGuard
from federation.hub.server import start_server
from federation.hub.shared_guard import SharedRequestGuard, SharedState, create_state
from federation.node import Node

ENTRIES = f"/v1/collections/{COLLECTION}/entries"


@dataclass
class Served:
    hub: Hub
    node: Node
    admission_queued: Callable[[], int]
    open_connections: Callable[[], int]
    port: int
    runtime: HubRuntime


@contextlib.asynccontextmanager
async def serving(federation: Any, **settings: Any) -> AsyncIterator[Served]:
    """A hub whose hub.toml has ``settings``, served on 127.0.0.1 as ``hashfed serve`` does."""
    config = dataclasses.replace(federation.data.config(), **settings)
    federation.data.config_file.write_text(config.to_toml())
    assert federation.data.config() == config  # every setting survives hub.toml
    node = open_node(federation.data)
    app = create_app(node, config)
    runner, site = await start_server(app, config, "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{site.port}"
            hub = Hub(url, federation.data, federation.hub, federation.members, {}, session)
            await wait_ready(hub)
            yield Served(
                hub, node, lambda: app[ADMISSION].queued, lambda: site.limiter.open, site.port, app[RUNTIME]
            )
    finally:
        await runner.cleanup()


async def eventually(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def parse_reply(raw: bytes) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    content_type = headers.get("content-type", "").split(";")[0]
    return Reply(status, content_type, headers, body[:length])


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response off a kept-alive connection (Content-Length framed)."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(parse_reply(head).headers["content-length"])
    return parse_reply(head + await asyncio.wait_for(reader.readexactly(length), 5))


def lookup_head(port: int, length: int, hub: Hub | None = None) -> bytes:
    """Request headers of a lookup whose body of ``length`` bytes follows; signed by acme with ``hub``.

    The signature covers the digest of ``length`` spaces (what the slow-body tests
    mean to send); an unsigned request is refused on its headers, before any body.
    """
    signed = ""
    if hub is not None:
        headers = hub.signed_headers("acme", "POST", "/v1/lookup", "", b" " * length)
        signed = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return (
        f"POST /v1/lookup HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{signed}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# ---- settings ---------------------------------------------------------------------------


def test_limit_settings_defaults_round_trip_and_validation() -> None:
    config = HubConfig("hub", "fed")
    assert (config.max_inflight, config.max_queued, config.max_connections) == (64, 256, 512)
    assert config.rate_limit_per_second == 0  # off
    text = "\n".join(
        [
            'name = "hub"',
            'federation = "fed"',
            "rate_limit_per_second = 2",  # an integer is taken for a rate
            "request_timeout_seconds = 1.5",
            "max_inflight = 3",
        ]
    )
    parsed = HubConfig.from_toml(text, "hub.toml")
    assert parsed.rate_limit_per_second == 2.0 and isinstance(parsed.rate_limit_per_second, float)
    assert (parsed.request_timeout_seconds, parsed.max_inflight, parsed.burst) == (1.5, 3, 2)
    assert HubConfig.from_toml(parsed.to_toml(), "again") == parsed
    assert dataclasses.replace(parsed, rate_limit_burst=7).burst == 7
    assert dataclasses.replace(parsed, rate_limit_per_second=0.2).burst == 1
    for bad in (
        "max_inflight = 0",
        "max_connections = -1",
        "queue_timeout_seconds = 0",
        "keepalive_timeout_seconds = inf",
        "rate_limit_per_second = nan",
        "rate_limit_burst = -1",
        "max_queued = 1.5",
        "request_timeout_seconds = true",
        'min_body_bytes_per_second = "fast"',
    ):
        with pytest.raises(ConfigError) as caught:
            HubConfig.from_toml(f'name = "hub"\nfederation = "fed"\n{bad}', "hub.toml")
        assert str(caught.value).startswith("hub.toml: " + bad.split()[0])


# ---- admission: in-flight requests and the queue ----------------------------------------


class Gate:
    """Makes a node method block in its worker thread until opened: a deterministic slow request."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        def blocked() -> Any:
            with self._lock:
                self.entered += 1
            assert self.opened.wait(10), "the test never opened the gate"
            return fn()

        return blocked


async def test_requests_over_inflight_and_queue_are_shed_with_503(
    federation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(federation, max_inflight=2, max_queued=1, queue_timeout_seconds=10.0) as served:
        hub, gate = served.hub, Gate()
        monkeypatch.setattr(served.node, "own_collections", gate.wrap(served.node.own_collections))
        try:
            handled = [asyncio.create_task(hub.call("GET", "/v1/hub")) for _ in range(2)]
            await eventually(lambda: gate.entered == 2, "two requests in flight")
            queued = asyncio.create_task(hub.call("GET", "/v1/hub"))
            await eventually(lambda: served.admission_queued() == 1, "one request queued")
            shed = await hub.call("GET", "/v1/hub")
            problem = assert_problem(shed, 503, "overloaded")
            assert shed.headers["Retry-After"] == "1"
            assert "retry" in problem["detail"]
            # A signed request is shed the same way, before any work is done for it.
            assert_problem(await hub.lookup([("pdq", pdq(1))]), 503, "overloaded")
            # Probes are not shed: an overloaded hub is alive and ready.
            assert (await hub.call("GET", "/v1/health")).status == 200
            assert (await hub.call("GET", "/v1/ready")).status == 200
        finally:
            gate.opened.set()
        for reply in await asyncio.gather(*handled, queued):
            assert reply.status == 200, reply.text
        assert served.admission_queued() == 0
        assert (await hub.call("GET", "/v1/hub")).status == 200


async def test_a_request_queued_past_the_queue_timeout_is_shed(
    federation: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with serving(federation, max_inflight=1, max_queued=5, queue_timeout_seconds=0.3) as served:
        hub, gate = served.hub, Gate()
        monkeypatch.setattr(served.node, "own_collections", gate.wrap(served.node.own_collections))
        try:
            handled = asyncio.create_task(hub.call("GET", "/v1/hub"))
            await eventually(lambda: gate.entered == 1, "a request in flight")
            began = time.monotonic()
            shed = await hub.call("GET", "/v1/hub")
            waited = time.monotonic() - began
        finally:
            gate.opened.set()
        assert_problem(shed, 503, "overloaded")
        assert shed.headers["Retry-After"] == "1"
        assert 0.25 <= waited < 3, waited
        assert (await handled).status == 200
        assert served.admission_queued() == 0


# ---- per-member rate limits ---------------------------------------------------------------


async def test_rate_limit_per_key_answers_429_then_recovers(federation: Any) -> None:
    async with serving(federation, rate_limit_per_second=1.0, rate_limit_burst=2) as served:
        hub = served.hub
        query = [("pdq", pdq(1))]
        # Requests whose signature fails cost the key nothing: nobody can spend a member's budget.
        stale = int(time.time()) - 3600
        for _ in range(3):
            body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(1)}]}).encode()
            assert (await hub.call("POST", "/v1/lookup", "reader", body=body, created=stale)).status == 401
        for _ in range(2):
            assert (await hub.lookup(query, "reader")).status == 200
        limited = await hub.lookup(query, "reader")
        problem = assert_problem(limited, 429, "rate-limited")
        assert limited.headers["Retry-After"] == "1"
        assert served.node.hub_key.key_id not in problem["detail"]
        assert hub.members["reader"].key_id in problem["detail"]
        # Another key has its own bucket; public endpoints are not rate limited.
        assert (await hub.lookup(query, "acme")).status == 200
        for _ in range(4):
            assert (await hub.call("GET", f"/v1/collections/{COLLECTION}/checkpoint")).status == 200
        # The bucket refills at the configured rate.
        await asyncio.sleep(1.05)
        assert (await hub.lookup(query, "reader")).status == 200
        # The client honours Retry-After: its retry, a second later, succeeds.
        async with HubClient(hub.url, hub.members["reader"], retries=1) as client:
            began = time.monotonic()
            assert len(await client.lookup(query)) == 1
            assert time.monotonic() - began >= 0.9
        async with HubClient(hub.url, hub.members["reader"], retries=0) as client:
            with pytest.raises(HubError) as caught:
                await client.lookup(query)
            assert caught.value.status == 429 and caught.value.kind.endswith("rate-limited")


def test_rate_limiter_buckets_refill_and_stay_bounded() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, max_keys=100, clock=lambda: now[0])
    for _ in range(3):
        limiter.charge("acme")
    with pytest.raises(RateLimited) as caught:
        limiter.charge("acme")
    assert caught.value.retry_after == 1 and caught.value.status == 429
    now[0] += 0.5  # one token back at 2 per second
    limiter.charge("acme")
    with pytest.raises(RateLimited):
        limiter.charge("acme")
    # Many distinct keys: never more buckets than the cap.
    for n in range(10_000):
        limiter.charge(f"key-{n}")
        assert len(limiter) <= 100
    # A bucket idle long enough to be full again is forgotten.
    now[0] += 3 / 2.0
    limiter.charge("fresh")
    assert len(limiter) == 1
    # Forgetting a full bucket changes nothing for its key.
    for _ in range(3):
        limiter.charge("key-1")


# ---- slow clients -------------------------------------------------------------------------


async def test_a_body_not_sent_within_the_request_timeout_is_cut_with_408(federation: Any) -> None:
    async with serving(federation, request_timeout_seconds=0.5, min_body_bytes_per_second=0) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        began = time.monotonic()
        writer.write(lookup_head(served.port, 100, served.hub) + b" " * 10)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)  # the hub answers and closes the connection
        took = time.monotonic() - began
        writer.close()
        reply = parse_reply(raw)
        problem = assert_problem(reply, 408, "request-timeout")
        assert "0.5 s" in problem["detail"]
        assert 0.45 <= took < 3, took
        # A body sent in time is read as usual.
        assert (await served.hub.lookup([("pdq", pdq(1))])).status == 200


async def test_a_body_trickling_under_the_minimum_rate_is_cut_with_408(federation: Any) -> None:
    async with serving(federation, request_timeout_seconds=30.0, min_body_bytes_per_second=1_000) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)

        async def trickle() -> None:
            writer.write(lookup_head(served.port, 10_000, served.hub))
            with contextlib.suppress(ConnectionError):
                for _ in range(100):
                    writer.write(b" ")
                    await writer.drain()
                    await asyncio.sleep(0.1)

        began = time.monotonic()
        sender = asyncio.create_task(trickle())
        raw = await asyncio.wait_for(reader.read(), 10)
        took = time.monotonic() - began
        sender.cancel()
        writer.close()
        problem = assert_problem(parse_reply(raw), 408, "request-timeout")
        assert "1000 bytes/s" in problem["detail"]
        assert 1.9 <= took < 5, took  # judged after the 2 s grace period, long before 30 s
        assert (await served.hub.lookup([("pdq", pdq(1))])).status == 200


async def test_a_slow_body_over_the_size_limit_is_still_a_413(federation: Any) -> None:
    async with serving(federation, max_body_bytes=1_000) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(lookup_head(served.port, 5_000) + b" " * 500)
        await writer.drain()
        await asyncio.sleep(0.2)  # the rest arrives later: the hub is reading it against its deadline
        writer.write(b" " * 4_500)
        await writer.drain()
        reply = await read_reply(reader)
        writer.close()
        assert_problem(reply, 413, "body-too-large")


async def test_incomplete_headers_and_idle_connections_are_closed(federation: Any) -> None:
    async with serving(federation, keepalive_timeout_seconds=0.3) as served:
        for sent in (b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b""):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            began = time.monotonic()
            writer.write(sent)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without an answer
            assert time.monotonic() - began < 3
            writer.close()
        # After a complete request the connection stays open for the next one, then closes when idle.
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        for _ in range(2):
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await read_reply(reader)).status == 200
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()


# ---- connections ----------------------------------------------------------------------------


async def test_connections_over_the_limit_are_refused_with_503(federation: Any) -> None:
    async with serving(federation, max_connections=3) as served:
        # The test's HTTP session may hold one kept-alive connection from wait_ready.
        await served.hub.session.connector.close()  # type: ignore[union-attr]
        await eventually(lambda: served.open_connections() == 0, "the session's connection to close")
        held = []
        for _ in range(3):
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert (await read_reply(reader)).status == 200
            held.append((reader, writer))
        assert served.open_connections() == 3
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        refused = parse_reply(await asyncio.wait_for(reader.read(), 5))
        writer.close()
        assert_problem(refused, 503, "too-many-connections")
        assert refused.headers["retry-after"] == "1"
        # A closed connection frees its place.
        held.pop()[1].close()
        await eventually(lambda: served.open_connections() == 2, "a connection to be released")
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert (await read_reply(reader)).status == 200
        writer.close()
        for _, held_writer in held:
            held_writer.close()


# ---- payload and lookup limits, with non-default values -----------------------------------


async def test_payload_and_lookup_limits_follow_hub_toml(federation: Any) -> None:
    async with serving(
        federation, max_items=5, max_labels_per_item=2, max_label_length=8, max_note_length=10, max_queries=3
    ) as served:
        hub = served.hub
        acme = hub.members["acme"]

        async def post(items: list[dict[str, Any]]) -> Reply:
            return await hub.post(envelope(acme, batch_doc("acme", items)))

        too_many = [item("md5", md5(n)) for n in range(6)]
        assert "more than 5" in assert_problem(await post(too_many), 400, "invalid-payload")["detail"]
        assert (await post(too_many[:5])).status == 201
        labels = ["a", "b", "c"]
        assert_problem(await post([item("pdq", pdq(10), labels)]), 400, "invalid-payload")
        assert (await post([item("pdq", pdq(10), labels[:2])])).status == 201
        assert_problem(await post([item("pdq", pdq(11), ["x" * 9])]), 400, "invalid-payload")
        assert (await post([item("pdq", pdq(11), ["x" * 8])])).status == 201
        for note, status in (("x" * 11, 400), ("x" * 10, 201)):
            doc = opinion_doc("reader", [("pdq", pdq(10), "negative")])
            doc["opinions"][0]["note"] = note
            assert (await hub.post(envelope(hub.members["reader"], doc), "reader")).status == status
        queries = [("md5", md5(n)) for n in range(4)]
        problem = assert_problem(await hub.lookup(queries), 400, "too-many-queries")
        assert "at most 3" in problem["detail"]
        assert len((await hub.lookup(queries[:3])).json()["results"]) == 3


@pytest.mark.parametrize(
    ("request_head", "said"),
    [
        (b"GET /v1/hub HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n", "too long"),
        (b"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n", "Content-Length"),
        (b"GET /v1/hub HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", "not valid HTTP/1.1"),
    ],
)
async def test_requests_aiohttp_cannot_parse_are_answered_as_problems(
    federation: Any, request_head: bytes, said: str
) -> None:
    async with serving(federation) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        try:
            writer.write(request_head)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
        reply = parse_reply(raw)
        body = assert_problem(reply, 400, "http-error")
        assert said in body["detail"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), max_size=30), st.integers(1, 4))
def test_admitting_requests_together_refuses_what_admitting_them_one_by_one_refuses(
    requests: list[tuple[int, int]], burst: int
) -> None:
    """Batch admission (lookups answered together) refuses what the in-process guard refuses one by one."""
    signatures = [bytes([number]) * 64 for number in range(6)]
    verified = [VerifiedRequest(f"key{key}", 0, signatures[number]) for number, key in requests]
    now = int(time.time())
    rate = 0.001  # no token comes back while the test runs
    expected = admitted_one_by_one(RequestGuard(RateLimiter(rate, burst)), verified, now)
    assert admitted_together(RequestGuard(RateLimiter(rate, burst)), verified, now) == expected
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "workers.sqlite3"
        create_state(path)
        shared = SharedRequestGuard(SharedState(path), rate, burst)
        assert admitted_together(shared, verified, now) == expected
        assert admitted_together(shared, verified, now) == ["SignatureRefused"] * len(
            verified
        )  # each one seen


def admitted_one_by_one(guard: Guard, verified: list[VerifiedRequest], now: int) -> list[str]:
    """Each request's outcome through ``guard.admit``: "admitted" or the refusal's class name."""
    outcomes = []
    for request in verified:
        try:
            guard.admit(request, now)
            outcomes.append("admitted")
        except (SignatureRefused, RateLimited) as refusal:
            outcomes.append(type(refusal).__name__)
    return outcomes


def admitted_together(guard: Guard, verified: list[VerifiedRequest], now: int) -> list[str]:
    """Each request's outcome through one ``guard.admit_many``."""
    refusals = guard.admit_many(verified, now)
    return ["admitted" if refusal is None else type(refusal).__name__ for refusal in refusals]
