"""A collection holding all six signal types mirrors and peers exactly: the copies answer what the origin answers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

from federation.envelope import Addition, Removal
from federation.keys import SignerKey
from federation.payloads import query_json
from federation.signals import SIGNAL_TYPES
from tests.helpers import random_addition
from tests.sync_helpers import COLLECTION, READ, READ_WRITE, LiveHub, key_file, make_hub, run_cli
from tests.test_sync_peering import peer


def _near(item: Addition, rng: random.Random) -> dict[str, Any]:
    """A query a little off the listed item (exact types: the item itself)."""
    query = query_json(item)
    if item.signal == "pdq":
        query["hash"] = f"{int(item.hash, 16) ^ (1 << rng.randrange(256)):064x}"
    elif item.signal == "photodna":
        raw = bytearray(bytes.fromhex(item.hash))
        raw[rng.randrange(144)] ^= 0x0F
        query["hash"] = raw.hex()
        query["max_distance"] = 60_000
    elif item.signal == "vpdq":
        query.pop("hash")
        query["min_query_match_percent"] = 50
    return query


def _without_hub(results: list[list[dict[str, Any]]]) -> list[list[dict[str, Any]]]:
    return [[{k: v for k, v in m.items() if k != "hub"} for m in ms] for ms in results]


async def _history(hub: LiveHub, rng: random.Random) -> list[Addition]:
    items = [random_addition(kind, rng, ("seen",)) for kind in SIGNAL_TYPES for _ in range(3)]
    async with hub.client("acme") as client:
        await client.submit(COLLECTION, items)
        await client.submit(COLLECTION, removals=[Removal(i.signal, i.hash) for i in items[2::3]])
        await client.submit(COLLECTION, items[2::3][:2])  # two of them (pdq, md5) listed again
    return items


async def test_a_member_mirror_of_every_type_answers_as_the_hub(tmp_path: Path) -> None:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "reader": READ})
    await hub.serve()
    try:
        rng = random.Random(5)
        items = await _history(hub, rng)
        directory = tmp_path / "mirror"
        reader = key_file(tmp_path, hub.members["reader"])
        code, _, err = await run_cli(
            "mirror",
            "--hub",
            hub.url,
            "--key",
            str(reader),
            "--collection",
            COLLECTION,
            "--pin",
            hub.key,
            str(directory),
        )
        assert code == 0, err
        # The CLI reads hashes of every type from a file, and a video from its vPDQ JSON file.
        lines = [f"{i.signal}:{i.hash}" for i in items if i.signal != "vpdq"]
        (tmp_path / "hashes.txt").write_text("\n".join(lines) + "\n")
        videos = [i for i in items if i.signal == "vpdq"]
        files = []
        for number, video in enumerate(videos):
            path = tmp_path / f"video-{number}.json"
            assert video.frames is not None
            path.write_text(json.dumps([f"{f.pdq},{f.quality},{f.time or 0}" for f in video.frames]))
            files += ["--file", str(path)]
        code, out, err = await run_cli(
            "lookup", "--mirror", str(directory), "--json", "--file", str(tmp_path / "hashes.txt"), *files
        )
        assert code == 0, err
        answered = [entry["matches"] for entry in json.loads(out)]
        asked = [i for i in items if i.signal != "vpdq"] + videos
        async with hub.client("reader") as client:
            expected = await client.lookup([query_json(i) for i in asked])
        assert _without_hub(answered) == expected
        assert sum(1 for ms in expected if ms) == len(items) - 4  # 6 removed, 2 listed again
        assert {m["type"] for ms in expected for m in ms} == set(SIGNAL_TYPES)
        assert all(m["hub"] == "hub-a" for ms in answered for m in ms)
    finally:
        await hub.stop()


async def test_a_peering_hub_of_every_type_answers_as_its_origin(tmp_path: Path, database: str) -> None:
    origin = make_hub(tmp_path, "origin", {"acme": READ_WRITE, "reader": READ})
    local = make_hub(tmp_path, "local", {"reader": READ}, database)
    local.members["reader"] = origin.members["reader"]
    local.grant(origin.members["reader"], READ)
    await origin.serve()
    await local.serve([peer(tmp_path, origin, SignerKey.generate("local-peer"))])
    try:
        rng = random.Random(9)
        items = await _history(origin, rng)
        queries = [_near(i, rng) for i in items]
        async with origin.client("reader") as client:
            size = (await client.checkpoint(COLLECTION)).splitlines()[1]
            expected = await client.lookup(queries)
        deadline = time.monotonic() + 20
        while True:
            (entry,) = (await local.get("/v1/peers"))["peers"]
            source = entry["sources"][0]
            if source["state"] == "ok" and str(source["log_size"]) == size:
                break
            assert time.monotonic() < deadline, source
            await asyncio.sleep(0.05)
        async with local.client("reader") as client:
            answered = await client.lookup(queries, collections=[f"origin:{COLLECTION}"])
        assert _without_hub(answered) == expected
        assert {m["type"] for ms in expected for m in ms} == set(SIGNAL_TYPES)
        video = next(m for ms in answered for m in ms if m["type"] == "vpdq")
        assert video["hub"] == "origin" and 50 <= video["query_match_percent"] <= 100
    finally:
        await local.stop()
        await origin.stop()
