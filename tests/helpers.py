"""Shared helpers for the behaviour tests: crafted payloads and envelopes, raw signed
requests over loopback, problem-detail checks, a naive RFC 6962 tree, and a way to
observe everything a refused request must leave unchanged."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from yarl import URL

from federation.checkpoint import Checkpoint, open_note
from federation.client import HubClient
from federation.config import DataDir
from federation.envelope import (
    BATCH_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Addition,
    Envelope,
    compact_json,
    sign_envelope,
    utc_now,
)
from federation.httpsig import sign_request
from federation.keys import SignerKey, VerifierKey
from federation.node import Match, Node
from federation.signals import Frame, Query, SignalType, signal_type
from federation.signals.vpdq import identity as video_identity
from federation.store.opening import is_postgres, sqlite_file

FEDERATION = "testfed"
COLLECTION = "main"
HUB_NAME = "testhub"
PROBLEM = "application/problem+json"
PROBLEM_PREFIX = "urn:hashfed:problem:"

# ---- hashes ------------------------------------------------------------------


def pdq(seed: int) -> str:
    """A reproducible random 256-bit PDQ-shaped hash."""
    return f"{random.Random(seed).getrandbits(256):064x}"


def flip(hash_hex: str, count: int, offset: int = 0) -> str:
    """``hash_hex`` with ``count`` bits flipped (bits offset..offset+count-1): at that exact distance."""
    value = int(hash_hex, 16)
    for bit in range(offset, offset + count):
        value ^= 1 << bit
    return f"{value:0{len(hash_hex)}x}"


def md5(seed: int | str) -> str:
    return hashlib.md5(str(seed).encode()).hexdigest()


def sha256(seed: int | str) -> str:
    return hashlib.sha256(str(seed).encode()).hexdigest()


# ---- payloads and envelopes ------------------------------------------------

_last_seq = 0


def fresh_seq() -> int:
    """Strictly increasing, time based (as the client does), so it never collides with a client's."""
    global _last_seq
    _last_seq = max(time.time_ns() // 1000, _last_seq + 1)
    return _last_seq


def item(
    signal: str, hash_hex: str, labels: Sequence[str] = (), quality: int | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"type": signal, "hash": hash_hex, "labels": list(labels)}
    if quality is not None:
        out["quality"] = quality
    return out


def batch_doc(
    member: str,
    add: Iterable[dict[str, Any]] = (),
    remove: Iterable[tuple[str, str]] = (),
    *,
    seq: int | None = None,
    collection: str = COLLECTION,
    federation: str = FEDERATION,
) -> dict[str, Any]:
    return {
        "v": 1,
        "federation": federation,
        "collection": collection,
        "member": member,
        "seq": fresh_seq() if seq is None else seq,
        "created": utc_now(),
        "add": list(add),
        "remove": [{"type": signal, "hash": hash_hex} for signal, hash_hex in remove],
    }


def opinion_doc(
    member: str,
    opinions: Iterable[tuple[str, str, str]],
    *,
    seq: int | None = None,
    collection: str = COLLECTION,
) -> dict[str, Any]:
    return {
        "v": 1,
        "federation": FEDERATION,
        "collection": collection,
        "member": member,
        "seq": fresh_seq() if seq is None else seq,
        "created": utc_now(),
        "opinions": [{"type": s, "hash": h, "verdict": v} for s, h, v in opinions],
    }


def membership_doc(
    grant: Iterable[tuple[VerifierKey, Sequence[str]]] = (),
    revoke: Iterable[str] = (),
    *,
    seq: int | None = None,
    collection: str = COLLECTION,
) -> dict[str, Any]:
    return {
        "v": 1,
        "federation": FEDERATION,
        "collection": collection,
        "seq": fresh_seq() if seq is None else seq,
        "created": utc_now(),
        "grant": [{"member": key.name, "key": key.encode(), "rights": list(rights)} for key, rights in grant],
        "revoke": [{"key": key_id} for key_id in revoke],
    }


def envelope(signer: SignerKey, doc: dict[str, Any] | bytes, payload_type: str | None = None) -> Envelope:
    """Sign a payload document; the payload type follows from its fields unless given."""
    if payload_type is None:
        assert isinstance(doc, dict)
        if "opinions" in doc:
            payload_type = OPINION_TYPE
        elif "grant" in doc:
            payload_type = MEMBERSHIP_TYPE
        else:
            payload_type = BATCH_TYPE
    payload = doc if isinstance(doc, bytes) else compact_json(doc)
    return sign_envelope(signer, payload_type, payload)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the naive RFC 6962 tree --------------------------------------------------


def naive_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of the leaf data, written straight from the RFC."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return hashlib.sha256(b"\x01" + naive_root(leaves[:k]) + naive_root(leaves[k:])).digest()


# ---- raw HTTP ----------------------------------------------------------------


@dataclass
class Reply:
    status: int
    content_type: str
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


def assert_problem(reply: Reply, status: int, kind: str | None = None) -> dict[str, Any]:
    """The reply is an RFC 9457 problem with this status (and kind) and a useful detail."""
    assert reply.status == status, f"expected {status}, got {reply.status}: {reply.text[:500]}"
    assert reply.content_type == PROBLEM, reply.content_type
    problem = reply.json()
    assert isinstance(problem, dict)
    assert {"type", "title", "status", "detail"} <= set(problem), problem
    assert problem["status"] == status
    assert isinstance(problem["type"], str) and problem["type"].startswith(PROBLEM_PREFIX), problem
    if kind is not None:
        assert problem["type"] == PROBLEM_PREFIX + kind, problem
    assert isinstance(problem["title"], str) and problem["title"].strip(), problem
    detail = problem["detail"]
    assert isinstance(detail, str) and len(detail.strip()) >= 15, problem
    assert "Traceback" not in detail and 'File "' not in detail, problem
    return problem


Caller = str | SignerKey | None


class Hub:
    """A running test hub: its URL, keys and data directory, plus raw request helpers."""

    def __init__(
        self,
        url: str,
        data: DataDir,
        hub_signer: SignerKey,
        members: dict[str, SignerKey],
        clients: dict[str, HubClient],
        session: aiohttp.ClientSession,
    ) -> None:
        self.url = url.rstrip("/")
        self.data = data
        self.hub_signer = hub_signer
        self.members = members
        self.clients = clients
        self.session = session

    @property
    def hub_key(self) -> VerifierKey:
        return self.hub_signer.verifier

    def key(self, who: Caller) -> SignerKey | None:
        if who is None or isinstance(who, SignerKey):
            return who
        return self.hub_signer if who == "hub" else self.members[who]

    def signed_headers(
        self,
        who: Caller,
        method: str,
        path: str,
        query: str = "",
        body: bytes | None = None,
        *,
        created: int | None = None,
    ) -> dict[str, str]:
        signer = self.key(who)
        assert signer is not None
        return sign_request(signer, method, path, query, body, created=created)

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: str = "",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        """Send exactly these bytes and headers (nothing re-encoded, nothing signed)."""
        url = URL(self.url + path + (f"?{query}" if query else ""), encoded=True)
        async with self.session.request(method, url, data=body, headers=headers or {}) as response:
            raw = await response.read()
            return Reply(response.status, response.content_type, dict(response.headers), raw)

    async def call(
        self,
        method: str,
        path: str,
        who: Caller = None,
        *,
        query: str = "",
        body: bytes | None = None,
        accept: str | None = None,
        created: int | None = None,
    ) -> Reply:
        """A request signed by ``who`` (a member name, "hub", a key, or None for unsigned)."""
        headers: dict[str, str] = {}
        if accept is not None:
            headers["Accept"] = accept
        if body is not None:
            headers["Content-Type"] = "application/json"
        if who is not None:
            headers.update(self.signed_headers(who, method, path, query, body, created=created))
        return await self.send(method, path, query=query, body=body, headers=headers)

    async def post(self, env: Envelope | bytes, who: Caller = "acme", collection: str = COLLECTION) -> Reply:
        body = env.canonical() if isinstance(env, Envelope) else env
        return await self.call("POST", f"/v1/collections/{collection}/entries", who, body=body)

    async def submit(self, signer_name: str, doc: dict[str, Any], collection: str = COLLECTION) -> int:
        """Post a payload signed by member ``signer_name`` (relayed by that member); return its index."""
        reply = await self.post(envelope(self.members[signer_name], doc), signer_name, collection)
        assert reply.status == 201, reply.text
        return int(reply.json()["index"])

    async def lookup(
        self,
        queries: Sequence[tuple[str, str]],
        who: Caller = "reader",
        **extra: Any,
    ) -> Reply:
        request: dict[str, Any] = {"queries": [{"type": t, "hash": h} for t, h in queries], **extra}
        return await self.call("POST", "/v1/lookup", who, body=json.dumps(request).encode())

    async def matches(
        self, queries: Sequence[tuple[str, str]], who: Caller = "reader", **extra: Any
    ) -> list[list[dict[str, Any]]]:
        reply = await self.lookup(queries, who, **extra)
        assert reply.status == 200, reply.text
        return [result["matches"] for result in reply.json()["results"]]

    async def checkpoint_note(self, collection: str = COLLECTION) -> str:
        reply = await self.call("GET", f"/v1/collections/{collection}/checkpoint")
        assert reply.status == 200, reply.text
        return reply.text

    async def checkpoint(self, collection: str = COLLECTION) -> Checkpoint:
        return open_note(await self.checkpoint_note(collection), self.hub_key)

    async def size(self, collection: str = COLLECTION) -> int:
        return (await self.checkpoint(collection)).size

    async def leaves(self, collection: str = COLLECTION) -> list[bytes]:
        """Every entry's leaf data, read through the NDJSON stream."""
        reply = await self.call(
            "GET", f"/v1/collections/{collection}/entries", "hub", accept="application/x-ndjson"
        )
        assert reply.status == 200, reply.text
        lines = [json.loads(line) for line in reply.body.splitlines() if line.strip()]
        assert [line["index"] for line in lines] == list(range(len(lines)))
        return [compact_json(line["envelope"]) for line in lines]

    async def observe(self, probes: Sequence[tuple[str, str]] = (), collection: str = COLLECTION) -> Any:
        """Everything a refused request must leave unchanged: the checkpoint (size and root),
        the log's leaves, and what lookups answer for ``probes`` across all collections."""
        note = await self.checkpoint_note(collection)
        leaves = await self.leaves(collection)
        answers = await self.matches(probes, "hub", max_distance=63) if probes else []
        return note, leaves, answers


async def wait_ready(hub: Hub) -> None:
    for _ in range(250):
        if (await hub.call("GET", "/v1/ready")).status == 200:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the hub never became ready")


async def open_hub(
    federation: Any, server: TestServer, clients: dict[str, HubClient], session: aiohttp.ClientSession
) -> Hub:
    """A :class:`Hub` over the conftest fixtures, once the hub is ready."""
    hub = Hub(str(server.make_url("")), federation.data, federation.hub, federation.members, clients, session)
    await wait_ready(hub)
    return hub


def node_lookup(
    node: Node, collections: Sequence[str], pairs: Sequence[tuple[SignalType, str]], max_distance: int
) -> list[list[Match]]:
    """``Node.lookup`` for (type, hash) pairs all asking ``max_distance`` (ignored by exact types)."""
    return node.lookup(collections, [Query(s, h, 0 if s.exact else max_distance) for s, h in pairs])


def random_addition(kind: str, rng: random.Random, labels: tuple[str, ...] = ()) -> Addition:
    """A valid item of any signal type with random content (a video gets 1-4 good frames)."""
    if kind == "vpdq":
        frames = tuple(Frame(rng.randbytes(32).hex(), rng.randint(50, 100)) for _ in range(rng.randint(1, 4)))
        return Addition(kind, video_identity(frames), labels, frames=frames)
    return Addition(kind, rng.randbytes(signal_type(kind).byte_length).hex(), labels)


def database_sql(data: DataDir, sql: str, parameters: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run SQL (``?`` placeholders) on a hub's database behind its back, SQLite file or PostgreSQL.

    Returns the rows of a query, or one row holding the count of rows a change touched.
    """
    url = data.config().database
    if is_postgres(url):
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            cursor = conn.execute(sql.replace("?", "%s"), parameters)
            return cursor.fetchall() if cursor.description else [(cursor.rowcount,)]
    path = sqlite_file(url, data.path)
    assert path is not None
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        cursor = conn.execute(sql, parameters)
        return cursor.fetchall() if cursor.description else [(cursor.rowcount,)]
    finally:
        conn.close()


def on_postgres(data: DataDir) -> bool:
    return is_postgres(data.config().database)
