"""Helpers for the sync tests: real hubs on loopback, a tampering proxy, mirrors run through the CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from federation.admin import change_membership, init_hub
from federation.cli import main
from federation.client import HubClient
from federation.config import DataDir, PeerConfig
from federation.envelope import Addition, Grant, OpinionItem, Removal
from federation.hub import create_app, open_node
from federation.keys import SignerKey, write_signer_file
from federation.sync.mirror import MirrorDir
from federation.sync.verify import Evidence
from tests.faults import free_port

FEDERATION = "testfed"
COLLECTION = "main"
READ = frozenset({"read"})
READ_WRITE = frozenset({"read", "write"})


def pdq(seed: int) -> str:
    """A reproducible 256-bit hash; different seeds are far apart."""
    import random

    return f"{random.Random(seed).getrandbits(256):064x}"


@dataclass
class LiveHub:
    """A hub data directory, its keys, and (once served) its server."""

    name: str
    data: DataDir
    signer: SignerKey
    members: dict[str, SignerKey]
    server: TestServer | None = None
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def key(self) -> str:
        return self.signer.verifier.encode()

    def grant(self, key: SignerKey, rights: frozenset[str] = READ_WRITE) -> None:
        change_membership(self.data, COLLECTION, grant=[Grant(key.verifier, rights)])

    async def serve(self, peers: Sequence[PeerConfig] = ()) -> None:
        config = replace(self.data.config(), peers=tuple(peers))
        app = create_app(open_node(self.data), config)
        self.server = TestServer(app, host="127.0.0.1", port=self.port)
        await self.server.start_server()
        await wait_ready(self.url)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()
            self.server = None

    def client(self, member: str) -> HubClient:
        return HubClient(self.url, self.members[member], retries=0)

    async def submit(
        self, member: str, add: Sequence[str] = (), remove: Sequence[str] = (), labels: Sequence[str] = ()
    ) -> int:
        async with self.client(member) as client:
            submitted = await client.submit(
                COLLECTION,
                [Addition("pdq", h, tuple(labels)) for h in add],
                [Removal("pdq", h) for h in remove],
            )
            return submitted.index

    async def opinion(self, member: str, hashes: Sequence[str], verdict: str) -> None:
        async with self.client(member) as client:
            await client.give_opinions(COLLECTION, [OpinionItem("pdq", h, verdict) for h in hashes])

    async def lookup(
        self, member: str, queries: Sequence[str], collections: Sequence[str] | None = None
    ) -> list[list[dict[str, Any]]]:
        async with self.client(member) as client:
            return await client.lookup(
                [("pdq", h) for h in queries], max_distance=31, collections=collections
            )

    async def get_text(self, path: str) -> str:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
            assert response.status == 200, await response.text()
            return await response.text()

    async def size(self) -> int:
        """The log size of ``main`` in the hub's current checkpoint."""
        return int((await self.get_text(f"/v1/collections/{COLLECTION}/checkpoint")).split("\n")[1])

    async def get(self, path: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(self.url + path) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def make_hub(root: Path, name: str, members: dict[str, frozenset[str]], database: str = "") -> LiveHub:
    """A hub named ``name`` with collection ``main`` and the given members (name → rights), on
    ``database`` (hub.toml's setting: "" for SQLite)."""
    data = DataDir(root / name)
    init_hub(data.path, name=name, federation=FEDERATION, collection=COLLECTION, database=database)
    keys = {member: SignerKey.generate(member) for member in members}
    if keys:
        change_membership(
            data, COLLECTION, grant=[Grant(keys[m].verifier, rights) for m, rights in members.items()]
        )
    return LiveHub(name, data, data.signer(), keys)


def set_config(data: DataDir, settings: str) -> None:
    """Put ``settings`` (hub.toml lines) into the hub's config, replacing the settings of the same names."""
    changed = {line.split("=")[0].strip() for line in settings.splitlines()}
    kept = [
        line
        for line in data.config_file.read_text().splitlines()
        if line.split("=")[0].strip() not in changed
    ]
    data.config_file.write_text("\n".join(kept) + "\n" + settings)


def clone_hub(hub: LiveHub, root: Path, label: str) -> LiveHub:
    """A second hub with the same key and the same log so far: a hub that will show another history."""
    copy = root / f"{hub.name}-{label}"
    shutil.copytree(hub.data.path, copy)
    return LiveHub(hub.name, DataDir(copy), hub.signer, dict(hub.members))


def key_file(root: Path, key: SignerKey) -> Path:
    path = root / f"{key.name}-{key.key_id.split('+')[1]}.key"
    if not path.exists():
        write_signer_file(key, path)
    return path


async def wait_ready(url: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(500):
            async with session.get(url + "/v1/ready") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.01)
    raise AssertionError(f"{url} never became ready")


async def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``hashfed`` in a thread (it runs its own event loop); return status, stdout, stderr."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()

    def call() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return main(list(argv))

    code = await asyncio.to_thread(call)
    return code, out.getvalue(), err.getvalue()


def mirror_argv(url: str, key: Path, pin: str, directory: Path, *extra: str) -> tuple[str, ...]:
    """``hashfed mirror`` of collection ``main`` from ``url``, read with the member key file ``key``."""
    return (
        "mirror",
        "--hub",
        url,
        "--key",
        str(key),
        "--collection",
        COLLECTION,
        "--pin",
        pin,
        *extra,
        str(directory),
    )


def mirror_size(path: Path) -> int:
    """Entries in a mirror directory's log (0 before its first verified span)."""
    node = MirrorDir(path).open_node()
    try:
        return sum(node.store.log_size(name) for name in node.sources())
    finally:
        node.store.close()


def mirror_evidence(path: Path) -> list[Evidence]:
    return [Evidence.from_json(json.loads(p.read_text())) for p in sorted((path / "evidence").glob("*.json"))]


def normalise(hub_name: str, results: list[list[dict[str, Any]]]) -> list[list[tuple[Any, ...]]]:
    """Lookup answers as comparable tuples; an own-collection match gets the answering hub's name."""
    return [
        sorted(
            (
                m.get("hub", hub_name),
                m["collection"],
                m["hash"],
                m["distance"],
                tuple(m["submitters"]),
                tuple(m["labels"]),
                m["first_index"],
                m["opinions"]["positive"],
                m["opinions"]["negative"],
            )
            for m in matches
        )
        for matches in results
    ]


# ---- a proxy that forwards to a real hub and can misbehave ---------------------------------


def flip_b64(text: str, bit: int = 0) -> str:
    raw = bytearray(base64.b64decode(text))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    return base64.b64encode(bytes(raw)).decode()


Mutator = Callable[[str, bytes], bytes]
"""(request path and query, upstream body) → body sent on."""

FORWARDED = ("Accept", "Content-Type", "Signature-Input", "Signature", "Content-Digest")


class Proxy:
    """An HTTP proxy in front of a real hub: passes through, or goes down, slow, garbled or tampering,
    or cuts entries answers short (``reset`` the connection or ``stall`` after half the body)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.mode = "pass"
        self.delay = 30.0
        self.mutate: Mutator | None = None
        self.port = free_port()
        self.requests = 0
        self.posts_allowed: int | None = None
        """With a number: that many POSTs pass, then every request is answered 503 (the hub went away)."""
        self._server: TestServer | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Proxy:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession()
        self._server = TestServer(app, host="127.0.0.1", port=self.port)
        await self._server.start_server()
        return self

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if request.method == "POST" and self.posts_allowed is not None:
            if self.posts_allowed <= 0:
                self.mode = "down"
            self.posts_allowed -= 1
        if self.mode == "down":
            return web.Response(status=503, text="down")
        if self.mode == "slow":
            await asyncio.sleep(self.delay)
        if self.mode == "garbage":
            return web.Response(body=b'{"entries": [1, 2', content_type="application/json")
        assert self._session is not None
        headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
        url = URL(self.upstream + request.raw_path, encoded=True)
        body = await request.read()
        async with self._session.request(request.method, url, headers=headers, data=body or None) as answer:
            data = await answer.read()
            status, content_type = answer.status, answer.content_type
        if self.mutate is not None and status == 200:
            data = self.mutate(request.path_qs, data)
        if self.mode in ("reset", "stall") and request.path.endswith("/entries") and len(data) > 1:
            return await self._cut_short(request, status, content_type, data)
        return web.Response(status=status, body=data, content_type=content_type)

    async def _cut_short(
        self, request: web.Request, status: int, content_type: str, data: bytes
    ) -> web.StreamResponse:
        """Send the headers and half the body, then reset the connection or go silent."""
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        if self.mode == "stall":
            await asyncio.sleep(self.delay)
        else:
            transport = request.transport
            assert transport is not None
            transport.abort()
        return response


def tamper_entry(index: int, change: Callable[[dict[str, Any]], None]) -> Mutator:
    """Rewrite entry ``index`` in entries answers (NDJSON), with ``change`` applied to its envelope."""

    def mutate(target: str, body: bytes) -> bytes:
        if not target.split("?")[0].endswith("/entries"):
            return body
        lines = []
        for line in body.split(b"\n"):
            if line.strip():
                item = json.loads(line)
                if item["index"] == index:
                    change(item["envelope"])
                line = json.dumps(item, separators=(",", ":")).encode()
            lines.append(line)
        return b"\n".join(lines)

    return mutate


def flip_payload_bit(envelope: dict[str, Any]) -> None:
    """Flip the low bit of a decimal digit inside the first hash: the payload stays well formed,
    so only the signature can tell."""
    payload = bytearray(base64.b64decode(envelope["payload"]))
    start = payload.index(b'"hash":"') + len(b'"hash":"')
    position = next(i for i in range(start, start + 64) if payload[i] in b"0123456789")
    payload[position] ^= 1
    envelope["payload"] = base64.b64encode(bytes(payload)).decode()


def flip_signature_bit(envelope: dict[str, Any]) -> None:
    envelope["signatures"][0]["sig"] = flip_b64(envelope["signatures"][0]["sig"], 77)


def tamper_checkpoint(part: str) -> Mutator:
    """Flip one bit of the checkpoint's root line (``root``) or of its signature (``signature``)."""

    def mutate(target: str, body: bytes) -> bytes:
        if not target.split("?")[0].endswith("/checkpoint"):
            return body
        lines = body.decode().split("\n")
        if part == "root":
            lines[2] = flip_b64(lines[2], 5)
        else:
            dash, name, material = lines[4].split(" ")
            lines[4] = f"{dash} {name} {flip_b64(material, 8 * 20 + 3)}"
        return "\n".join(lines).encode()

    return mutate


def tamper_proof(only_old: int | None = None) -> Mutator:
    """Flip one bit of the first hash of consistency proofs (only those from ``old=only_old`` if given)."""

    def mutate(target: str, body: bytes) -> bytes:
        path, _, query = target.partition("?")
        if not path.endswith("/proof/consistency"):
            return body
        if only_old is not None and f"old={only_old}&" not in query + "&":
            return body
        answer = json.loads(body)
        if answer["hashes"]:
            answer["hashes"][0] = flip_b64(answer["hashes"][0], 3)
        return json.dumps(answer).encode()

    return mutate
