"""HTTP API v1 (design §7) against a real hub on loopback: every endpoint's good path."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import (
    COLLECTION,
    FEDERATION,
    HUB_NAME,
    Hub,
    batch_doc,
    envelope,
    flip,
    item,
    md5,
    membership_doc,
    naive_root,
    open_hub,
    opinion_doc,
    pdq,
    sha256,
)

from federation import merkle
from federation.admin import add_collection
from federation.checkpoint import open_note
from federation.client import HubClient
from federation.envelope import Addition, Envelope, Grant, OpinionItem, Removal, compact_json
from federation.hub import create_app, open_node
from federation.hub import routes as hub_routes
from federation.keys import SignerKey, VerifierKey
from federation.signals import SIGNAL_TYPES

NDJSON = "application/x-ndjson"
ENTRIES = f"/v1/collections/{COLLECTION}/entries"


@pytest.fixture
async def hub(federation: Any, hub_server: TestServer, clients: dict[str, HubClient]) -> AsyncIterator[Hub]:
    async with aiohttp.ClientSession() as session:
        yield await open_hub(federation, hub_server, clients, session)


async def grow(hub: Hub, total: int) -> list[bytes]:
    """Submit small batches (alternating acme and beta) until the log has ``total`` entries."""
    size = await hub.size()
    posted = []
    for n in range(size, total):
        who = "acme" if n % 2 else "beta"
        env = envelope(hub.members[who], batch_doc(who, [item("md5", md5(f"grow-{n}"))]))
        reply = await hub.post(env, who)
        assert reply.status == 201, reply.text
        assert reply.json()["index"] == n
        posted.append(env.canonical())
    return posted


# ---- public endpoints ------------------------------------------------------------


async def test_health(hub: Hub) -> None:
    reply = await hub.call("GET", "/v1/health")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    assert reply.json() == {"status": "ok"}


async def test_ready_answers_200_once_loaded(hub: Hub) -> None:
    reply = await hub.call("GET", "/v1/ready")
    assert reply.status == 200
    assert reply.content_type == "application/json"


async def test_ready_is_503_problem_while_indexes_load(federation: Any) -> None:
    node = open_node(federation.data)
    release = threading.Event()
    real_load = node.load

    def slow_load() -> None:
        release.wait(10)
        real_load()

    node.load = slow_load  # type: ignore[method-assign]
    server = TestServer(create_app(node, federation.data.config()), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(server.make_url("/v1/ready")) as response:
                assert response.status == 503
                assert response.content_type == "application/problem+json"
                problem = await response.json(content_type=None)
                assert problem["status"] == 503 and problem["detail"]
            async with session.get(server.make_url("/v1/health")) as response:
                assert response.status == 200
            release.set()
            for _ in range(200):
                async with session.get(server.make_url("/v1/ready")) as response:
                    if response.status == 200:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("ready never turned 200 after the load finished")
    finally:
        release.set()
        await server.close()


async def test_hub_info(hub: Hub) -> None:
    reply = await hub.call("GET", "/v1/hub")
    assert reply.status == 200
    info = reply.json()
    assert set(info) == {
        "name",
        "key",
        "federation",
        "collections",
        "signal_types",
        "version",
        "limits",
        "defaults",
    }
    assert info["limits"] == {"max_matches_per_query": 10_000, "max_matches_per_answer": 100_000}
    assert info["defaults"] == {
        "pdq": 31,
        "photodna": 30_000,
        "vpdq": {"max_distance": 31, "min_query_match_percent": 80, "min_compared_match_percent": 0},
    }
    assert info["name"] == HUB_NAME
    assert info["federation"] == FEDERATION
    key = VerifierKey.parse(info["key"])
    assert key == hub.hub_key
    assert info["collections"] == [COLLECTION]
    assert info["signal_types"] == list(SIGNAL_TYPES) == ["pdq", "md5", "sha256", "sha1", "photodna", "vpdq"]
    assert isinstance(info["version"], str) and info["version"]


async def test_hub_info_lists_new_collections(hub: Hub) -> None:
    add_collection(hub.data, "other", [Grant(hub.members["acme"].verifier, frozenset({"read", "write"}))])
    info = (await hub.call("GET", "/v1/hub")).json()
    assert sorted(info["collections"]) == ["main", "other"]


# ---- posting entries ---------------------------------------------------------------


async def test_post_entry_answers_201_with_index_and_leaf_hash(hub: Hub) -> None:
    before = await hub.size()
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(1), ["csam"])]))
    reply = await hub.post(env)
    assert reply.status == 201
    assert reply.content_type == "application/json"
    answer = reply.json()
    assert set(answer) == {"index", "leaf_hash"}
    assert answer["index"] == before
    assert answer["leaf_hash"] == base64.b64encode(merkle.leaf_hash(env.canonical())).decode()
    assert await hub.size() == before + 1
    assert (await hub.leaves())[before] == env.canonical()


async def test_exact_resubmission_answers_200_with_the_same_index(hub: Hub) -> None:
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(2))]))
    first = await hub.post(env)
    assert first.status == 201
    size = await hub.size()
    note = await hub.checkpoint_note()
    for who in ("acme", "beta", "reader"):  # whoever relays it, it is the same entry
        again = await hub.post(env, who)
        assert again.status == 200, again.text
        assert again.json() == first.json()
    assert await hub.size() == size
    assert await hub.checkpoint_note() == note


async def test_client_submit_and_resubmit(hub: Hub) -> None:
    acme = hub.clients["acme"]
    submitted = await acme.submit(COLLECTION, [Addition("pdq", pdq(3), ("x",))])
    assert submitted.created
    entries, _ = await acme.entries(COLLECTION, submitted.index, 1)
    index, env = entries[0]
    assert index == submitted.index
    again = await acme.post_envelope(COLLECTION, env)
    assert (again.index, again.leaf_hash, again.created) == (submitted.index, submitted.leaf_hash, False)


async def test_hub_key_posts_membership_entries(hub: Hub) -> None:
    gamma = SignerKey.generate("gamma")
    doc = membership_doc([(gamma.verifier, ["read", "write"])])
    reply = await hub.post(envelope(hub.hub_signer, doc), "hub")
    assert reply.status == 201, reply.text
    hub.members["gamma"] = gamma
    await hub.submit("gamma", batch_doc("gamma", [item("pdq", pdq(4), ["new"])]))
    [[match]] = await hub.matches([("pdq", pdq(4))])
    assert match["submitters"] == ["gamma"]


async def test_any_member_may_relay_an_envelope_signed_by_another(hub: Hub) -> None:
    """The envelope decides authority; the HTTP signature only authenticates the caller."""
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(5))]))
    reply = await hub.post(env, "reader")
    assert reply.status == 201, reply.text
    reply = await hub.post(envelope(hub.members["beta"], batch_doc("beta", [item("md5", md5(5))])), "hub")
    assert reply.status == 201, reply.text
    matches = await hub.matches([("pdq", pdq(5)), ("md5", md5(5))])
    assert [m[0]["submitters"] for m in matches] == [["acme"], ["beta"]]


async def test_concurrent_submissions_each_get_their_own_index(hub: Hub) -> None:
    start = await hub.size()
    envs = [
        envelope(hub.members[who], batch_doc(who, [item("pdq", pdq(300 + n))]))
        for n, who in enumerate(["acme", "beta"] * 8)
    ]
    replies = await asyncio.gather(*(hub.post(env, env.signer_key_id.split("+")[0]) for env in envs))
    statuses = [r.status for r in replies]
    # seq is per signer and the client signed them in order, so a later one may overtake an earlier one
    # (409 stale-seq); but no index is given twice and every acknowledged entry is in the log.
    assert set(statuses) <= {201, 409}, [r.text for r in replies]
    accepted = [(r.json()["index"], env) for r, env in zip(replies, envs, strict=True) if r.status == 201]
    indexes = sorted(index for index, _ in accepted)
    assert indexes == list(range(start, start + len(accepted)))
    leaves = await hub.leaves()
    assert len(leaves) == start + len(accepted)
    for index, env in accepted:
        assert leaves[index] == env.canonical()
    checkpoint = await hub.checkpoint()
    assert checkpoint.size == len(leaves) and checkpoint.root == naive_root(leaves)


async def test_concurrent_exact_resubmissions_create_one_entry(hub: Hub) -> None:
    env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(320))]))
    start = await hub.size()
    replies = await asyncio.gather(*(hub.post(env, who) for who in ("acme", "beta", "reader", "hub") * 2))
    assert sorted(r.status for r in replies) == [200] * 7 + [201]
    assert {r.json()["index"] for r in replies} == {start}
    assert await hub.size() == start + 1


# ---- reading entries ----------------------------------------------------------------


async def test_entries_pages(hub: Hub) -> None:
    await grow(hub, 30)
    leaves = await hub.leaves()
    assert len(leaves) == 30

    reply = await hub.call("GET", ENTRIES, "reader", query="start=0&limit=5000")
    assert reply.status == 200
    assert reply.content_type == "application/json"
    page = reply.json()
    assert set(page) == {"entries", "next"}
    assert [e["index"] for e in page["entries"]] == list(range(30))
    assert page["next"] == 30
    for entry in page["entries"]:
        assert set(entry) == {"index", "envelope"}
        assert compact_json(entry["envelope"]) == leaves[entry["index"]]
        assert Envelope.from_json(entry["envelope"]).canonical() == leaves[entry["index"]]

    page = (await hub.call("GET", ENTRIES, "acme", query="start=10&limit=7")).json()
    assert [e["index"] for e in page["entries"]] == list(range(10, 17))
    assert page["next"] == 17

    page = (await hub.call("GET", ENTRIES, "acme", query="start=25")).json()
    assert [e["index"] for e in page["entries"]] == list(range(25, 30))
    assert page["next"] == 30

    for start in (30, 31, 1000):
        page = (await hub.call("GET", ENTRIES, "reader", query=f"start={start}&limit=3")).json()
        assert page == {"entries": [], "next": start}

    page = (await hub.call("GET", ENTRIES, "reader")).json()  # start defaults to 0
    assert [e["index"] for e in page["entries"]] == list(range(30))

    page = (await hub.call("GET", ENTRIES, "reader", query="start=4&limit=0")).json()
    assert page == {"entries": [], "next": 4}


async def test_entries_limit_is_capped(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    await grow(hub, 30)
    monkeypatch.setattr(hub_routes, "ENTRIES_PAGE_CAP", 10)
    for query in ("start=0&limit=25", "start=0", "start=0&limit=5000"):
        page = (await hub.call("GET", ENTRIES, "reader", query=query)).json()
        assert [e["index"] for e in page["entries"]] == list(range(10)), query
        assert page["next"] == 10
    page = (await hub.call("GET", ENTRIES, "reader", query="start=12&limit=11")).json()
    assert [e["index"] for e in page["entries"]] == list(range(12, 22))
    assert page["next"] == 22
    page = (await hub.call("GET", ENTRIES, "reader", query="start=12&limit=3")).json()
    assert page["next"] == 15

    # Paging with `next` reaches every entry exactly once.
    seen: list[int] = []
    start = 0
    while True:
        page = (await hub.call("GET", ENTRIES, "reader", query=f"start={start}&limit=1000")).json()
        if not page["entries"]:
            assert page["next"] == start
            break
        seen.extend(e["index"] for e in page["entries"])
        start = page["next"]
    assert seen == list(range(30))

    # The NDJSON stream has no cap.
    reply = await hub.call("GET", ENTRIES, "reader", accept=NDJSON)
    assert len(reply.body.splitlines()) == 30


async def test_entries_ndjson_stream(hub: Hub) -> None:
    posted = await grow(hub, 23)
    page = (await hub.call("GET", ENTRIES, "reader", query="limit=1000")).json()
    stored = [compact_json(e["envelope"]) for e in page["entries"]]

    reply = await hub.call("GET", ENTRIES, "reader", accept=NDJSON)
    assert reply.status == 200
    assert reply.content_type == NDJSON
    assert reply.body.endswith(b"\n")
    lines = reply.body.split(b"\n")[:-1]
    assert len(lines) == 23
    for n, line in enumerate(lines):
        record = json.loads(line)
        assert list(record) == ["index", "envelope"]
        assert record["index"] == n
        data = Envelope.from_json(record["envelope"]).canonical()
        assert data == stored[n]
        assert compact_json(record["envelope"]) == data
    assert stored[-len(posted) :] == posted
    root = (await hub.checkpoint()).root
    assert (
        naive_root([Envelope.from_json(json.loads(line)["envelope"]).canonical() for line in lines]) == root
    )

    reply = await hub.call("GET", ENTRIES, "acme", query="start=20", accept=NDJSON)
    assert [json.loads(line)["index"] for line in reply.body.splitlines()] == [20, 21, 22]
    reply = await hub.call("GET", ENTRIES, "acme", query="start=23", accept=NDJSON)
    assert reply.status == 200 and reply.body == b""

    # The client's stream reader sees the same entries.
    streamed = [(i, e.canonical()) async for i, e in hub.clients["beta"].stream_entries(COLLECTION)]
    assert streamed == list(enumerate(stored))


# ---- checkpoints and proofs -------------------------------------------------------------


async def test_checkpoint_is_a_signed_note_over_the_log(hub: Hub) -> None:
    await grow(hub, 11)
    reply = await hub.call("GET", f"/v1/collections/{COLLECTION}/checkpoint")
    assert reply.status == 200
    assert reply.content_type == "text/plain"
    note = reply.text
    checkpoint = open_note(note, hub.hub_key)
    assert checkpoint.origin == f"{HUB_NAME}/{COLLECTION}"
    lines = note.split("\n")
    assert lines[0] == f"{HUB_NAME}/{COLLECTION}" and lines[1] == "11" and lines[3] == ""
    assert lines[4].startswith(f"\u2014 {HUB_NAME} ")
    leaves = await hub.leaves()
    assert checkpoint.size == len(leaves) == 11
    assert checkpoint.root == naive_root(leaves)
    assert lines[2] == base64.b64encode(naive_root(leaves)).decode()
    other = SignerKey.generate(HUB_NAME).verifier
    with pytest.raises(ValueError):
        open_note(note, other)


async def test_checkpoint_of_an_empty_log(hub: Hub) -> None:
    """A collection whose log is still empty has the RFC 6962 empty root."""
    node = open_node(hub.data)
    try:
        node.store.create_collection("empty")
    finally:
        node.store.close()
    checkpoint = await hub.checkpoint("empty")
    assert (checkpoint.origin, checkpoint.size, checkpoint.root) == (f"{HUB_NAME}/empty", 0, naive_root([]))


async def test_inclusion_proofs_verify_for_every_index(hub: Hub) -> None:
    await grow(hub, 17)
    leaves = await hub.leaves()
    for size in (1, 2, 3, 5, 8, 13, 17):
        root = naive_root(leaves[:size])
        for index in range(size):
            reply = await hub.call(
                "GET",
                f"/v1/collections/{COLLECTION}/proof/inclusion",
                "reader",
                query=f"index={index}&size={size}",
            )
            assert reply.status == 200, reply.text
            answer = reply.json()
            assert set(answer) == {"hashes"}
            proof = [base64.b64decode(h, validate=True) for h in answer["hashes"]]
            merkle.verify_inclusion(merkle.leaf_hash(leaves[index]), index, size, proof, root)
            if size > 1:
                wrong = (index + 1) % size
                with pytest.raises(merkle.ProofError):
                    merkle.verify_inclusion(merkle.leaf_hash(leaves[wrong]), index, size, proof, root)


async def test_consistency_proofs_verify(hub: Hub) -> None:
    await grow(hub, 17)
    leaves = await hub.leaves()
    sizes = (0, 1, 2, 3, 4, 5, 7, 8, 9, 16, 17)
    for old in sizes:
        for new in sizes:
            if old > new:
                continue
            proof = await hub.clients["reader"].consistency_proof(COLLECTION, old, new)
            merkle.verify_consistency(old, new, naive_root(leaves[:old]), naive_root(leaves[:new]), proof)
            if 0 < old < new:
                with pytest.raises(merkle.ProofError):
                    merkle.verify_consistency(
                        old, new, naive_root(leaves[1 : old + 1]), naive_root(leaves[:new]), proof
                    )


async def test_acknowledged_entry_is_at_once_in_checkpoint_proofs_and_lookups(hub: Hub) -> None:
    reader = hub.clients["reader"]
    previous = await hub.checkpoint()
    for n in range(6):
        hash_hex = pdq(100 + n)
        env = envelope(hub.members["acme"], batch_doc("acme", [item("pdq", hash_hex, [f"l{n}"])]))
        reply = await hub.post(env)
        assert reply.status == 201
        index = reply.json()["index"]
        checkpoint = await hub.checkpoint()
        assert checkpoint.size == index + 1
        proof = await reader.inclusion_proof(COLLECTION, index, checkpoint.size)
        merkle.verify_inclusion(
            merkle.leaf_hash(env.canonical()), index, checkpoint.size, proof, checkpoint.root
        )
        proof = await reader.consistency_proof(COLLECTION, previous.size, checkpoint.size)
        merkle.verify_consistency(previous.size, checkpoint.size, previous.root, checkpoint.root, proof)
        [[match]] = await reader.lookup([("pdq", hash_hex)], max_distance=0)
        assert match["first_index"] == index and match["labels"] == [f"l{n}"]
        previous = checkpoint


# ---- lookups --------------------------------------------------------------------


async def test_pdq_near_matches_with_distances(hub: Hub) -> None:
    base = pdq(200)
    await hub.submit("acme", batch_doc("acme", [item("pdq", base, ["csam"])]))
    for distance in (0, 1, 5, 31):
        [[match]] = await hub.matches([("pdq", flip(base, distance))])
        assert (match["hash"], match["distance"]) == (base, distance)
    [found] = await hub.matches([("pdq", flip(base, 32))])
    assert found == []
    [[match]] = await hub.matches([("pdq", flip(base, 32))], max_distance=32)
    assert match["distance"] == 32
    [[match]] = await hub.matches([("pdq", flip(base, 63))], max_distance=63)
    assert match["distance"] == 63
    [found] = await hub.matches([("pdq", flip(base, 1))], max_distance=0)
    assert found == []
    [[match]] = await hub.matches([("pdq", base)], max_distance=0)
    assert match["distance"] == 0
    [[match]] = await hub.matches([("pdq", flip(base, 10))], max_distance=10)
    assert match["distance"] == 10
    [found] = await hub.matches([("pdq", flip(base, 11))], max_distance=10)
    assert found == []


async def test_lookup_match_shape(hub: Hub) -> None:
    base = pdq(201)
    index = await hub.submit("acme", batch_doc("acme", [item("pdq", base, ["b", "a"], quality=80)]))
    reply = await hub.lookup([("pdq", flip(base, 3))])
    assert reply.status == 200 and reply.content_type == "application/json"
    answer = reply.json()
    assert set(answer) == {"results"}
    [result] = answer["results"]
    assert set(result) == {"matches"}
    assert result["matches"] == [
        {
            "collection": COLLECTION,
            "type": "pdq",
            "hash": base,
            "distance": 3,
            "submitters": ["acme"],
            "labels": ["a", "b"],
            "first_index": index,
            "opinions": {"positive": 0, "negative": 0},
        }
    ]


async def test_exact_types_match_exactly_and_ignore_max_distance(hub: Hub) -> None:
    m, s = md5("exact"), sha256("exact")
    await hub.submit("beta", batch_doc("beta", [item("md5", m, ["x"]), item("sha256", s, ["y"])]))
    results = await hub.matches([("md5", m), ("sha256", s)], max_distance=63)
    assert [(r[0]["type"], r[0]["hash"], r[0]["distance"], r[0]["labels"]) for r in results] == [
        ("md5", m, 0, ["x"]),
        ("sha256", s, 0, ["y"]),
    ]
    near = await hub.matches([("md5", flip(m, 1)), ("sha256", flip(s, 1))], max_distance=63)
    assert near == [[], []]
    # A sha256 is not a pdq even though both are 64 hex digits.
    assert await hub.matches([("pdq", s)], max_distance=0) == [[]]
    # Upper-case queries are normalised.
    [[match]] = await hub.matches([("md5", m.upper())])
    assert match["hash"] == m


async def test_matches_are_sorted_by_distance(hub: Hub) -> None:
    base = pdq(202)
    listed = {flip(base, 9, offset=100): 9, base: 0, flip(base, 2, offset=50): 2, flip(base, 20): 20}
    await hub.submit("acme", batch_doc("acme", [item("pdq", h) for h in listed]))
    [matches] = await hub.matches([("pdq", base)])
    assert [(m["hash"], m["distance"]) for m in matches] == sorted(listed.items(), key=lambda kv: kv[1])


async def test_one_result_per_query_in_order(hub: Hub) -> None:
    h1, h2, m = pdq(203), pdq(204), md5(203)
    await hub.submit("acme", batch_doc("acme", [item("pdq", h1, ["one"]), item("pdq", h2, ["two"])]))
    await hub.submit("beta", batch_doc("beta", [item("md5", m, ["three"])]))
    queries = [
        ("pdq", pdq(999)),
        ("pdq", h2),
        ("md5", m),
        ("md5", md5(999)),
        ("pdq", flip(h1, 4)),
        ("pdq", h2),
    ]
    results = await hub.matches(queries)
    assert len(results) == len(queries)
    assert [[x["labels"] for x in r] for r in results] == [
        [],
        [["two"]],
        [["three"]],
        [],
        [["one"]],
        [["two"]],
    ]
    assert await hub.matches([]) == []


async def test_concurrent_lookups_each_get_their_own_answer_or_refusal(hub: Hub) -> None:
    """Lookups arriving together are answered in batches; one's refusal is never another's."""
    listed = [pdq(230 + n) for n in range(6)]
    await hub.submit("acme", batch_doc("acme", [item("pdq", h, [f"n{n}"]) for n, h in enumerate(listed)]))
    stranger = SignerKey.generate("stranger")
    asks = [
        hub.lookup([("pdq", flip(h, n))], who) for n, h in enumerate(listed) for who in ("reader", "acme")
    ]
    asks += [
        hub.lookup([("pdq", listed[0])], stranger),
        hub.lookup([("pdq", listed[0])], "reader", max_distance=999),
        hub.lookup([("pdq", listed[0])], "reader", collections=["nowhere"]),
    ]
    replies = await asyncio.gather(*asks)
    for n in range(6):
        for reply in replies[2 * n : 2 * n + 2]:
            assert reply.status == 200, reply.text
            [[match]] = [r["matches"] for r in reply.json()["results"]]
            assert (match["hash"], match["distance"], match["labels"]) == (listed[n], n, [f"n{n}"])
    refused = replies[12:]
    assert [r.status for r in refused] == [401, 400, 404]
    assert [r.json()["type"].rsplit(":", 1)[-1] for r in refused] == [
        "bad-request-signature",
        "invalid-max-distance",
        "unknown-collection",
    ]


async def test_large_lookups_are_answered_one_at_a_time_alongside_small_ones(hub: Hub) -> None:
    """Bodies over the batching size take their own queue; every query still gets its own result."""
    listed = [pdq(260 + n) for n in range(3)]
    await hub.submit("acme", batch_doc("acme", [item("pdq", h, [f"n{n}"]) for n, h in enumerate(listed)]))
    large = [("pdq", flip(listed[n % 3], n % 5)) for n in range(900)]
    assert (
        len(json.dumps({"queries": [{"type": t, "hash": h} for t, h in large]}))
        > hub_routes.BATCHED_LOOKUP_BYTES
    )
    replies = await asyncio.gather(
        hub.lookup(large),
        hub.lookup(large[1:]),
        hub.lookup([("pdq", listed[2])]),
        hub.lookup([("pdq", pdq(999))]),
    )
    assert [r.status for r in replies] == [200] * 4, [r.text for r in replies]
    for reply, asked in zip(replies[:2], (large, large[1:]), strict=True):
        results = reply.json()["results"]
        assert len(results) == len(asked)
        for (_, query), result in zip(asked, results, strict=True):
            [match] = result["matches"]
            assert match["distance"] == bin(int(query, 16) ^ int(match["hash"], 16)).count("1")
            assert match["hash"] in listed
    assert [m["hash"] for m in replies[2].json()["results"][0]["matches"]] == [listed[2]]
    assert replies[3].json()["results"] == [{"matches": []}]


async def test_lookup_collections_default_to_every_readable_one(hub: Hub) -> None:
    acme, reader = hub.members["acme"], hub.members["reader"]
    add_collection(
        hub.data,
        "other",
        [Grant(acme.verifier, frozenset({"read", "write"})), Grant(reader.verifier, frozenset({"read"}))],
    )
    add_collection(hub.data, "secret", [Grant(acme.verifier, frozenset({"read", "write"}))])
    shared = pdq(205)
    for collection in ("main", "other", "secret"):
        doc = batch_doc("acme", [item("pdq", shared, [collection])], collection=collection)
        await hub.submit("acme", doc, collection)

    def seen(results: list[list[dict[str, Any]]]) -> list[tuple[str, list[str]]]:
        return [(m["collection"], m["labels"]) for m in results[0]]

    assert seen(await hub.matches([("pdq", shared)], "reader")) == [("main", ["main"]), ("other", ["other"])]
    assert seen(await hub.matches([("pdq", shared)], "acme")) == [
        ("main", ["main"]),
        ("other", ["other"]),
        ("secret", ["secret"]),
    ]
    assert [c for c, _ in seen(await hub.matches([("pdq", shared)], "hub"))] == ["main", "other", "secret"]
    assert seen(await hub.matches([("pdq", shared)], "reader", collections=["other"])) == [
        ("other", ["other"])
    ]
    assert seen(await hub.matches([("pdq", shared)], "acme", collections=["secret", "main"])) == [
        ("main", ["main"]),
        ("secret", ["secret"]),
    ]
    # beta belongs to main only.
    assert seen(await hub.matches([("pdq", shared)], "beta")) == [("main", ["main"])]


async def test_labels_are_the_union_of_submitters(hub: Hub) -> None:
    h = pdq(206)
    first = await hub.submit("acme", batch_doc("acme", [item("pdq", h, ["a", "b"])]))
    await hub.submit("beta", batch_doc("beta", [item("pdq", h, ["b", "c"])]))
    [[match]] = await hub.matches([("pdq", h)])
    assert match["submitters"] == ["acme", "beta"]
    assert match["labels"] == ["a", "b", "c"]
    assert match["first_index"] == first


async def test_re_adding_replaces_that_submitters_labels(hub: Hub) -> None:
    h = pdq(207)
    first = await hub.submit("acme", batch_doc("acme", [item("pdq", h, ["x", "y"])]))
    await hub.submit("beta", batch_doc("beta", [item("pdq", h, ["b"])]))
    await hub.submit("acme", batch_doc("acme", [item("pdq", h, ["z"])]))
    [[match]] = await hub.matches([("pdq", h)])
    assert match["labels"] == ["b", "z"]
    assert match["submitters"] == ["acme", "beta"]
    assert match["first_index"] == first
    await hub.submit("acme", batch_doc("acme", [item("pdq", h)]))
    [[match]] = await hub.matches([("pdq", h)])
    assert match["labels"] == ["b"]


async def test_a_hash_stays_listed_while_another_member_lists_it(hub: Hub) -> None:
    h = pdq(208)
    await hub.submit("acme", batch_doc("acme", [item("pdq", h, ["acme-label"])]))
    beta_index = await hub.submit("beta", batch_doc("beta", [item("pdq", h, ["beta-label"])]))
    await hub.submit("acme", batch_doc("acme", remove=[("pdq", h)]))
    [[match]] = await hub.matches([("pdq", flip(h, 2))])
    assert match["submitters"] == ["beta"]
    assert match["labels"] == ["beta-label"]
    assert match["first_index"] == beta_index
    await hub.submit("beta", batch_doc("beta", remove=[("pdq", h)]))
    assert await hub.matches([("pdq", h), ("pdq", flip(h, 2))], max_distance=63) == [[], []]
    assert await hub.matches([("pdq", h)], "hub", max_distance=63) == [[]]


async def test_a_removed_hash_is_never_returned(hub: Hub) -> None:
    keep, gone, m = pdq(209), flip(pdq(209), 6), md5(209)
    first = await hub.submit(
        "acme", batch_doc("acme", [item("pdq", keep), item("pdq", gone), item("md5", m)])
    )
    await hub.submit("acme", batch_doc("acme", remove=[("pdq", gone), ("md5", m)]))
    [near, exact] = await hub.matches([("pdq", gone), ("md5", m)], max_distance=63)
    assert [x["hash"] for x in near] == [keep]
    assert exact == []
    # Listed again by a member, it is back, with the new first index.
    again = await hub.submit("beta", batch_doc("beta", [item("pdq", gone, ["back"])]))
    [matches] = await hub.matches([("pdq", gone)])
    assert [(x["hash"], x["distance"], x["first_index"], x["labels"]) for x in matches] == [
        (gone, 0, again, ["back"]),
        (keep, 6, first, []),
    ]


async def test_opinions_count_each_members_latest_verdict(hub: Hub) -> None:
    h = pdq(210)
    await hub.submit("acme", batch_doc("acme", [item("pdq", h)]))

    async def counts() -> dict[str, int]:
        [[match]] = await hub.matches([("pdq", h)])
        return dict(match["opinions"])

    assert await counts() == {"positive": 0, "negative": 0}
    await hub.submit("reader", opinion_doc("reader", [("pdq", h, "positive")]))
    await hub.submit("beta", opinion_doc("beta", [("pdq", h, "negative")]))
    await hub.submit("acme", opinion_doc("acme", [("pdq", h, "positive")]))
    assert await counts() == {"positive": 2, "negative": 1}
    await hub.submit("reader", opinion_doc("reader", [("pdq", h, "positive")]))  # repeated: counts once
    assert await counts() == {"positive": 2, "negative": 1}
    await hub.submit("reader", opinion_doc("reader", [("pdq", h, "negative")]))  # latest verdict wins
    assert await counts() == {"positive": 1, "negative": 2}
    await hub.submit("reader", opinion_doc("reader", [("pdq", h, "withdrawn")]))
    assert await counts() == {"positive": 1, "negative": 1}
    await hub.submit("beta", opinion_doc("beta", [("pdq", h, "withdrawn")]))
    await hub.submit("acme", opinion_doc("acme", [("pdq", h, "withdrawn")]))
    assert await counts() == {"positive": 0, "negative": 0}


async def test_client_opinions_and_removals(hub: Hub) -> None:
    h = pdq(211)
    acme, reader = hub.clients["acme"], hub.clients["reader"]
    await acme.submit(COLLECTION, [Addition("pdq", h, ("t",))])
    await reader.give_opinions(COLLECTION, [OpinionItem("pdq", h, "negative", "false positive")])
    [[match]] = await reader.lookup([("pdq", h)])
    assert match["opinions"] == {"positive": 0, "negative": 1}
    await acme.submit(COLLECTION, removals=[Removal("pdq", h)])
    assert await reader.lookup([("pdq", h)]) == [[]]
