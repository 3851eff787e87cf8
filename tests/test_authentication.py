"""Authentication (design §7, docs/protocol.md §7): who may call what, and what a refusal gives away.

* Every route of the application is enumerated: only those the protocol
  documents as open to ``anyone`` (plus ``/v1/openapi.yaml``) answer without
  a signature; every other one answers ``401`` to a request that is unsigned,
  badly signed, signed by an unknown key, signed with ``created`` 301 s off
  the hub's clock either way, or replayed, and the same request signed
  properly is served.
* A key revoked in the log stops working for the very next request, on
  every route, while the hub serves.
* Refusals never show one member another member's key ids, labels, hashes
  or notes, and the hub logs none of them while refusing.
* Signer key files that group or others may access are refused by the
  member commands and the admin commands, with the ``chmod`` to run.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from helpers import (
    COLLECTION,
    Hub,
    Reply,
    assert_problem,
    batch_doc,
    envelope,
    item,
    md5,
    open_hub,
    opinion_doc,
    pdq,
)

from federation.admin import add_collection, change_membership
from federation.cli import main as cli_main
from federation.client import HubClient
from federation.envelope import Grant
from federation.httpsig import sign_request
from federation.hub import auth as hub_auth
from federation.hub import open_node
from federation.hub.app import RUNTIME
from federation.hub.auth import Caller, SignedRequest
from federation.hub.limits import RequestGuard
from federation.keys import SignerKey, write_signer_file
from federation.state import KeyRecord
from tests.sync_helpers import READ, make_hub

REPO = Path(__file__).resolve().parents[1]
READ_WRITE = frozenset({"read", "write"})
OPENAPI = ("GET", "/v1/openapi.yaml")
"""Public as well (docs/architecture.md): the API's description, which holds no data."""
METRICS = ("GET", "/metrics")
"""Unsigned too: the operator's Prometheus scrapes it, from the networks hub.toml allows (loopback here)."""
EXPECTED_PUBLIC = {
    ("GET", "/v1/health"),
    ("GET", "/v1/ready"),
    ("GET", "/v1/hub"),
    ("GET", "/v1/collections/{collection}/checkpoint"),
    ("GET", "/v1/peers"),
    ("GET", "/v1/sources"),
}
_ANYONE_ROW = re.compile(r"^\| `([A-Z]+) (/[^`?\s]*)[^`]*` \| anyone \|", re.MULTILINE)

# What each member has put in the log: none of it may reach another member through a refusal.
ACME_PDQ, ACME_MD5, BETA_PDQ = pdq(501), md5(502), pdq(503)
ACME_LABEL, BETA_LABEL = "acme-label-q7", "beta-label-k2"
BETA_NOTE, READER_NOTE = "beta-note-zx9 seen on our service", "reader-note-wv4 a public photo"


def documented_public() -> set[tuple[str, str]]:
    """The routes docs/protocol.md §7 marks as open to ``anyone`` (``{c}`` as the router names it)."""
    text = (REPO / "docs" / "protocol.md").read_text()
    return {(method, path.replace("{c}", "{collection}")) for method, path in _ANYONE_ROW.findall(text)}


def public_routes(app: web.Application) -> set[tuple[str, str]]:
    routes = {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}
    public = documented_public() | ({OPENAPI, METRICS} & routes)
    return public | {("HEAD", path) for method, path in public if method == "GET"}


@dataclass
class World:
    hub: Hub
    app: web.Application
    outsider_collection: str = "other"

    @property
    def members(self) -> dict[str, SignerKey]:
        return self.hub.members


@pytest.fixture
async def world(
    federation: Any, hub_server: TestServer, clients: dict[str, HubClient]
) -> AsyncIterator[World]:
    """acme and beta list hashes with labels in ``main``, beta and reader give noted opinions;
    ``outsider`` is a member of collection ``other`` only."""
    add_collection(federation.data, "other", [Grant(federation.members["outsider"].verifier, READ_WRITE)])
    async with aiohttp.ClientSession() as session:
        hub = await open_hub(federation, hub_server, clients, session)
        await hub.submit(
            "acme",
            batch_doc("acme", [item("pdq", ACME_PDQ, [ACME_LABEL]), item("md5", ACME_MD5, [ACME_LABEL])]),
        )
        await hub.submit("beta", batch_doc("beta", [item("pdq", BETA_PDQ, [BETA_LABEL])]))
        beta_opinion = opinion_doc("beta", [("pdq", ACME_PDQ, "negative")])
        beta_opinion["opinions"][0]["note"] = BETA_NOTE
        await hub.submit("beta", beta_opinion)
        reader_opinion = opinion_doc("reader", [("pdq", BETA_PDQ, "positive")])
        reader_opinion["opinions"][0]["note"] = READER_NOTE
        await hub.submit("reader", reader_opinion)
        yield World(hub, hub_server.app)


# ---- the requests each protected route is tried with ----------------------------------------


@dataclass
class Call:
    """One request to a route: the concrete path, query and a fresh body for each sending."""

    method: str
    route: str
    path: str
    query: str
    body: Callable[[], bytes | None]
    known: bool = True
    """False for a route this test has no valid request for: signed properly it need only get past
    authentication (not 401), since the generic body may be refused after it."""

    def __str__(self) -> str:
        return f"{self.method} {self.route}"

    def accepted(self, reply: Reply) -> bool:
        return reply.status in (200, 201) if self.known else reply.status != 401


def calls_for(world: World) -> list[Call]:
    """A valid request for every route outside the public set (a new route gets a generic one)."""
    hub = world.hub
    public = public_routes(world.app)
    serial = iter(range(10_000, 1_000_000))

    def new_batch() -> bytes:
        return envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(next(serial)))])).canonical()

    def lookup_body() -> bytes:
        return json.dumps({"queries": [{"type": "pdq", "hash": ACME_PDQ}], "max_distance": 8}).encode()

    known: dict[tuple[str, str], tuple[str, Callable[[], bytes | None]]] = {
        ("POST", "/v1/collections/{collection}/entries"): ("", new_batch),
        ("GET", "/v1/collections/{collection}/entries"): ("start=0", lambda: None),
        ("GET", "/v1/collections/{collection}/proof/inclusion"): ("index=0&size=1", lambda: None),
        ("GET", "/v1/collections/{collection}/proof/consistency"): ("old=1&new=2", lambda: None),
        ("POST", "/v1/lookup"): ("", lookup_body),
    }
    calls = []
    for route in world.app.router.routes():
        method, template = route.method, route.resource.canonical if route.resource else ""
        if (method, template) in public:
            continue
        path = re.sub(r"\{[^}]+\}", COLLECTION, template)
        request = known.get(("GET" if method == "HEAD" else method, template))
        if request is not None:
            calls.append(Call(method, template, path, request[0], request[1]))
        else:  # a route this test does not know: it must still authenticate first
            generic = (lambda: b"{}") if method in ("POST", "PUT", "PATCH") else (lambda: None)
            calls.append(Call(method, template, path, "", generic, known=False))
    return calls


def signed(
    hub: Hub,
    signer: SignerKey,
    call: Call,
    body: bytes | None,
    *,
    created: int | None = None,
    query: str | None = None,
) -> dict[str, str]:
    """Headers signing ``call`` (over ``query`` instead of the query sent, when given)."""
    headers = hub.signed_headers(
        signer, call.method, call.path, call.query if query is None else query, body, created=created
    )
    if body is not None:
        headers["Content-Type"] = "application/json"
    return headers


async def send(hub: Hub, call: Call, headers: dict[str, str], body: bytes | None) -> Reply:
    return await hub.send(call.method, call.path, query=call.query, body=body, headers=headers)


def assert_refused_401(reply: Reply, call: Call, why: str) -> dict[str, Any] | None:
    """401 problem ``bad-request-signature`` (a HEAD answer carries the status only)."""
    if call.method == "HEAD":
        assert reply.status == 401, f"{call} ({why}): {reply.status}"
        return None
    return assert_problem(reply, 401, "bad-request-signature")


async def log_state(hub: Hub) -> tuple[int, str]:
    """What a refused request must leave unchanged: the checkpoint (log size and root)."""
    return (await hub.size(), await hub.checkpoint_note())


# ---- the public set -----------------------------------------------------------------------


async def test_only_the_documented_public_routes_answer_without_a_signature(world: World) -> None:
    hub, app = world.hub, world.app
    documented = documented_public()
    assert documented >= EXPECTED_PUBLIC, f"docs/protocol.md §7 marks as anyone: {sorted(documented)}"
    routes = {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}
    assert documented <= routes, f"documented as public but not served: {sorted(documented - routes)}"
    public = public_routes(app)
    for method, template in sorted(public):
        path = re.sub(r"\{[^}]+\}", COLLECTION, template)
        reply = await hub.send(method, path)
        assert reply.status == 200, (
            f"{method} {template} (public) answered {reply.status}: {reply.text[:300]}"
        )
    calls = calls_for(world)
    assert {str(call) for call in calls} >= {
        "POST /v1/collections/{collection}/entries",
        "GET /v1/collections/{collection}/entries",
        "HEAD /v1/collections/{collection}/entries",
        "GET /v1/collections/{collection}/proof/inclusion",
        "GET /v1/collections/{collection}/proof/consistency",
        "POST /v1/lookup",
    }
    before = await log_state(hub)
    for call in calls:
        body = call.body()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        problem = assert_refused_401(await send(hub, call, headers, body), call, "unsigned")
        assert problem is None or "Signature" in problem["detail"], problem
    assert await log_state(hub) == before


async def test_public_answers_hold_no_member_data(world: World) -> None:
    """What anyone may fetch: no member's key ids, labels, hashes or notes."""
    hub = world.hub
    secrets = member_secrets(hub, except_member=None)
    for method, template in sorted(public_routes(world.app)):
        if method != "GET":
            continue
        reply = await hub.send(method, re.sub(r"\{[^}]+\}", COLLECTION, template))
        leaked = [secret for secret in secrets if secret in reply.text]
        assert not leaked, f"GET {template} shows {leaked}"


# ---- bad signatures, skew and replay, on every protected route --------------------------------


async def test_every_protected_route_refuses_a_bad_signature(world: World, subtests: pytest.Subtests) -> None:
    hub = world.hub
    acme, beta = hub.members["acme"], hub.members["beta"]
    stranger = SignerKey.generate("stranger")

    def tampered(call: Call, body: bytes | None) -> dict[str, str]:
        headers = signed(hub, acme, call, body)
        raw = bytearray(base64.b64decode(headers["Signature"].split(":")[1]))
        raw[7] ^= 0x04
        headers["Signature"] = "sig1=:" + base64.b64encode(bytes(raw)).decode() + ":"
        return headers

    def other_query(call: Call, body: bytes | None) -> dict[str, str]:
        return signed(hub, acme, call, body, query=call.query + ("&" if call.query else "") + "start=7")

    def borrowed_keyid(call: Call, body: bytes | None) -> dict[str, str]:
        headers = signed(hub, beta, call, body)  # signed by beta, claiming to be acme
        headers["Signature-Input"] = headers["Signature-Input"].replace(beta.key_id, acme.key_id)
        return headers

    def unknown_key(call: Call, body: bytes | None) -> dict[str, str]:
        return signed(hub, stranger, call, body)

    def no_signature_header(call: Call, body: bytes | None) -> dict[str, str]:
        headers = signed(hub, acme, call, body)
        del headers["Signature"]
        return headers

    modes: dict[str, Callable[[Call, bytes | None], dict[str, str]]] = {
        "tampered signature bytes": tampered,
        "signed over another query": other_query,
        "another member's keyid": borrowed_keyid,
        "unknown key": unknown_key,
        "Signature-Input without Signature": no_signature_header,
    }
    for call in calls_for(world):
        for why, make in modes.items():
            with subtests.test(msg=f"{call}: {why}"):
                before = await log_state(hub)
                body = call.body()
                assert_refused_401(await send(hub, call, make(call, body), body), call, why)
                assert await log_state(hub) == before
        with subtests.test(msg=f"{call}: signed properly"):
            body = call.body()
            reply = await send(hub, call, signed(hub, acme, call, body), body)
            assert call.accepted(reply), f"{call}: {reply.status} {reply.text[:300]}"


@pytest.fixture
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> int:
    """The hub's clock, stopped, so 300 and 301 seconds are exactly that."""
    now = int(time.time())
    monkeypatch.setattr(hub_auth, "time", SimpleNamespace(time=lambda: float(now)))
    return now


async def test_every_protected_route_refuses_created_more_than_300_s_off(
    world: World, frozen_clock: int, subtests: pytest.Subtests
) -> None:
    hub = world.hub
    signer = hub.members["acme"]
    for call in calls_for(world):
        for offset in (301, -301, 10_000, -10_000):
            with subtests.test(msg=f"{call}: created {offset:+d} s"):
                before = await log_state(hub)
                body = call.body()
                headers = signed(hub, signer, call, body, created=frozen_clock + offset)
                problem = assert_refused_401(await send(hub, call, headers, body), call, f"{offset:+d} s")
                assert problem is None or "clock" in problem["detail"], problem
                assert await log_state(hub) == before
        for offset in (300, -300):  # the limit itself is accepted
            with subtests.test(msg=f"{call}: created {offset:+d} s"):
                body = call.body()
                headers = signed(hub, signer, call, body, created=frozen_clock + offset)
                reply = await send(hub, call, headers, body)
                assert call.accepted(reply), f"{call}: {reply.status} {reply.text[:300]}"


async def test_every_protected_route_refuses_a_replayed_signature(
    world: World, subtests: pytest.Subtests
) -> None:
    hub = world.hub
    for call in calls_for(world):
        with subtests.test(msg=str(call)):
            body = call.body()
            headers = signed(hub, hub.members["acme"], call, body)
            first = await send(hub, call, headers, body)
            assert call.accepted(first), f"{call}: {first.status} {first.text[:300]}"
            before = await log_state(hub)
            for _ in range(2):
                problem = assert_refused_401(await send(hub, call, dict(headers), body), call, "replay")
                assert problem is None or "replay" in problem["detail"], problem
            assert await log_state(hub) == before, "a replayed request changed the log"


# ---- revocation ------------------------------------------------------------------------------


async def test_a_revoked_key_stops_at_once_on_every_protected_route(
    world: World, subtests: pytest.Subtests
) -> None:
    hub = world.hub
    acme = hub.members["acme"]
    calls = calls_for(world)
    for call in calls:  # acme may do everything before
        body = call.body()
        reply = await send(hub, call, signed(hub, acme, call, body), body)
        assert call.accepted(reply), f"{call}: {reply.status} {reply.text[:300]}"
    pending = envelope(acme, batch_doc("acme", [item("pdq", pdq(777))]))  # signed before the revocation
    change_membership(hub.data, COLLECTION, revoke=[acme.key_id])  # another process's write, while serving
    for call in calls:  # the very next request, no wait
        with subtests.test(msg=str(call)):
            before = await log_state(hub)
            body = call.body()
            problem = assert_refused_401(
                await send(hub, call, signed(hub, acme, call, body), body), call, "revoked"
            )
            assert problem is None or "revoked" in problem["detail"], problem
            assert await log_state(hub) == before
    # Its envelope signed before the revocation is refused too, whoever relays it.
    before = await log_state(hub)
    assert_problem(await hub.post(pending, "beta"), 403, "revoked-key")
    assert await log_state(hub) == before
    # Others are unaffected.
    assert (await hub.call("GET", f"/v1/collections/{COLLECTION}/entries", "beta")).status == 200


async def test_a_key_revoked_in_one_collection_keeps_only_its_others(world: World) -> None:
    hub = world.hub
    acme = hub.members["acme"]
    change_membership(hub.data, "other", grant=[Grant(acme.verifier, READ_WRITE)])
    change_membership(hub.data, COLLECTION, revoke=[acme.key_id])
    entries = f"/v1/collections/{COLLECTION}/entries"
    assert_problem(await hub.call("GET", entries, "acme"), 403, "missing-right")
    assert_problem(
        await hub.lookup([("pdq", ACME_PDQ)], "acme", collections=[COLLECTION]), 403, "missing-right"
    )
    assert_problem(
        await hub.post(envelope(acme, batch_doc("acme", [item("pdq", pdq(778))])), "acme"),
        403,
        "not-a-member",
    )
    # Its default lookup searches what it may still read: not main, where its own hash is listed.
    reply = await hub.lookup([("pdq", ACME_PDQ), ("md5", ACME_MD5)], "acme")
    assert reply.status == 200 and reply.json() == {"results": [{"matches": []}, {"matches": []}]}
    assert (await hub.call("GET", "/v1/collections/other/entries", "acme")).status == 200


# ---- nothing of another member in refusals or logs ----------------------------------------------


def member_secrets(hub: Hub, except_member: str | None) -> list[str]:
    """Key ids, labels, notes and hashes that belong to members other than ``except_member``."""
    own = {
        "acme": [ACME_PDQ, ACME_MD5, ACME_LABEL],
        "beta": [BETA_PDQ, BETA_LABEL, BETA_NOTE],
        "reader": [READER_NOTE],
        "outsider": [],
    }
    secrets = []
    for name, key in hub.members.items():
        if name != except_member and name in own:
            secrets += [key.key_id, *own[name]]
    return secrets


def sent_text(headers: dict[str, str], path: str, query: str, body: bytes | None) -> str:
    """Everything the caller itself sent, envelope payloads decoded: echoing it back is no leak."""
    parts = [*headers.values(), path, query, (body or b"").decode("utf-8", "replace")]
    with contextlib.suppress(ValueError, KeyError, TypeError):
        parts.append(base64.b64decode(json.loads(body or b"")["payload"]).decode())
    return " ".join(parts)


async def test_refusals_show_no_other_members_data(world: World, caplog: pytest.LogCaptureFixture) -> None:
    """Each member crafts requests that are refused; no answer, and no log line of the hub, holds
    another member's key id, label, hash, note or envelope, beyond what the request itself carried."""
    caplog.set_level(logging.DEBUG)
    hub = world.hub
    m = hub.members
    entries, other_entries = f"/v1/collections/{COLLECTION}/entries", "/v1/collections/other/entries"
    stranger = SignerKey.generate("stranger")

    def lookup(*queries: tuple[str, str], **extra: Any) -> bytes:
        return json.dumps({"queries": [{"type": t, "hash": h} for t, h in queries], **extra}).encode()

    def post(signer: SignerKey, doc: dict[str, Any]) -> bytes:
        return envelope(signer, doc).canonical()

    # (caller, method, path, query, body, expected status)
    attempts: list[tuple[SignerKey, str, str, str, bytes | None, int]] = [
        # outsider: a member of `other` only, guessing at main
        (m["outsider"], "GET", entries, "start=0", None, 403),
        (m["outsider"], "GET", f"/v1/collections/{COLLECTION}/proof/inclusion", "index=1&size=2", None, 403),
        (m["outsider"], "POST", "/v1/lookup", "", lookup(("pdq", ACME_PDQ), collections=[COLLECTION]), 403),
        (
            m["outsider"],
            "POST",
            entries,
            "",
            post(m["outsider"], batch_doc("outsider", [item("pdq", pdq(9))])),
            403,
        ),
        (
            m["outsider"],
            "POST",
            other_entries,
            "",
            post(m["outsider"], batch_doc("outsider", remove=[("pdq", ACME_PDQ)], collection="other")),
            422,
        ),
        # beta: removing what acme lists, stale seq, claiming to be acme, opinions as acme
        (m["beta"], "POST", entries, "", post(m["beta"], batch_doc("beta", remove=[("md5", ACME_MD5)])), 422),
        (
            m["beta"],
            "POST",
            entries,
            "",
            post(m["beta"], batch_doc("beta", [item("pdq", pdq(10))], seq=1)),
            409,
        ),
        (m["beta"], "POST", entries, "", post(m["beta"], batch_doc("acme", [item("pdq", pdq(11))])), 403),
        (
            m["beta"],
            "POST",
            entries,
            "",
            post(m["beta"], opinion_doc("acme", [("pdq", BETA_PDQ, "negative")])),
            403,
        ),
        # reader: read only
        (
            m["reader"],
            "POST",
            entries,
            "",
            post(m["reader"], batch_doc("reader", [item("pdq", pdq(12))])),
            403,
        ),
        (
            m["reader"],
            "POST",
            entries,
            "",
            post(m["reader"], batch_doc("reader", remove=[("pdq", BETA_PDQ)])),
            403,
        ),
        (m["reader"], "GET", f"/v1/collections/{COLLECTION}/proof/inclusion", "index=9&size=2", None, 400),
        (m["reader"], "POST", "/v1/lookup", "", lookup(("pdq", "zz")), 400),
        (m["reader"], "POST", "/v1/lookup", "", lookup(("pdq", ACME_PDQ), collections=["nope"]), 404),
        # a key the hub does not know
        (stranger, "GET", entries, "start=0", None, 401),
        (stranger, "POST", "/v1/lookup", "", lookup(("pdq", ACME_PDQ)), 401),
        (
            stranger,
            "POST",
            entries,
            "",
            post(stranger, batch_doc("stranger", remove=[("pdq", BETA_PDQ)])),
            401,
        ),
    ]
    before = await log_state(hub)
    caplog.clear()
    for signer, method, path, query, body, status in attempts:
        headers = hub.signed_headers(signer, method, path, query, body)
        if body is not None:
            headers["Content-Type"] = "application/json"
        reply = await hub.send(method, path, query=query, body=body, headers=headers)
        assert_problem(reply, status)
        request = sent_text(headers, path, query, body)
        secrets = [s for s in member_secrets(hub, signer.name) if s not in request]
        answer = reply.text + " ".join(f"{k}: {v}" for k, v in reply.headers.items())
        leaked = [s for s in secrets if s in answer]
        assert not leaked, f"{signer.name} {method} {path} → {reply.status}: {reply.text} shows {leaked}"
    # A lookup by a non-member of main searches its own collections only: main's listings stay unseen.
    outsider_lookup = await hub.lookup([("pdq", ACME_PDQ), ("md5", ACME_MD5)], m["outsider"])
    assert outsider_lookup.status == 200
    assert outsider_lookup.json() == {"results": [{"matches": []}, {"matches": []}]}
    assert await log_state(hub) == before

    logged = "\n".join(
        record.getMessage() + (record.exc_text or "") + str(getattr(record, "args", ""))
        for record in caplog.records
    )
    payloads = [json.loads(leaf)["payload"] for leaf in await hub.leaves()]
    for secret in [*member_secrets(hub, None), *payloads]:
        assert secret not in logged, f"the hub logged {secret[:40]}… while refusing"


async def test_an_internal_error_answer_shows_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure deep in the hub answers a generic 500: not the exception, which may hold data."""
    hub = world.hub
    store = world.app[RUNTIME].node.store

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(
            f"store failure near {ACME_PDQ} listed by {hub.members['acme'].key_id} ({ACME_LABEL})"
        )

    monkeypatch.setattr(store, "details", broken)
    reply = await hub.lookup([("pdq", BETA_PDQ)], "reader", collections=[COLLECTION])
    problem = assert_problem(reply, 500, "internal")
    assert ACME_PDQ not in reply.text and ACME_LABEL not in reply.text and "acme" not in problem["detail"]


# ---- signer key files ---------------------------------------------------------------------


OPEN_MODES = [0o640, 0o604, 0o644, 0o660, 0o620, 0o602, 0o610, 0o601]
MEMBER_COMMANDS = ["submit", "lookup", "opinion", "mirror"]


@pytest.fixture(scope="module")
def nowhere() -> Any:
    """A local HTTP server that answers 404 to everything and counts the requests it got."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            seen.append(f"{self.command} {self.path}")
            body = b'{"type":"urn:hashfed:problem:not-found","title":"Not found","status":404,"detail":"nothing here"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/problem+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", seen=seen)
    server.shutdown()
    server.server_close()


def member_command(command: str, hub: str, key_file: Path, tmp_path: Path) -> list[str]:
    hub_pub = tmp_path / "hub.pub"
    hub_pub.write_text(SignerKey.generate("somehub").verifier.encode() + "\n")
    hashes = tmp_path / "hashes.txt"
    hashes.write_text(md5(1) + "\n")
    return {
        "submit": ["submit", "--hub", hub, "--key", str(key_file), "--collection", "main", str(hashes)],
        "lookup": ["lookup", "--hub", hub, "--key", str(key_file), md5(1)],
        "opinion": [
            "opinion", "--hub", hub, "--key", str(key_file), "--collection", "main",
            "--verdict", "negative", md5(1),
        ],
        "mirror": [
            "mirror", "--hub", hub, "--key", str(key_file), "--collection", "main",
            "--pin", str(hub_pub), str(tmp_path / f"mirror-{time.monotonic_ns()}"),
        ],
    }[command]  # fmt: skip


@pytest.mark.parametrize("mode", OPEN_MODES, ids=[f"{m:04o}" for m in OPEN_MODES])
@pytest.mark.parametrize("command", MEMBER_COMMANDS)
def test_member_commands_refuse_a_signer_key_open_to_group_or_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nowhere: Any, command: str, mode: int
) -> None:
    key_file = tmp_path / "acme.key"
    write_signer_file(SignerKey.generate("acme"), key_file)
    key_file.chmod(mode)
    asked = len(nowhere.seen)
    code = cli_main(member_command(command, nowhere.url, key_file, tmp_path))
    err = capsys.readouterr().err
    assert code == 2, (code, err)
    assert f"chmod 600 {key_file}" in err, err
    assert len(nowhere.seen) == asked, "the command sent a request before refusing its key file"


@pytest.mark.parametrize("command", MEMBER_COMMANDS)
def test_member_commands_take_a_signer_key_of_mode_0600(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], nowhere: Any, command: str
) -> None:
    """The control: at 0600 the same command gets past its key and asks the hub (which answers 404)."""
    key_file = tmp_path / "acme.key"
    write_signer_file(SignerKey.generate("acme"), key_file)
    asked = len(nowhere.seen)
    code = cli_main(member_command(command, nowhere.url, key_file, tmp_path))
    err = capsys.readouterr().err
    assert code == 1 and "chmod" not in err, (code, err)
    assert len(nowhere.seen) > asked


@pytest.mark.parametrize("mode", [0o640, 0o604], ids=["0640", "0604"])
def test_admin_commands_refuse_a_hub_key_open_to_group_or_others(
    federation: Any, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    hub_key = federation.data.signer_file
    newcomer = SignerKey.generate("newcomer").verifier.encode()
    hub_key.chmod(mode)
    code = cli_main(
        [
            "member",
            "grant",
            str(federation.data.path),
            "--collection",
            COLLECTION,
            "--key",
            newcomer,
            "--rights",
            "read",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and f"chmod 600 {hub_key}" in err, (code, err)
    hub_key.chmod(0o600)
    assert cli_main(["member", "list", str(federation.data.path)]) == 0
    assert "newcomer" not in capsys.readouterr().out


def test_lookups_answered_together_read_each_keys_records_once_and_keep_their_own_outcomes(
    tmp_path: Path,
) -> None:
    hub = make_hub(tmp_path, "hub", {"alice": READ, "bob": READ})
    node = open_node(hub.data)
    reads: list[str] = []
    read_records = node.store.key_memberships

    def counted(key_id: str) -> list[tuple[str, KeyRecord]]:
        reads.append(key_id)
        return read_records(key_id)

    node.store.key_memberships = counted  # type: ignore[method-assign]
    stranger = SignerKey.generate("stranger")

    def signed(key: SignerKey, number: int) -> tuple[SignedRequest, bytes]:
        body = json.dumps({"queries": [{"type": "pdq", "hash": f"{number:064x}"}]}).encode()
        headers = {"Content-Type": "application/json", **sign_request(key, "POST", "/v1/lookup", "", body)}
        return SignedRequest("POST", "/v1/lookup", "", headers), body

    alice, bob = hub.members["alice"], hub.members["bob"]
    batch = [signed(alice, 1), signed(bob, 2), signed(alice, 3), signed(stranger, 4)]
    batch.append(batch[0])  # the same signature again: a replay
    outcomes = hub_auth.authenticate_many(node, RequestGuard(), batch)
    assert [o.key_id if isinstance(o, Caller) else o.status for o in outcomes] == [
        alice.key_id,
        bob.key_id,
        alice.key_id,
        401,
        401,
    ]
    assert "unknown key id" in str(outcomes[3])
    assert "replayed signature" in str(outcomes[4])
    assert sorted(reads) == sorted([alice.key_id, bob.key_id, stranger.key_id])
