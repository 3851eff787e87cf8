"""Refusals (design §5, §7): each is a 4xx RFC 9457 problem, and changes nothing.

Every test here would fail if the check it names were removed: the same request,
without the fault, is accepted (shown alongside where it is not obvious).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import (
    COLLECTION,
    Hub,
    Reply,
    assert_problem,
    batch_doc,
    envelope,
    flip,
    item,
    md5,
    membership_doc,
    open_hub,
    opinion_doc,
    pdq,
)

from federation.admin import add_collection, change_membership
from federation.client import HubClient
from federation.envelope import (
    BATCH_TYPE,
    Envelope,
    Grant,
    Signature,
    compact_json,
    sign_envelope,
)
from federation.hub import auth as hub_auth
from federation.hub import create_app, open_node
from federation.keys import SignerKey

ENTRIES = f"/v1/collections/{COLLECTION}/entries"
INCLUSION = f"/v1/collections/{COLLECTION}/proof/inclusion"
CONSISTENCY = f"/v1/collections/{COLLECTION}/proof/consistency"
LISTED = pdq(1)
LISTED_MD5 = md5(1)


@pytest.fixture
async def hub(federation: Any, hub_server: TestServer, clients: dict[str, HubClient]) -> AsyncIterator[Hub]:
    """A hub where beta lists LISTED (pdq) and acme lists LISTED_MD5."""
    async with aiohttp.ClientSession() as session:
        made = await open_hub(federation, hub_server, clients, session)
        await made.submit("beta", batch_doc("beta", [item("pdq", LISTED, ["beta"])]))
        await made.submit("acme", batch_doc("acme", [item("md5", LISTED_MD5, ["acme"])]))
        yield made


Probe = Sequence[tuple[str, str]]


async def refused(
    hub: Hub,
    send: Callable[[], Awaitable[Reply]],
    status: int,
    kind: str | None,
    probes: Probe = (),
) -> dict[str, Any]:
    """Send a request, check it is the problem expected and that it changed nothing."""
    watched = [("pdq", LISTED), ("md5", LISTED_MD5), *probes]
    before = await hub.observe(watched)
    problem = assert_problem(await send(), status, kind)
    assert await hub.observe(watched) == before
    return problem


def post(
    hub: Hub, env: Envelope | bytes, who: str | SignerKey | None = "acme", collection: str = COLLECTION
) -> Callable[[], Awaitable[Reply]]:
    return lambda: hub.post(env, who, collection)


def acme_adds(hub: Hub, *hashes: str, **fields: Any) -> Envelope:
    return envelope(hub.members["acme"], batch_doc("acme", [item("pdq", h) for h in hashes], **fields))


# ---- envelope signatures -------------------------------------------------------


async def test_bad_envelope_signature(hub: Hub) -> None:
    good = acme_adds(hub, pdq(10))
    sig = bytearray(good.signatures[0].sig)
    sig[5] ^= 0x01
    tampered = Envelope(good.payload, good.payload_type, (Signature(good.signatures[0].keyid, bytes(sig)),))
    problem = await refused(hub, post(hub, tampered), 400, "bad-envelope-signature", [("pdq", pdq(10))])
    assert "acme+" in problem["detail"]
    # The payload changed after signing.
    other = batch_doc("acme", [item("pdq", pdq(11))])
    swapped = Envelope(compact_json(other), good.payload_type, good.signatures)
    await refused(hub, post(hub, swapped), 400, "bad-envelope-signature", [("pdq", pdq(11))])
    # Signed by beta's key but claiming acme's key id.
    forged = Envelope(
        good.payload,
        good.payload_type,
        (
            Signature(
                good.signatures[0].keyid,
                sign_envelope(hub.members["beta"], BATCH_TYPE, good.payload).signatures[0].sig,
            ),
        ),
    )
    await refused(hub, post(hub, forged, "beta"), 400, "bad-envelope-signature", [("pdq", pdq(10))])
    assert (await hub.post(good)).status == 201


async def test_envelope_signed_by_an_unknown_key(hub: Hub) -> None:
    outsider = hub.members["outsider"]
    env = envelope(outsider, batch_doc("outsider", [item("pdq", pdq(12))]))
    problem = await refused(hub, post(hub, env, "acme"), 403, "unknown-key", [("pdq", pdq(12))])
    assert outsider.key_id in problem["detail"]
    # A new key under an existing member's name is not that member.
    impostor = SignerKey.generate("acme")
    env = envelope(impostor, batch_doc("acme", [item("pdq", pdq(12))]))
    await refused(hub, post(hub, env, "beta"), 403, "unknown-key", [("pdq", pdq(12))])


async def test_more_than_one_signature(hub: Hub) -> None:
    env = acme_adds(hub, pdq(13))
    doubled = Envelope(env.payload, env.payload_type, env.signatures * 2)
    await refused(hub, post(hub, doubled), 400, "invalid-envelope", [("pdq", pdq(13))])


# ---- HTTP signatures -----------------------------------------------------------


async def test_unsigned_requests_are_refused(hub: Hub) -> None:
    env = acme_adds(hub, pdq(14))
    lookup = json.dumps({"queries": [{"type": "pdq", "hash": LISTED}]}).encode()
    for method, path, query, body in (
        ("POST", ENTRIES, "", env.canonical()),
        ("GET", ENTRIES, "start=0", None),
        ("GET", INCLUSION, "index=0&size=1", None),
        ("GET", CONSISTENCY, "old=1&new=2", None),
        ("POST", "/v1/lookup", "", lookup),
    ):
        problem = await refused(
            hub,
            lambda m=method, p=path, q=query, b=body: hub.call(m, p, None, query=q, body=b),
            401,
            "bad-request-signature",
            [("pdq", pdq(14))],
        )
        assert "Signature" in problem["detail"]
    # Signed, the same requests succeed.
    assert (await hub.call("GET", ENTRIES, "reader", query="start=0")).status == 200
    assert (await hub.call("POST", "/v1/lookup", "reader", body=lookup)).status == 200
    assert (await hub.post(env)).status == 201


async def test_bad_http_signature(hub: Hub) -> None:
    env = acme_adds(hub, pdq(15))
    body = env.canonical()
    headers = hub.signed_headers("acme", "POST", ENTRIES, "", body)
    headers["Content-Type"] = "application/json"
    # Tampered signature bytes.
    bad = dict(headers)
    raw = bytearray(base64.b64decode(bad["Signature"].split(":")[1]))
    raw[0] ^= 0x80
    bad["Signature"] = "sig1=:" + base64.b64encode(bytes(raw)).decode() + ":"
    await refused(
        hub,
        lambda: hub.send("POST", ENTRIES, body=body, headers=bad),
        401,
        "bad-request-signature",
        [("pdq", pdq(15))],
    )
    # Signed by acme, but naming beta's key.
    forged = dict(headers)
    forged["Signature-Input"] = forged["Signature-Input"].replace(
        hub.members["acme"].key_id, hub.members["beta"].key_id
    )
    await refused(
        hub,
        lambda: hub.send("POST", ENTRIES, body=body, headers=forged),
        401,
        "bad-request-signature",
        [("pdq", pdq(15))],
    )
    # Signed for another path, or another query.
    await refused(
        hub,
        lambda: hub.send(
            "POST", "/v1/collections/main/entries", query="x=1", body=body, headers=dict(headers)
        ),
        401,
        "bad-request-signature",
        [("pdq", pdq(15))],
    )
    get_headers = hub.signed_headers("reader", "GET", ENTRIES, "start=0")
    await refused(
        hub,
        lambda: hub.send("GET", ENTRIES, query="start=1", headers=get_headers),
        401,
        "bad-request-signature",
    )
    # The original, untouched, is accepted.
    assert (await hub.send("POST", ENTRIES, body=body, headers=headers)).status == 201


async def test_http_signature_by_an_unknown_key(hub: Hub) -> None:
    problem = await refused(hub, lambda: hub.call("GET", ENTRIES, "outsider"), 401, "bad-request-signature")
    assert hub.members["outsider"].key_id in problem["detail"]
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(16))]))
    await refused(hub, post(hub, env, "outsider"), 401, "bad-request-signature", [("pdq", pdq(16))])
    await refused(
        hub,
        lambda: hub.lookup([("pdq", LISTED)], "outsider"),
        401,
        "bad-request-signature",
    )


async def test_revoked_key_is_refused_at_once(hub: Hub) -> None:
    acme = hub.members["acme"]
    assert (await hub.call("GET", ENTRIES, "acme")).status == 200
    pending = acme_adds(hub, pdq(17))  # signed before the revocation
    change_membership(hub.data, COLLECTION, revoke=[acme.key_id])  # while the hub serves
    await refused(hub, lambda: hub.call("GET", ENTRIES, "acme"), 401, "bad-request-signature")
    await refused(hub, lambda: hub.lookup([("pdq", LISTED)], "acme"), 401, "bad-request-signature")
    await refused(hub, post(hub, pending, "acme"), 401, "bad-request-signature", [("pdq", pdq(17))])
    # Relayed by another member, the revoked key's envelope is refused too.
    problem = await refused(hub, post(hub, pending, "beta"), 403, "revoked-key", [("pdq", pdq(17))])
    assert acme.key_id in problem["detail"]
    # And a revoked key cannot be granted again.
    regrant = envelope(hub.hub_signer, membership_doc([(acme.verifier, ["read", "write"])]))
    await refused(hub, post(hub, regrant, "hub"), 409, "key-revoked")
    # Others are unaffected.
    assert (await hub.call("GET", ENTRIES, "beta")).status == 200


async def test_replayed_http_signature(hub: Hub) -> None:
    headers = hub.signed_headers("reader", "GET", ENTRIES, "start=0")
    assert (await hub.send("GET", ENTRIES, query="start=0", headers=headers)).status == 200
    problem = await refused(
        hub, lambda: hub.send("GET", ENTRIES, query="start=0", headers=headers), 401, "bad-request-signature"
    )
    assert "replay" in problem["detail"]
    # A replayed POST does not reach the log either (not even as a 200 resubmission).
    env = acme_adds(hub, pdq(18))
    body = env.canonical()
    post_headers = hub.signed_headers("acme", "POST", ENTRIES, "", body)
    assert (await hub.send("POST", ENTRIES, body=body, headers=post_headers)).status == 201
    await refused(
        hub,
        lambda: hub.send("POST", ENTRIES, body=body, headers=post_headers),
        401,
        "bad-request-signature",
        [("pdq", pdq(18))],
    )
    # Signed afresh, the same envelope is an exact resubmission.
    assert (await hub.post(env)).status == 200


async def test_a_signature_cannot_be_replayed_while_its_created_is_acceptable(
    hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signature created 300 s ahead of the hub's clock stays acceptable for 600 s:
    a replay must be refused for all of that time, including its last second."""
    start = int(time.time())
    clock = [start]
    monkeypatch.setattr(hub_auth, "time", SimpleNamespace(time=lambda: float(clock[0])))
    headers = hub.signed_headers("reader", "GET", ENTRIES, "start=0", created=start + 300)
    assert (await hub.send("GET", ENTRIES, query="start=0", headers=headers)).status == 200
    for later in (0, 1, 300, 599, 600):
        clock[0] = start + later
        reply = await hub.send("GET", ENTRIES, query="start=0", headers=headers)
        problem = assert_problem(reply, 401, "bad-request-signature")
        assert "replay" in problem["detail"], (later, problem)
    clock[0] = start + 601  # now outside the window: refused for its age
    problem = assert_problem(await hub.send("GET", ENTRIES, query="start=0", headers=headers), 401)
    assert "clock" in problem["detail"]


async def test_created_outside_the_window(hub: Hub, subtests: pytest.Subtests) -> None:
    env = acme_adds(hub, pdq(19))
    for skew in (-330, 330, -100_000, 100_000):
        with subtests.test(msg=f"created {skew:+d} s"):
            created = int(time.time()) + skew
            problem = await refused(
                hub,
                lambda c=created: hub.call("GET", ENTRIES, "reader", created=c),
                401,
                "bad-request-signature",
            )
            assert "clock" in problem["detail"]
            await refused(
                hub,
                lambda c=created: hub.call("POST", ENTRIES, "acme", body=env.canonical(), created=c),
                401,
                "bad-request-signature",
                [("pdq", pdq(19))],
            )
    # Within the window, the same requests are accepted.
    for inside in (-250, 250):
        created = int(time.time()) + inside
        assert (await hub.call("GET", ENTRIES, "reader", created=created)).status == 200
    reply = await hub.call("POST", ENTRIES, "acme", body=env.canonical(), created=int(time.time()) - 250)
    assert reply.status == 201


async def test_content_digest_mismatch(hub: Hub) -> None:
    signed_env, sent_env = acme_adds(hub, pdq(20)), acme_adds(hub, pdq(21))
    headers = hub.signed_headers("acme", "POST", ENTRIES, "", signed_env.canonical())
    problem = await refused(
        hub,
        lambda: hub.send("POST", ENTRIES, body=sent_env.canonical(), headers=headers),
        400,
        "content-digest-mismatch",
        [("pdq", pdq(20)), ("pdq", pdq(21))],
    )
    assert "Content-Digest" in problem["detail"]
    # The same for a lookup.
    asked = json.dumps({"queries": [{"type": "pdq", "hash": LISTED}]}).encode()
    headers = hub.signed_headers("reader", "POST", "/v1/lookup", "", asked)
    await refused(
        hub,
        lambda: hub.send("POST", "/v1/lookup", body=asked + b" ", headers=headers),
        400,
        "content-digest-mismatch",
    )
    assert (await hub.post(sent_env)).status == 201


# ---- rights ----------------------------------------------------------------------


async def test_missing_rights(hub: Hub) -> None:
    writer = SignerKey.generate("writer")
    change_membership(hub.data, COLLECTION, grant=[Grant(writer.verifier, frozenset({"write"}))])
    hub.members["writer"] = writer
    # A reader may not add hashes.
    env = envelope(hub.members["reader"], batch_doc("reader", [item("pdq", pdq(22))]))
    problem = await refused(hub, post(hub, env, "reader"), 403, "missing-right", [("pdq", pdq(22))])
    assert "'write'" in problem["detail"]
    # A write-only member may add, but not give opinions, read the log or look up.
    assert (
        await hub.post(envelope(writer, batch_doc("writer", [item("pdq", pdq(23))])), "writer")
    ).status == 201
    opinion = envelope(writer, opinion_doc("writer", [("pdq", LISTED, "negative")]))
    await refused(hub, post(hub, opinion, "writer"), 403, "missing-right")
    for path, query in ((ENTRIES, "start=0"), (INCLUSION, "index=0&size=1"), (CONSISTENCY, "old=1&new=2")):
        await refused(
            hub, lambda p=path, q=query: hub.call("GET", p, "writer", query=q), 403, "missing-right"
        )
    await refused(hub, lambda: hub.lookup([("pdq", LISTED)], "writer"), 403, "missing-right")
    await refused(
        hub, lambda: hub.lookup([("pdq", LISTED)], "writer", collections=["main"]), 403, "missing-right"
    )
    # The reader's opinion is accepted: opinions need the read right only.
    assert (
        await hub.post(
            envelope(hub.members["reader"], opinion_doc("reader", [("pdq", LISTED, "negative")])), "reader"
        )
    ).status == 201


async def test_member_of_another_collection_only(hub: Hub) -> None:
    solo = SignerKey.generate("solo")
    add_collection(hub.data, "other", [Grant(solo.verifier, frozenset({"read", "write"}))])
    hub.members["solo"] = solo
    env = envelope(solo, batch_doc("solo", [item("pdq", pdq(24))]))
    await refused(hub, post(hub, env, "solo"), 403, "not-a-member", [("pdq", pdq(24))])
    await refused(hub, post(hub, env, "acme"), 403, "unknown-key", [("pdq", pdq(24))])
    await refused(hub, lambda: hub.call("GET", ENTRIES, "solo"), 403, "missing-right")
    await refused(
        hub, lambda: hub.lookup([("pdq", LISTED)], "solo", collections=["main"]), 403, "missing-right"
    )
    # Its default lookup covers only its own collection.
    assert (await hub.lookup([("pdq", LISTED)], "solo")).json() == {"results": [{"matches": []}]}
    await refused(
        hub, lambda: hub.lookup([("pdq", LISTED)], "reader", collections=["other"]), 403, "missing-right"
    )


async def test_member_field_must_be_the_signers_member(hub: Hub) -> None:
    env = envelope(hub.members["acme"], batch_doc("beta", [item("pdq", pdq(25))]))
    problem = await refused(hub, post(hub, env), 403, "wrong-member", [("pdq", pdq(25))])
    assert "beta" in problem["detail"] and "acme" in problem["detail"]
    opinion = envelope(hub.members["reader"], opinion_doc("acme", [("pdq", LISTED, "negative")]))
    await refused(hub, post(hub, opinion, "reader"), 403, "wrong-member")


async def test_membership_entries_need_the_hub_key(hub: Hub) -> None:
    gamma = SignerKey.generate("gamma")
    doc = membership_doc([(gamma.verifier, ["read", "write"])])
    problem = await refused(hub, post(hub, envelope(hub.members["acme"], doc), "acme"), 403, "not-hub-key")
    assert hub.hub_key.key_id in problem["detail"]
    await refused(hub, lambda: hub.call("GET", ENTRIES, gamma), 401, "bad-request-signature")
    assert (await hub.post(envelope(hub.hub_signer, doc), "acme")).status == 201  # relayed by a member


async def test_revoking_a_key_that_is_not_active(hub: Hub) -> None:
    stranger = SignerKey.generate("stranger")
    doc = membership_doc(revoke=[stranger.key_id])
    await refused(hub, post(hub, envelope(hub.hub_signer, doc), "hub"), 409, "no-such-key")


async def test_first_entry_must_be_a_membership_entry(hub: Hub) -> None:
    node = open_node(hub.data)
    try:
        node.store.create_collection("empty")
    finally:
        node.store.close()
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(26))], collection="empty"))
    await refused(hub, post(hub, env, "hub", "empty"), 409, "no-membership-yet", [("pdq", pdq(26))])
    assert await hub.size("empty") == 0
    first = envelope(
        hub.hub_signer,
        membership_doc([(hub.members["acme"].verifier, ["read", "write"])], collection="empty"),
    )
    assert (await hub.post(first, "hub", "empty")).status == 201
    assert (await hub.post(env, "acme", "empty")).status == 201


# ---- seq -----------------------------------------------------------------------------


async def test_replayed_seq_is_a_conflict(hub: Hub) -> None:
    seq = int(time.time() * 1_000_000) + 10_000_000
    assert (await hub.post(acme_adds(hub, pdq(27), seq=seq))).status == 201
    for stale in (seq, seq - 1, 1):
        problem = await refused(
            hub, post(hub, acme_adds(hub, pdq(28), seq=stale)), 409, "stale-seq", [("pdq", pdq(28))]
        )
        assert str(seq) in problem["detail"]
    # seq is per signer: beta may use the same number, and acme a higher one.
    assert (
        await hub.post(
            envelope(hub.members["beta"], batch_doc("beta", [item("pdq", pdq(28))], seq=seq)), "beta"
        )
    ).status == 201
    assert (await hub.post(acme_adds(hub, pdq(29), seq=seq + 5))).status == 201
    # The hub key's seq for membership entries is checked the same way.
    gamma = SignerKey.generate("gamma")
    ok = envelope(hub.hub_signer, membership_doc([(gamma.verifier, ["read"])], seq=seq * 2))
    assert (await hub.post(ok, "hub")).status == 201
    delta = SignerKey.generate("delta")
    replayed = envelope(hub.hub_signer, membership_doc([(delta.verifier, ["read"])], seq=seq * 2))
    await refused(hub, post(hub, replayed, "hub"), 409, "stale-seq")


async def test_exact_same_envelope_is_not_a_refusal(hub: Hub) -> None:
    env = acme_adds(hub, pdq(30))
    first = await hub.post(env)
    assert first.status == 201
    before = await hub.observe([("pdq", pdq(30))])
    again = await hub.post(env, "beta")
    assert again.status == 200 and again.json() == first.json()
    assert await hub.observe([("pdq", pdq(30))]) == before


# ---- payload binding and shape ---------------------------------------------------------


async def test_wrong_federation(hub: Hub) -> None:
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(31))], federation="otherfed"))
    problem = await refused(hub, post(hub, env), 400, "wrong-federation", [("pdq", pdq(31))])
    assert "otherfed" in problem["detail"]


async def test_wrong_collection(hub: Hub) -> None:
    add_collection(hub.data, "other", [Grant(hub.members["acme"].verifier, frozenset({"read", "write"}))])
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(32))], collection="other"))
    problem = await refused(
        hub, post(hub, env, "acme", COLLECTION), 400, "wrong-collection", [("pdq", pdq(32))]
    )
    assert "other" in problem["detail"]
    assert (await hub.post(env, "acme", "other")).status == 201


async def test_unknown_collection(hub: Hub) -> None:
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(33))], collection="nope"))
    for path, method, body in (
        ("/v1/collections/nope/entries", "POST", env.canonical()),
        ("/v1/collections/nope/entries", "GET", None),
        ("/v1/collections/nope/checkpoint", "GET", None),
        ("/v1/collections/nope/proof/inclusion", "GET", None),
    ):
        problem = await refused(
            hub, lambda p=path, m=method, b=body: hub.call(m, p, "acme", body=b), 404, "unknown-collection"
        )
        assert "nope" in problem["detail"]
    problem = await refused(
        hub,
        lambda: hub.lookup([("pdq", LISTED)], "reader", collections=["main", "nope"]),
        404,
        "unknown-collection",
    )
    assert "nope" in problem["detail"]


async def test_malformed_json_bodies(hub: Hub) -> None:
    for body in (b"{not json", b"", b"[1, 2", '{"payload": "\u00e9"}'.encode("latin-1"), b"null"):
        await refused(hub, lambda b=body: hub.call("POST", ENTRIES, "acme", body=b), 400, "invalid-envelope")
    for body in (b"{not json", b"", b'{"queries": [], "queries": []}', b"\xff\xfe", b"NaN"):
        await refused(
            hub, lambda b=body: hub.call("POST", "/v1/lookup", "reader", body=b), 400, "malformed-json"
        )
    for body in (
        b"[]",
        b'{"queries": {}}',
        b'{"queries": [], "extra": 1}',
        b'{"queries": [{"type": "pdq"}]}',
    ):
        await refused(
            hub, lambda b=body: hub.call("POST", "/v1/lookup", "reader", body=b), 400, "invalid-lookup"
        )


HUGE = "9" * 5000


async def test_json_with_a_number_too_large_to_parse(hub: Hub, subtests: pytest.Subtests) -> None:
    """Python refuses to turn an integer of more than 4300 digits into an int: still a 400."""
    text = json.dumps({**acme_adds(hub, pdq(34)).to_json(), "extra": 0})
    envelope_body = text.replace('"extra": 0', f'"extra": {HUGE}').encode()
    doc = batch_doc("acme", [item("pdq", pdq(34))], seq=424242)
    payload = compact_json(doc).replace(b'"seq":424242', b'"seq":' + HUGE.encode())
    payload_body = sign_envelope(hub.members["acme"], BATCH_TYPE, payload).canonical()
    lookup_body = f'{{"queries": [], "max_distance": {HUGE}}}'.encode()
    for where, path, who, body, kind in (
        ("in the envelope", ENTRIES, "acme", envelope_body, "invalid-envelope"),
        ("in the signed payload", ENTRIES, "acme", payload_body, "invalid-payload"),
        ("in a lookup", "/v1/lookup", "reader", lookup_body, "malformed-json"),
    ):
        with subtests.test(msg=where):
            await refused(
                hub,
                lambda p=path, w=who, b=body: hub.call("POST", p, w, body=b),
                400,
                kind,
                [("pdq", pdq(34))],
            )


async def test_deeply_nested_json(hub: Hub, subtests: pytest.Subtests) -> None:
    nested = b"[" * 100_000 + b"]" * 100_000
    for path, who, kind in (
        (ENTRIES, "acme", "invalid-envelope"),
        ("/v1/lookup", "reader", "malformed-json"),
    ):
        with subtests.test(msg=path):
            await refused(hub, lambda p=path, w=who: hub.call("POST", p, w, body=nested), 400, kind)


async def test_unknown_payload_type(hub: Hub) -> None:
    doc = batch_doc("acme", [item("pdq", pdq(35))])
    env = envelope(hub.members["acme"], doc, "application/vnd.hashfed.other+json")
    problem = await refused(hub, post(hub, env), 400, "unknown-payload-type", [("pdq", pdq(35))])
    assert "application/vnd.hashfed.other+json" in problem["detail"]


def _bad_items() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("non-hex pdq", item("pdq", "g" + pdq(36)[1:])),
        ("non-hex md5", item("md5", "z" * 32)),
        ("short pdq", item("pdq", pdq(36)[:-1])),
        ("long pdq", item("pdq", pdq(36) + "0")),
        ("md5 of sha256 length", item("md5", pdq(36))),
        ("sha256 of md5 length", item("sha256", md5(36))),
        ("unknown type", item("phash", pdq(36))),
        ("quality 49", item("pdq", pdq(36), quality=49)),
        ("quality 101", item("pdq", pdq(36), quality=101)),
        ("quality on md5", item("md5", md5(36), quality=80)),
        ("quality not an integer", {**item("pdq", pdq(36)), "quality": 50.0}),
        ("label with a control character", item("pdq", pdq(36), ["a\nb"])),
        ("empty label", item("pdq", pdq(36), [""])),
        ("too many labels", item("pdq", pdq(36), [f"l{n}" for n in range(33)])),
        ("unknown item field", {**item("pdq", pdq(36)), "extra": 1}),
        ("hash not a string", {"type": "pdq", "hash": 5}),
    ]


async def test_bad_items_are_refused(hub: Hub, subtests: pytest.Subtests) -> None:
    good = item("pdq", pdq(37))
    for name, bad in _bad_items():
        with subtests.test(msg=name):
            env = envelope(hub.members["acme"], batch_doc("acme", [good, bad]))
            await refused(hub, post(hub, env), 400, "invalid-payload", [("pdq", pdq(36)), ("pdq", pdq(37))])
    assert (await hub.post(envelope(hub.members["acme"], batch_doc("acme", [good])))).status == 201


async def test_pdq_quality_50_is_accepted_49_is_not(hub: Hub) -> None:
    low = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(38), quality=49)]))
    problem = await refused(hub, post(hub, low), 400, "invalid-payload", [("pdq", pdq(38))])
    assert "49" in problem["detail"]
    ok = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(38), quality=50)]))
    assert (await hub.post(ok)).status == 201
    assert [m["hash"] for m in (await hub.matches([("pdq", pdq(38))], max_distance=0))[0]] == [pdq(38)]


def _bad_payloads() -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    def set_field(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda doc: doc.__setitem__(name, value)

    def drop(name: str) -> Callable[[dict[str, Any]], None]:
        return lambda doc: doc.pop(name)

    def duplicate(doc: dict[str, Any]) -> None:
        doc["add"].append(dict(doc["add"][0]))

    def add_and_remove_same(doc: dict[str, Any]) -> None:
        doc["remove"] = [{"type": "md5", "hash": LISTED_MD5}]
        doc["add"].append(item("md5", LISTED_MD5))

    return [
        ("empty batch", lambda doc: doc.update(add=[], remove=[])),
        ("duplicate hash", duplicate),
        ("the same hash added and removed", add_and_remove_same),
        ("unknown field", set_field("extra", 1)),
        ("missing member", drop("member")),
        ("missing remove", drop("remove")),
        ("version 2", set_field("v", 2)),
        ("version true", set_field("v", True)),
        ("version 1.0 (a float, refused for seq, should be for v)", set_field("v", 1.0)),
        ("seq 0", set_field("seq", 0)),
        ("seq a string", set_field("seq", "123")),
        ("seq over 2^53", set_field("seq", 2**53)),
        ("created not RFC 3339", set_field("created", "2026-11-21 19:00:00")),
        ("created not a date", set_field("created", "2026-02-30T19:00:00Z")),
        ("created with non-ASCII digits", set_field("created", "\u0662\u0660\u0662\u0666-11-21T19:00:00Z")),
        ("add not a list", set_field("add", {})),
        ("member not a name", set_field("member", "ac me")),
        ("federation not a string", set_field("federation", 5)),
    ]


async def test_bad_payloads_are_refused(hub: Hub, subtests: pytest.Subtests) -> None:
    for name, change in _bad_payloads():
        with subtests.test(msg=name):
            doc = batch_doc("acme", [item("pdq", pdq(39))])
            change(doc)
            env = envelope(hub.members["acme"], doc, BATCH_TYPE)
            await refused(hub, post(hub, env), 400, "invalid-payload", [("pdq", pdq(39))])


async def test_bad_opinions_are_refused(hub: Hub, subtests: pytest.Subtests) -> None:
    reader = hub.members["reader"]
    cases = {
        "unknown verdict": {"type": "pdq", "hash": LISTED, "verdict": "maybe"},
        "no verdict": {"type": "pdq", "hash": LISTED},
        "empty note": {"type": "pdq", "hash": LISTED, "verdict": "negative", "note": ""},
        "note too long": {"type": "pdq", "hash": LISTED, "verdict": "negative", "note": "x" * 1001},
        "short hash": {"type": "pdq", "hash": LISTED[:-2], "verdict": "negative"},
    }
    for name, opinion in cases.items():
        with subtests.test(msg=name):
            doc = opinion_doc("reader", [])
            doc["opinions"] = [opinion]
            await refused(hub, post(hub, envelope(reader, doc), "reader"), 400, "invalid-payload")
    with subtests.test(msg="no opinions"):
        empty = opinion_doc("reader", [])
        await refused(hub, post(hub, envelope(reader, empty), "reader"), 400, "invalid-payload")
    ok = opinion_doc("reader", [("pdq", LISTED, "negative")])
    assert (await hub.post(envelope(reader, ok), "reader")).status == 201


async def test_bad_membership_payloads(hub: Hub) -> None:
    gamma = SignerKey.generate("gamma")
    doc = membership_doc([(gamma.verifier, ["read"])])
    doc["grant"][0]["member"] = "acme"  # not the key's name
    await refused(hub, post(hub, envelope(hub.hub_signer, doc), "hub"), 400, "invalid-payload")
    doc = membership_doc([(gamma.verifier, ["read", "admin"])])
    await refused(hub, post(hub, envelope(hub.hub_signer, doc), "hub"), 400, "invalid-payload")
    doc = membership_doc([(gamma.verifier, ["read"])], revoke=[gamma.key_id])
    await refused(hub, post(hub, envelope(hub.hub_signer, doc), "hub"), 400, "invalid-payload")


async def test_over_100000_items(hub: Hub) -> None:
    adds = [{"type": "md5", "hash": f"{n:032x}"} for n in range(100_001)]
    env = envelope(hub.members["acme"], batch_doc("acme", adds))
    problem = await refused(hub, post(hub, env), 400, "invalid-payload", [("md5", f"{0:032x}")])
    assert "100000" in problem["detail"]
    # add and remove together count.
    mixed = batch_doc("acme", adds[:50_000], remove=[("md5", f"{n:032x}") for n in range(50_000, 100_001)])
    problem = await refused(hub, post(hub, envelope(hub.members["acme"], mixed)), 400, "invalid-payload")
    assert "100000" in problem["detail"]
    # Opinions likewise.
    opinions = opinion_doc("reader", [("md5", f"{n:032x}", "negative") for n in range(100_001)])
    problem = await refused(
        hub, post(hub, envelope(hub.members["reader"], opinions), "reader"), 400, "invalid-payload"
    )
    assert "100000" in problem["detail"]


async def test_removing_a_hash_the_member_does_not_list_refuses_the_whole_batch(hub: Hub) -> None:
    fresh = pdq(40)
    # beta lists LISTED, acme does not: acme may not remove it, and its addition is not applied either.
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", fresh)], remove=[("pdq", LISTED)]))
    problem = await refused(hub, post(hub, env), 422, "not-listed", [("pdq", fresh)])
    assert LISTED in problem["detail"]
    never = envelope(
        hub.members["acme"], batch_doc("acme", [item("pdq", fresh)], remove=[("md5", md5("never"))])
    )
    await refused(hub, post(hub, never), 422, "not-listed", [("pdq", fresh)])
    # beta may remove it.
    ok = envelope(hub.members["beta"], batch_doc("beta", [item("pdq", fresh)], remove=[("pdq", LISTED)]))
    assert (await hub.post(ok, "beta")).status == 201


# ---- limits ------------------------------------------------------------------------


async def test_body_over_the_configured_limit(federation: Any, hub_server: TestServer) -> None:
    assert federation.data.config().max_body_bytes == 64 * 1024 * 1024  # the default
    config = dataclasses.replace(federation.data.config(), max_body_bytes=10_000)
    server = TestServer(create_app(open_node(federation.data), config), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            small = await open_hub(federation, server, {}, session)
            acme = federation.members["acme"]
            big = envelope(acme, batch_doc("acme", [item("md5", md5(n)) for n in range(200)])).canonical()
            assert len(big) > 10_000
            problem = await refused(
                small, lambda: small.call("POST", ENTRIES, "acme", body=big), 413, "body-too-large"
            )
            assert "10000" in problem["detail"]
            asked = json.dumps({"queries": [{"type": "md5", "hash": md5(n)} for n in range(300)]}).encode()
            assert len(asked) > 10_000
            await refused(
                small, lambda: small.call("POST", "/v1/lookup", "reader", body=asked), 413, "body-too-large"
            )
            # Exactly at the limit is accepted; one byte more is not.
            env = envelope(acme, batch_doc("acme", [item("md5", md5(n)) for n in range(40)])).canonical()
            assert len(env) < 10_000
            over = env + b" " * (10_001 - len(env))
            await refused(
                small, lambda: small.call("POST", ENTRIES, "acme", body=over), 413, "body-too-large"
            )
            exact = env + b" " * (10_000 - len(env))
            reply = await small.call("POST", ENTRIES, "acme", body=exact)
            assert reply.status == 201, reply.text
    finally:
        await server.close()


async def test_lookup_over_10000_queries(hub: Hub) -> None:
    queries = [("md5", f"{n:032x}") for n in range(10_001)]
    problem = await refused(hub, lambda: hub.lookup(queries), 400, "too-many-queries")
    assert "10000" in problem["detail"] or "10,000" in problem["detail"]
    results = await hub.matches(queries[:10_000])
    assert len(results) == 10_000


async def test_max_distance_out_of_range_or_not_an_integer(hub: Hub, subtests: pytest.Subtests) -> None:
    for value in (-1, 64, 1000, "5", True, False, 5.0, None, [5]):
        with subtests.test(msg=repr(value)):
            problem = await refused(
                hub,
                lambda v=value: hub.lookup([("pdq", LISTED)], max_distance=v),
                400,
                "invalid-max-distance",
            )
            assert "max_distance" in problem["detail"]


async def test_max_distance_bounds_are_accepted(hub: Hub) -> None:
    assert [m["distance"] for m in (await hub.matches([("pdq", flip(LISTED, 63))], max_distance=63))[0]] == [
        63
    ]
    assert (await hub.matches([("pdq", LISTED)], max_distance=0))[0][0]["distance"] == 0


async def test_bad_lookup_queries(hub: Hub, subtests: pytest.Subtests) -> None:
    for query in (
        {"type": "pdq", "hash": "g" * 64},
        {"type": "pdq", "hash": LISTED[:-1]},
        {"type": "md5", "hash": LISTED},
        {"type": "phash", "hash": LISTED},
        {"type": "pdq", "hash": None},
    ):
        with subtests.test(msg=json.dumps(query)):
            body = json.dumps({"queries": [{"type": "pdq", "hash": LISTED}, query]}).encode()
            problem = await refused(
                hub, lambda b=body: hub.call("POST", "/v1/lookup", "reader", body=b), 400, "invalid-hash"
            )
            assert "queries[1]" in problem["detail"]


async def test_lookup_collections_must_be_a_list_of_names(hub: Hub) -> None:
    for value in ("main", [1], {"main": 1}):
        await refused(
            hub, lambda v=value: hub.lookup([("pdq", LISTED)], collections=v), 400, "invalid-lookup"
        )


# ---- query parameters -----------------------------------------------------------------


async def test_bad_entries_query(hub: Hub, subtests: pytest.Subtests) -> None:
    for query in ("start=abc", "start=-1", "start=1.5", "start=", "limit=ten", "start=1" + "0" * 30):
        with subtests.test(msg=query):
            problem = await refused(
                hub, lambda q=query: hub.call("GET", ENTRIES, "reader", query=q), 400, "invalid-query"
            )
            assert query.split("=")[0] in problem["detail"]


async def test_unicode_digits_in_query_parameters(hub: Hub, subtests: pytest.Subtests) -> None:
    """ "²" and "①" are digits to str.isdigit() but not to int(): still a 400, not a 500."""
    for path, query in (
        (ENTRIES, "start=%C2%B2"),
        (ENTRIES, "limit=%E2%91%A0"),
        (INCLUSION, "index=%C2%B2&size=1"),
        (CONSISTENCY, "old=1&new=%C2%B2"),
    ):
        with subtests.test(msg=f"{path}?{query}"):
            await refused(
                hub, lambda p=path, q=query: hub.call("GET", p, "reader", query=q), 400, "invalid-query"
            )


async def test_bad_proof_requests(hub: Hub, subtests: pytest.Subtests) -> None:
    for path, query, kind in (
        (INCLUSION, "index=0", "invalid-query"),
        (INCLUSION, "size=1", "invalid-query"),
        (INCLUSION, "index=x&size=1", "invalid-query"),
        (INCLUSION, "index=4&size=4", "invalid-proof-request"),
        (INCLUSION, "index=0&size=0", "invalid-proof-request"),
        (INCLUSION, "index=0&size=999", "invalid-proof-request"),
        (CONSISTENCY, "old=1", "invalid-query"),
        (CONSISTENCY, "old=3&new=2", "invalid-proof-request"),
        (CONSISTENCY, "old=1&new=999", "invalid-proof-request"),
        (CONSISTENCY, "old=-1&new=2", "invalid-query"),
    ):
        with subtests.test(msg=f"{path}?{query}"):
            await refused(hub, lambda p=path, q=query: hub.call("GET", p, "reader", query=q), 400, kind)


# ---- routing ------------------------------------------------------------------------


async def test_unknown_path_is_a_404_problem(hub: Hub, subtests: pytest.Subtests) -> None:
    for method, path in (
        ("GET", "/v1/nope"),
        ("GET", "/"),
        ("POST", "/v2/lookup"),
        ("GET", "/v1/collections/main"),
    ):
        with subtests.test(msg=f"{method} {path}"):
            problem = await refused(hub, lambda m=method, p=path: hub.call(m, p, "reader"), 404, "not-found")
            assert path in problem["detail"]


async def test_wrong_method_is_a_405_problem(hub: Hub, subtests: pytest.Subtests) -> None:
    for method, path in (
        ("GET", "/v1/lookup"),
        ("DELETE", "/v1/hub"),
        ("POST", "/v1/health"),
        ("PUT", ENTRIES),
        ("DELETE", ENTRIES),
        ("POST", f"/v1/collections/{COLLECTION}/checkpoint"),
    ):
        with subtests.test(msg=f"{method} {path}"):
            problem = await refused(
                hub, lambda m=method, p=path: hub.call(m, p, "acme"), 405, "method-not-allowed"
            )
            assert method in problem["detail"]
