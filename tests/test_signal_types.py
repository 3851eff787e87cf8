"""The signal types of design §4.1 over HTTP, written from the protocol alone.

Every request here is raw JSON on the wire, signed by the test's own helpers;
expected answers come from naive implementations in this file (a video's
identity and match percentages, squared Euclidean distance), not from the
hub's code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from helpers import Hub, assert_problem, batch_doc, envelope, flip, open_hub, opinion_doc

from federation.client import HubClient


@pytest.fixture
async def hub(federation: Any, hub_server: TestServer, clients: dict[str, HubClient]) -> AsyncIterator[Hub]:
    async with aiohttp.ClientSession() as session:
        yield await open_hub(federation, hub_server, clients, session)


# ---- naive reference implementations -----------------------------------------


def naive_identity(frames: list[dict[str, Any]]) -> str:
    good = sorted({frame["pdq"].lower() for frame in frames if frame["quality"] >= 50})
    return hashlib.sha256("".join(pdq + "\n" for pdq in good).encode()).hexdigest()


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def naive_video_match(
    query: list[str], listed: list[str], max_distance: int
) -> tuple[float, float, int] | None:
    """(query %, compared %, distance) of python-threatexchange's vPDQ rule, or None if no frame matches."""
    q, c = sorted(set(query)), sorted(set(listed))
    nearest = {a: min(hamming(a, b) for b in c) for a in q}
    matched_q = [a for a in q if nearest[a] <= max_distance]
    matched_c = [b for b in c if any(hamming(a, b) <= max_distance for a in q)]
    if not matched_q:
        return None
    return 100 * len(matched_q) / len(q), 100 * len(matched_c) / len(c), max(nearest[a] for a in matched_q)


def squared(a: bytes, b: bytes) -> int:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True))


def frames_of(pdqs: list[str], quality: int = 90) -> list[dict[str, Any]]:
    return [{"pdq": pdq, "quality": quality, "time": float(n)} for n, pdq in enumerate(pdqs)]


def rand_pdq(rng: random.Random) -> str:
    return rng.randbytes(32).hex()


async def post_batch(hub: Hub, add: list[dict[str, Any]], remove: Sequence[tuple[str, str]] = ()) -> Any:
    return await hub.post(envelope(hub.members["acme"], batch_doc("acme", add, remove)), "acme")


async def lookup(hub: Hub, body: dict[str, Any]) -> Any:
    return await hub.call("POST", "/v1/lookup", "reader", body=json.dumps(body).encode())


async def results(hub: Hub, body: dict[str, Any]) -> list[list[dict[str, Any]]]:
    reply = await lookup(hub, body)
    assert reply.status == 200, reply.text
    return [result["matches"] for result in reply.json()["results"]]


# ---- sha1 ----------------------------------------------------------------------


async def test_sha1_matches_identical_hashes_only(hub: Hub) -> None:
    digest = hashlib.sha1(b"a listed file").hexdigest()
    reply = await post_batch(hub, [{"type": "sha1", "hash": digest.upper(), "labels": ["x"]}])
    assert reply.status == 201, reply.text
    found = await results(
        hub,
        {"queries": [{"type": "sha1", "hash": digest}, {"type": "sha1", "hash": flip(digest, 1)}]},
    )
    assert [[(m["type"], m["hash"], m["distance"], m["labels"]) for m in r] for r in found] == [
        [("sha1", digest, 0, ["x"])],
        [],
    ]
    assert_problem(
        await lookup(hub, {"queries": [{"type": "sha1", "hash": digest[:-1]}]}), 400, "invalid-hash"
    )
    problem = assert_problem(
        await lookup(hub, {"queries": [{"type": "sha1", "hash": digest, "max_distance": 1}]}),
        400,
        "invalid-max-distance",
    )
    assert "sha1" in problem["detail"]


# ---- photodna -------------------------------------------------------------------


async def test_photodna_accepts_its_three_forms_and_answers_hex(hub: Hub) -> None:
    rng = random.Random(7)
    vectors = [rng.randbytes(144) for _ in range(3)]
    forms = [
        vectors[0].hex().upper(),
        ",".join(str(b) for b in vectors[1]),
        base64.b64encode(vectors[2]).decode(),
    ]
    reply = await post_batch(hub, [{"type": "photodna", "hash": form} for form in forms])
    assert reply.status == 201, reply.text
    # Each listed vector is found from each form of itself, answered in hex at distance 0.
    for vector in vectors:
        for form in (vector.hex(), ",".join(map(str, vector)), base64.b64encode(vector).decode()):
            (matches,) = await results(
                hub, {"queries": [{"type": "photodna", "hash": form, "max_distance": 0}]}
            )
            assert [(m["hash"], m["distance"]) for m in matches] == [(vector.hex(), 0)]


async def test_photodna_distance_default_and_per_query_maximum(hub: Hub) -> None:
    info = (await hub.call("GET", "/v1/hub")).json()
    default = info["defaults"]["photodna"]
    rng = random.Random(11)
    listed = rng.randbytes(144)
    near = bytearray(listed)
    for position in range(0, 144, 12):  # 12 bytes changed by 40: squared distance 19,200
        near[position] = (near[position] + 40) % 256
    far = bytearray(listed)
    for position in range(0, 144, 4):  # 36 bytes changed by 40: 57,600
        far[position] = (far[position] + 40) % 256
    assert (await post_batch(hub, [{"type": "photodna", "hash": listed.hex()}])).status == 201
    near_d, far_d = squared(listed, bytes(near)), squared(listed, bytes(far))
    assert near_d <= default < far_d
    queries = [
        {"type": "photodna", "hash": bytes(near).hex()},
        {"type": "photodna", "hash": bytes(far).hex()},
    ]
    # The request's top-level max_distance never applies to photodna.
    found = await results(hub, {"queries": queries, "max_distance": 0})
    assert [[m["distance"] for m in r] for r in found] == [[near_d], []]
    queries[1]["max_distance"] = far_d
    queries[0]["max_distance"] = near_d - 1
    found = await results(hub, {"queries": queries})
    assert [[m["distance"] for m in r] for r in found] == [[], [far_d]]
    for bad in (-1, 9_363_601, 1.5, "100", True, None):
        problem = assert_problem(
            await lookup(hub, {"queries": [{"type": "photodna", "hash": listed.hex(), "max_distance": bad}]}),
            400,
            "invalid-max-distance",
        )
        assert "queries[0]" in problem["detail"]
    found = await results(
        hub,
        {
            "queries": [
                {"type": "photodna", "hash": bytes(255 - b for b in listed).hex(), "max_distance": 9_363_600}
            ]
        },
    )
    assert [m["hash"] for m in found[0]] == [listed.hex()]


async def test_malformed_photodna_is_refused_naming_the_item(hub: Hub) -> None:
    good = bytes(range(144))
    cases = [
        good.hex()[:-2],
        ",".join(map(str, good[:-1])),
        ",".join(map(str, good[:-1])) + ",256",
        base64.b64encode(good[:-3]).decode(),
        "zz" * 144,
    ]
    for text in cases:
        problem = assert_problem(
            await post_batch(
                hub, [{"type": "photodna", "hash": good.hex()}, {"type": "photodna", "hash": text}]
            ),
            400,
            "invalid-payload",
        )
        assert "add[1]" in problem["detail"] and "photodna" in problem["detail"], problem
        problem = assert_problem(await lookup(hub, {"queries": [{"type": "photodna", "hash": text}]}), 400)
        assert "queries[0]" in problem["detail"]
    # The same hash in two forms in one batch is the same hash twice.
    twice = [{"type": "photodna", "hash": good.hex()}, {"type": "photodna", "hash": ",".join(map(str, good))}]
    problem = assert_problem(await post_batch(hub, twice), 400, "invalid-payload")
    assert "more than once" in problem["detail"]
    assert await hub.size() == 2  # the two membership entries: nothing was appended


# ---- vpdq --------------------------------------------------------------------------


async def test_video_identity_and_match_percentages_follow_the_protocol(hub: Hub) -> None:
    rng = random.Random(3)
    video_a = [rand_pdq(rng) for _ in range(10)]
    video_b = video_a[:4] + [rand_pdq(rng) for _ in range(4)]
    # Frames out of order, duplicated and low quality do not change the identity.
    frames_a = frames_of(video_a[::-1]) + frames_of(video_a[:3]) + [{"pdq": rand_pdq(rng), "quality": 10}]
    frames_b = frames_of(video_b)
    add = [
        {"type": "vpdq", "hash": naive_identity(frames_a), "labels": ["a"], "frames": frames_a},
        {"type": "vpdq", "hash": naive_identity(frames_b).upper(), "labels": ["b"], "frames": frames_b},
    ]
    reply = await post_batch(hub, add)
    assert reply.status == 201, reply.text
    # The query: 6 frames of a (2 of them a few bits off), 2 unrelated.
    query = [video_a[0], video_a[1], flip(video_a[2], 5), flip(video_a[5], 9), video_a[6], video_a[7]]
    query += [rand_pdq(rng), rand_pdq(rng)]
    for max_distance, min_query, min_compared in (
        (31, 0, 0),
        (31, 70, 0),
        (4, 0, 0),
        (31, 0, 60),
        (0, 50, 0),
    ):
        body = {
            "queries": [
                {
                    "type": "vpdq",
                    "frames": frames_of(query),
                    "max_distance": max_distance,
                    "min_query_match_percent": min_query,
                    "min_compared_match_percent": min_compared,
                }
            ]
        }
        (matches,) = await results(hub, body)
        expected = []
        for listed in (video_a, video_b):
            naive = naive_video_match(query, listed, max_distance)
            if naive and naive[0] >= min_query and naive[1] >= min_compared:
                expected.append((naive[2], naive_identity(frames_of(listed)), naive[0], naive[1]))
        expected.sort(key=lambda e: (e[0], e[1]))
        got = [
            (m["distance"], m["hash"], m["query_match_percent"], m["compared_match_percent"]) for m in matches
        ]
        assert [g[:2] for g in got] == [e[:2] for e in expected], (max_distance, min_query, min_compared)
        for g, e in zip(got, expected, strict=True):
            assert abs(g[2] - e[2]) < 1e-9 and abs(g[3] - e[3]) < 1e-9
        assert all(m["type"] == "vpdq" for m in matches)


async def test_video_defaults_thresholds_and_the_request_distance(hub: Hub) -> None:
    rng = random.Random(5)
    video = [rand_pdq(rng) for _ in range(10)]
    frames = frames_of(video)
    assert (
        await post_batch(hub, [{"type": "vpdq", "hash": naive_identity(frames), "frames": frames}])
    ).status == 201
    # 7 of 10 query frames match: under the default 80% query threshold, over 70%.
    query = {"type": "vpdq", "frames": frames_of(video[:7] + [rand_pdq(rng) for _ in range(3)])}
    assert (await results(hub, {"queries": [query]})) == [[]]
    (matches,) = await results(hub, {"queries": [{**query, "min_query_match_percent": 70}]})
    assert [(m["query_match_percent"], m["compared_match_percent"]) for m in matches] == [(70.0, 70.0)]
    # The request's max_distance applies to video frames: frames 3 bits off are out at 2.
    shifted = {"type": "vpdq", "frames": frames_of([flip(pdq, 3) for pdq in video])}
    assert len((await results(hub, {"queries": [shifted]}))[0]) == 1
    assert (await results(hub, {"queries": [shifted], "max_distance": 2})) == [[]]
    assert len((await results(hub, {"queries": [{**shifted, "max_distance": 3}], "max_distance": 2}))[0]) == 1


async def test_video_refusals_name_the_item_and_the_field(hub: Hub) -> None:
    rng = random.Random(9)
    frames = frames_of([rand_pdq(rng) for _ in range(3)])
    identity = naive_identity(frames)
    too_many = frames_of([rand_pdq(rng) for _ in range(10_001)])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"type": "vpdq", "hash": flip(identity, 1), "frames": frames}, "identity"),
        ({"type": "vpdq", "hash": identity}, "frames"),
        ({"type": "vpdq", "hash": identity, "frames": []}, "frames"),
        (
            {"type": "vpdq", "hash": identity, "frames": frames_of([f["pdq"] for f in frames], quality=49)},
            "quality",
        ),
        ({"type": "vpdq", "hash": naive_identity(too_many), "frames": too_many}, "10,000"),
        (
            {"type": "vpdq", "hash": identity, "frames": [*frames, {"pdq": "ab" * 31, "quality": 90}]},
            "frames[3].pdq",
        ),
        ({"type": "vpdq", "hash": identity, "frames": [*frames, {"pdq": "ab" * 32}]}, "frames[3].quality"),
        ({"type": "vpdq", "hash": identity, "frames": [{**frames[0], "quality": 101}]}, "frames[0].quality"),
        ({"type": "vpdq", "hash": identity, "frames": [{**frames[0], "time": -1}]}, "frames[0].time"),
        ({"type": "vpdq", "hash": identity, "frames": [{**frames[0], "speed": 2}]}, "frames[0]"),
        ({"type": "vpdq", "hash": identity, "frames": frames, "quality": 90}, "quality"),
        ({"type": "pdq", "hash": frames[0]["pdq"], "frames": frames}, "frames"),
    ]
    for add, needle in cases:
        problem = assert_problem(
            await post_batch(hub, [{"type": "md5", "hash": "0" * 32}, add]), 400, "invalid-payload"
        )
        assert "add[1]" in problem["detail"] and needle in problem["detail"], (needle, problem["detail"])
    for query, kind, needle in (
        ({"type": "vpdq", "hash": identity}, "invalid-lookup", "frames"),
        ({"type": "vpdq", "hash": flip(identity, 2), "frames": frames}, "invalid-hash", "identity"),
        ({"type": "vpdq", "frames": frames, "min_query_match_percent": 101}, "invalid-lookup", "min_query"),
        (
            {"type": "vpdq", "frames": frames, "min_compared_match_percent": "5"},
            "invalid-lookup",
            "min_compared",
        ),
        ({"type": "vpdq", "frames": frames, "max_distance": 64}, "invalid-max-distance", "max_distance"),
        ({"type": "vpdq", "frames": frames_of([f["pdq"] for f in frames], 20)}, "invalid-hash", "quality"),
        ({"type": "pdq", "hash": frames[0]["pdq"], "min_query_match_percent": 5}, "invalid-lookup", "pdq"),
    ):
        problem = assert_problem(
            await lookup(hub, {"queries": [{"type": "md5", "hash": "0" * 32}, query]}), 400, kind
        )
        assert "queries[1]" in problem["detail"] and needle in problem["detail"], (needle, problem["detail"])
    assert await hub.size() == 2


async def test_a_video_is_removed_and_judged_by_its_identity_alone(hub: Hub) -> None:
    rng = random.Random(13)
    frames = frames_of([rand_pdq(rng) for _ in range(5)])
    identity = naive_identity(frames)
    assert (await post_batch(hub, [{"type": "vpdq", "hash": identity, "frames": frames}])).status == 201
    reply = await hub.post(
        envelope(hub.members["reader"], opinion_doc("reader", [("vpdq", identity, "negative")])), "reader"
    )
    assert reply.status == 201, reply.text
    query = {"queries": [{"type": "vpdq", "frames": frames}]}
    (matches,) = await results(hub, query)
    assert [(m["hash"], m["opinions"]) for m in matches] == [(identity, {"positive": 0, "negative": 1})]
    assert (await post_batch(hub, [], [("vpdq", identity)])).status == 201
    assert (await results(hub, query)) == [[]]
    # Listed again (frames needed again), it matches again.
    assert (await post_batch(hub, [{"type": "vpdq", "hash": identity, "frames": frames}])).status == 201
    assert [m["hash"] for m in (await results(hub, query))[0]] == [identity]


async def test_every_type_in_one_lookup_is_answered_in_order(hub: Hub) -> None:
    rng = random.Random(17)
    frames = frames_of([rand_pdq(rng) for _ in range(2)])
    items = [
        {"type": "pdq", "hash": rand_pdq(rng)},
        {"type": "md5", "hash": rng.randbytes(16).hex()},
        {"type": "sha1", "hash": rng.randbytes(20).hex()},
        {"type": "sha256", "hash": rng.randbytes(32).hex()},
        {"type": "photodna", "hash": rng.randbytes(144).hex()},
        {"type": "vpdq", "hash": naive_identity(frames), "frames": frames},
    ]
    assert (await post_batch(hub, items)).status == 201
    queries = [{k: v for k, v in it.items() if k != "hash" or it["type"] != "vpdq"} for it in items]
    found = await results(hub, {"queries": queries[::-1]})
    assert [[(m["type"], m["hash"], m["distance"]) for m in r] for r in found] == [
        [(it["type"], it["hash"], 0)] for it in items[::-1]
    ]
    info = (await hub.call("GET", "/v1/hub")).json()
    assert info["signal_types"] == ["pdq", "md5", "sha256", "sha1", "photodna", "vpdq"]
