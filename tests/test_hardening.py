"""Attacks on a live hub on loopback, each of which worked before its defence (docs/threat-model.md)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from helpers import (
    COLLECTION,
    Hub,
    assert_problem,
    batch_doc,
    envelope,
    flip,
    item,
    opinion_doc,
    pdq,
)
from test_limits import lookup_head, read_reply, serving

from federation.cli import main as cli_main
from federation.client import AnswerRefused, HubClient
from federation.keys import SignerKey, VerifierKey
from federation.state import KeyRecord

ENTRIES = f"/v1/collections/{COLLECTION}/entries"


async def _raw(
    port: int, data: bytes, *, small_buffer: bool = False
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if small_buffer:  # a reader that stalls: the hub's writes block as soon as the buffers fill
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(data)
    await writer.drain()
    return reader, writer


# ---- 1. request bodies before authentication --------------------------------------------


async def test_a_compressed_body_is_refused_unread_with_415(federation: Any) -> None:
    bomb = gzip.compress(b" " * 20_000_000)  # 20 MB inflated from about 20 KB
    async with serving(federation) as served:
        body = bomb
        headers = served.hub.signed_headers("acme", "POST", "/v1/lookup", "", body)
        head = (
            f"POST /v1/lookup HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
            f"Content-Length: {len(body)}\r\nContent-Type: application/json\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode()
        reader, writer = await _raw(served.port, head + body)
        reply = await read_reply(reader)
        writer.close()
        problem = assert_problem(reply, 415, "unsupported-content-encoding")
        assert "identity" in problem["detail"]
        assert served.runtime.config.max_pending_body_bytes > 0


async def test_an_outsider_is_refused_on_its_headers_before_its_body_arrives(federation: Any) -> None:
    async with serving(federation) as served:
        # 60 MB announced, 1 KB sent, no signature: the hub must not wait for (or buffer) the rest.
        reader, writer = await _raw(served.port, lookup_head(served.port, 60_000_000) + b" " * 1024)
        reply = await read_reply(reader)
        writer.close()
        assert_problem(reply, 401, "bad-request-signature")


async def test_bodies_buffered_at_once_are_bounded_across_the_hub(federation: Any) -> None:
    async with serving(federation, max_pending_body_bytes=50_000, min_body_bytes_per_second=0) as served:
        # A member's slow 40 KB body holds most of the budget while it arrives…
        slow_reader, slow_writer = await _raw(
            served.port, lookup_head(served.port, 40_000, served.hub) + b" "
        )
        await asyncio.sleep(0.2)
        # …so another 40 KB body is shed, and a small one still fits.
        reader, writer = await _raw(served.port, lookup_head(served.port, 40_000, served.hub) + b" ")
        reply = await read_reply(reader)
        writer.close()
        problem = assert_problem(reply, 503, "overloaded")
        assert "bytes of request bodies" in problem["detail"] and reply.headers["retry-after"] == "1"
        assert (await served.hub.lookup([("pdq", pdq(1))])).status == 200
        slow_writer.close()
        del slow_reader


# ---- 2. slow readers -------------------------------------------------------------------


async def _big_log(hub: Hub, entries: int, items: int) -> None:
    for batch in range(entries):
        hashes = [f"{batch:08x}{n:024x}" for n in range(items)]
        doc = batch_doc("acme", add=[item("md5", h) for h in hashes])
        reply = await hub.post(envelope(hub.members["acme"], doc))
        assert reply.status == 201, reply.text


async def test_stalled_entries_readers_neither_starve_others_nor_hold_the_hub(federation: Any) -> None:
    settings = {
        "max_inflight": 4,
        "max_streams": 16,
        "max_streams_per_key": 64,
        "send_timeout_seconds": 3.0,
        "min_send_bytes_per_second": 50_000_000,
    }
    async with serving(federation, **settings) as served:
        await _big_log(served.hub, 6, 20_000)  # about 10 MB of entries: more than socket buffers hold
        stalled = []
        for number in range(64):
            who = ("acme", "beta")[number % 2]
            headers = served.hub.signed_headers(who, "GET", ENTRIES, "start=0")
            request = (
                f"GET {ENTRIES}?start=0 HTTP/1.1\r\nHost: x\r\nAccept: application/x-ndjson\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n"
            ).encode()
            stalled.append(await _raw(served.port, request, small_buffer=True))
        await asyncio.sleep(0.3)
        assert 0 < served.runtime.streams.held <= 16  # the rest were shed, not queued
        # Meanwhile another member's lookups and the public checkpoint answer at once.
        for _ in range(10):
            assert (await served.hub.lookup([("pdq", pdq(1))], who="reader")).status == 200
            assert (await served.hub.call("GET", f"/v1/collections/{COLLECTION}/checkpoint")).status == 200
        # The hub gives up on readers that do not read: their slots come back.
        deadline = time.monotonic() + 20
        while served.runtime.streams.held and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert served.runtime.streams.held == 0
        for _, writer in stalled:
            writer.close()
        reply = await served.hub.call("GET", ENTRIES, query="start=0&limit=1", who="reader")
        assert reply.status == 200


# ---- 3. match amplification ------------------------------------------------------------


async def test_a_lookup_answers_within_its_match_bounds(federation: Any) -> None:
    async with serving(federation, max_matches_per_query=50, max_matches_per_answer=120) as served:
        base = pdq(7)
        near = [base] + [flip(base, 1 + n % 8, offset=n % 200) for n in range(1, 400)]
        doc = batch_doc("acme", add=[item("pdq", h) for h in dict.fromkeys(near)])
        assert (await served.hub.post(envelope(served.hub.members["acme"], doc))).status == 201
        info = (await served.hub.call("GET", "/v1/hub")).json()
        assert info["limits"] == {"max_matches_per_query": 50, "max_matches_per_answer": 120}
        reply = await served.hub.lookup([("pdq", base)] * 500 + [("md5", "0" * 32)])
        assert reply.status == 200
        results = reply.json()["results"]
        counts = [len(result["matches"]) for result in results]
        assert counts[:4] == [50, 50, 20, 0] and sum(counts) == 120
        assert all(result.get("truncated") for result in results[:500])
        assert "truncated" not in results[500]  # nothing to cut: no match at all
        distances = [m["distance"] for m in results[0]["matches"]]
        assert distances == sorted(distances) and distances[0] == 0  # nearest first


# ---- 4. pages sized by bytes -----------------------------------------------------------


async def test_entries_pages_stop_at_their_byte_budget(federation: Any) -> None:
    async with serving(federation, entries_page_bytes=100_000) as served:
        size = int(
            (await served.hub.call("GET", f"/v1/collections/{COLLECTION}/checkpoint")).text.split("\n")[1]
        )
        await _big_log(served.hub, 3, 2_000)  # entries of about 150 KB
        reply = await served.hub.call("GET", ENTRIES, query=f"start={size}&limit=1000", who="reader")
        page = reply.json()
        assert [e["index"] for e in page["entries"]] == [size] and page["next"] == size + 1
        lines = await served.hub.call(
            "GET", ENTRIES, query="start=0", who="reader", accept="application/x-ndjson"
        )
        assert len(lines.body.splitlines()) == size + 3  # a stream still carries every entry


# ---- 5. writer starvation --------------------------------------------------------------


async def test_a_stranger_s_batch_is_refused_before_its_payload_is_parsed(federation: Any) -> None:
    stranger = SignerKey.generate("stranger")
    async with serving(federation) as served:
        # Not even JSON: parsing first would answer 400 invalid-payload after the writer's queue.
        garbage = envelope(stranger, b"\x00" * 1_000_000, "application/vnd.hashfed.batch+json")
        reply = await served.hub.post(garbage, who="acme")
        assert_problem(reply, 403, "unknown-key")
        reader_batch = envelope(served.hub.members["reader"], b"{", "application/vnd.hashfed.batch+json")
        assert_problem(await served.hub.post(reader_batch, who="reader"), 403, "missing-right")


# ---- 6. answers read by clients, mirrors and peers -------------------------------------


async def test_the_client_refuses_inflated_and_oversized_answers(tmp_path: Path) -> None:
    async def gzipped(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(b"x" * 10_000_000), headers={"Content-Encoding": "gzip"})

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(64):
                await response.write(b"y" * 65_536)
        return response

    app = web.Application()
    app.router.add_get("/v1/collections/gz/checkpoint", gzipped)
    app.router.add_get("/v1/collections/big/checkpoint", huge)
    app.router.add_get("/v1/hub", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with HubClient(f"http://127.0.0.1:{port}", retries=0) as client:
            with pytest.raises(AnswerRefused, match="'gzip' content coding"):
                await client.checkpoint("gz")
            with pytest.raises(AnswerRefused, match="limit of 65536 bytes"):
                await client.checkpoint("big")
            with pytest.raises(AnswerRefused, match="limit"):
                await client._json("GET", "/v1/hub", signed=False, limit=1_000_000)
    finally:
        await runner.cleanup()


# ---- 8. key ids shared through peers ---------------------------------------------------


@dataclass(frozen=True)
class _SameKeyId(VerifierKey):
    """Another public key that hashes to a given key id (finding one takes about 2^32 tries)."""

    forced_id: str = ""

    @property
    def key_id(self) -> str:
        return self.forced_id


async def test_a_key_id_granted_in_a_mirrored_log_does_not_lock_a_member_out(federation: Any) -> None:
    async with serving(federation) as served:
        acme = served.hub.members["acme"]
        store = served.runtime.node.store
        genuine = store.key_memberships

        # What a malicious peer's mirrored log would hold: another key under acme's 32-bit key id.
        other = SignerKey.generate("acme").verifier
        impostor = _SameKeyId(other.name, other.public, acme.key_id)

        def with_collision(key_id: str) -> list[tuple[str, KeyRecord]]:
            found = genuine(key_id)
            if key_id == acme.key_id:
                found = [("peer:main", KeyRecord(impostor, frozenset({"read", "write"}), 0)), *found]
            return found

        store.key_memberships = with_collision  # type: ignore[method-assign]
        assert (await served.hub.lookup([("pdq", pdq(1))], who="acme")).status == 200
        assert (await served.hub.call("GET", ENTRIES, query="start=0&limit=1", who="acme")).status == 200


# ---- 9. strings and names --------------------------------------------------------------


async def test_lone_surrogates_are_refused_everywhere_with_400(federation: Any) -> None:
    async with serving(federation) as served:
        acme = served.hub.members["acme"]
        doc = batch_doc("acme", add=[item("pdq", pdq(3), labels=["x"])])
        raw = json.dumps(doc).replace('"x"', '"\\ud800"').encode()
        reply = await served.hub.post(envelope(acme, raw, "application/vnd.hashfed.batch+json"))
        assert_problem(reply, 400, "invalid-payload")
        assert "surrogate" in reply.json()["detail"]
        opinion = opinion_doc("acme", [("pdq", pdq(3), "negative")])
        opinion["opinions"][0]["note"] = "n"
        note = json.dumps(opinion).replace('"n"', '"a\\udfffb"')
        reply = await served.hub.post(envelope(acme, note.encode(), "application/vnd.hashfed.opinion+json"))
        assert_problem(reply, 400, "invalid-payload")
        body = b'{"queries":[{"type":"pdq","hash":"\\ud800"}]}'
        assert_problem(
            await served.hub.call("POST", "/v1/lookup", body=body, who="acme"), 400, "malformed-json"
        )
        # A surrogate pair is a character like any other.
        paired = json.dumps(doc).replace('"x"', '"\\ud83d\\ude00"').encode()
        assert (
            await served.hub.post(envelope(acme, paired, "application/vnd.hashfed.batch+json"))
        ).status == 201


def test_collections_named_dot_or_dot_dot_are_refused(
    federation: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in (".", ".."):
        assert cli_main(["collection", "add", str(federation.data.path), name]) == 2
        assert "other than '.' and '..'" in capsys.readouterr().err
