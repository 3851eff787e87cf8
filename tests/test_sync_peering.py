"""Hub peering: hubs mirror each other in the background, answer lookups across all their
collections, shrug off broken peers, and catch a peer that forks."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation.client import HubClient, HubError, next_seq
from federation.config import ConfigError, HubConfig, PeerConfig
from federation.envelope import BATCH_TYPE, Addition, Header, batch_payload, sign_envelope, utc_now
from federation.keys import SignerKey
from tests.sync_helpers import (
    COLLECTION,
    FEDERATION,
    READ,
    READ_WRITE,
    LiveHub,
    Proxy,
    clone_hub,
    key_file,
    make_hub,
    normalise,
    pdq,
    run_cli,
)

H = [pdq(2000 + seed) for seed in range(12)]


def peer(
    root: Path,
    hub: LiveHub,
    member: SignerKey,
    collections: tuple[str, ...] = (COLLECTION,),
    relay: tuple[LiveHub, ...] = (),
    url: str | None = None,
) -> PeerConfig:
    """``hub`` as a peer, reached with ``member``'s key (granted read there)."""
    hub.grant(member, READ)
    return PeerConfig(
        url=url or hub.url,
        key=hub.key,
        member_key=str(key_file(root, member)),
        collections=collections,
        relay_keys=tuple(h.key for h in relay),
        interval=0.05,
        timeout=2.0,
    )


async def eventually(check: Callable[[], Awaitable[bool]], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_three_hubs_in_a_chain_and_two_mirrors_converge(tmp_path: Path) -> None:
    a = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "reader-a": READ})
    b = make_hub(tmp_path, "hub-b", {"beta": READ_WRITE})
    c = make_hub(tmp_path, "hub-c", {"gamma": READ_WRITE, "reader-c": READ})
    b_key, a_key, c_key = (SignerKey.generate(f"{name}-peer") for name in ("hub-b", "hub-a", "hub-c"))
    # A <-> B <-> C: A gets C's collection relayed by B, and C gets A's.
    peers_a = [peer(tmp_path, b, a_key, (COLLECTION, "hub-c:main"), relay=(c,))]
    peers_b = [peer(tmp_path, a, b_key), peer(tmp_path, c, b_key)]
    peers_c = [peer(tmp_path, b, c_key, (COLLECTION, "hub-a:main"), relay=(a,))]
    await a.serve(peers_a)
    await b.serve(peers_b)
    await c.serve(peers_c)
    hubs = {"hub-a": (a, "acme"), "hub-b": (b, "beta"), "hub-c": (c, "gamma")}
    try:
        await a.submit("acme", H[0:4], labels=["a"])
        await b.submit("beta", [H[2], H[4]], labels=["b"])
        await c.submit("gamma", H[5:8], labels=["c"])
        await a.submit("acme", remove=[H[1]])
        await c.submit("gamma", remove=[H[6]])
        await a.opinion("reader-a", [H[0]], "negative")
        await b.opinion("beta", [H[4]], "positive")
        await c.opinion("reader-c", [H[5]], "positive")
        await c.opinion("reader-c", [H[5]], "withdrawn")
        queries = [*H[:9], H[3][:-2] + "00"]

        async def answers() -> dict[str, Any]:
            return {
                name: normalise(name, await hub.lookup(member, queries))
                for name, (hub, member) in hubs.items()
            }

        async def converged() -> bool:
            found = await answers()
            return (
                found["hub-a"] == found["hub-b"] == found["hub-c"]
                and len({m[0] for ms in found["hub-a"] for m in ms}) == 3
            )

        await eventually(converged)
        final = (await answers())["hub-a"]
        assert [m[:2] for m in final[2]] == [("hub-a", COLLECTION), ("hub-b", COLLECTION)]
        assert final[1] == [] and final[6] == [] and final[8] == []
        assert final[0][0][-1] == 1 and final[5][0][-2:] == (0, 0)

        # Matches from peers name their hub; own matches keep the v1 shape.
        at_b = await b.lookup("beta", [H[2]])
        assert sorted(m.get("hub", "-") for m in at_b[0]) == ["-", "hub-a"]

        # Two member mirrors of A's collection: one from A, one relayed twice (A -> B -> C).
        direct, relayed = tmp_path / "mirror-direct", tmp_path / "mirror-relayed"
        for directory, hub, member, collection in (
            (direct, a, "reader-a", COLLECTION),
            (relayed, c, "reader-c", "hub-a:main"),
        ):
            code, _, err = await run_cli(
                "mirror", "--hub", hub.url, "--key", str(key_file(tmp_path, hub.members[member])),
                "--collection", collection, "--pin", a.key, str(directory),
            )  # fmt: skip
            assert code == 0, err
            code, out, err = await run_cli(
                "lookup", "--mirror", str(directory), "--type", "pdq", "--json", *queries
            )
            assert code == 0, err
            mirrored = normalise("?", [item["matches"] for item in json.loads(out)])
            assert mirrored == [[m for m in ms if m[0] == "hub-a"] for ms in final]
        assert (direct / "checkpoint.txt").read_text() == (relayed / "checkpoint.txt").read_text()

        # Every hub serves the latest checkpoint it verified of each source, signed by the origin.
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{a.url}/v1/collections/{COLLECTION}/checkpoint") as response:
                a_note = await response.text()
            async with session.get(f"{c.url}/v1/collections/hub-a:main/checkpoint") as response:
                assert await response.text() == a_note
        sources = {s["name"]: s for s in (await c.get("/v1/sources"))["sources"]}
        assert sorted(sources) == ["hub-a:main", "hub-b:main"]
        assert sources["hub-a:main"]["checkpoint"] == a_note and not sources["hub-a:main"]["forked"]

        status = (await b.get("/v1/peers"))["peers"]
        assert [p["hub"] for p in status] == ["hub-a", "hub-c"]
        for entry in status:
            (source,) = entry["sources"]
            assert source["state"] == "ok" and source["lag"] == 0, source
            assert source["checkpoint"]["size"] == source["log_size"] == source["source_size"]
    finally:
        for hub, _ in hubs.values():
            await hub.stop()


async def test_a_broken_peer_never_slows_lookups_and_sync_resumes(tmp_path: Path, database: str) -> None:
    origin = make_hub(tmp_path, "origin", {"acme": READ_WRITE})
    local = make_hub(tmp_path, "local", {"reader": READ}, database)
    await origin.serve()
    proxy = await Proxy(origin.url).start()
    await origin.submit("acme", H[:2])
    await local.serve([peer(tmp_path, origin, SignerKey.generate("local-peer"), url=proxy.url)])
    try:

        async def state() -> dict[str, Any]:
            (entry,) = (await local.get("/v1/peers"))["peers"]
            return dict(entry["sources"][0])

        async def synced(size: int) -> bool:
            current = await state()
            return current["state"] == "ok" and current["log_size"] == size

        await eventually(lambda: synced(4))
        await origin.submit("acme", H[2:4])
        for mode, error in (("down", "503"), ("slow", "timeout"), ("garbage", "")):
            proxy.mode = mode
            started = proxy.requests

            async def failing(expected: str = error, since: int = started) -> bool:
                current = await state()
                return (
                    proxy.requests > since
                    and current["state"] == "error"
                    and expected in (current["last_error"] or "")
                )

            await eventually(failing)
            for _ in range(5):  # lookups answer at once, from what was verified
                began = time.monotonic()
                matches = await local.lookup("reader", H[:4])
                assert time.monotonic() - began < 0.5
                assert [len(m) for m in matches] == [1, 1, 0, 0]
            assert (await state())["log_size"] == 4
        proxy.mode = "pass"
        await eventually(lambda: synced(5))
        assert [len(m) for m in await local.lookup("reader", H[:4])] == [1, 1, 1, 1]
        assert (await state())["last_error"]  # the last error stays visible after recovery
    finally:
        await local.stop()
        await proxy.close()
        await origin.stop()


async def test_a_peering_hub_catches_a_fork_and_keeps_what_it_verified(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, database: str
) -> None:
    caplog.set_level(logging.INFO, logger="hashfed.sync")
    origin = make_hub(tmp_path, "origin", {"acme": READ_WRITE})
    local = make_hub(tmp_path, "local", {"reader": READ}, database)
    forked = clone_hub(origin, tmp_path, "forked")
    await origin.serve()
    await forked.serve()
    proxy = await Proxy(origin.url).start()
    # Three entries verified (not a power of two): the forked log's own proof shows another prefix.
    await origin.submit("acme", H[:1])
    await origin.submit("acme", H[1:2])
    await forked.submit("acme", H[5:7])
    await forked.submit("acme", H[7:8])
    await forked.submit("acme", H[8:9])
    peer_key = SignerKey.generate("local-peer")
    forked.grant(peer_key, READ)
    await local.serve([peer(tmp_path, origin, peer_key, url=proxy.url)])
    try:

        async def source() -> dict[str, Any]:
            return dict((await local.get("/v1/peers"))["peers"][0]["sources"][0])

        await eventually(lambda: _is(source, "state", "ok"))
        before = await _metrics(local)
        assert before[("hashfed_peer_lag_entries", "origin:main")] == 0
        assert before[("hashfed_peer_last_verified_timestamp_seconds", "origin:main")] > time.time() - 60
        assert before[("hashfed_forks_detected_total", "origin:main")] == 0
        proxy.upstream = forked.url
        await eventually(lambda: _is(source, "state", "forked"))
        assert "FORK" in (await source())["last_error"]
        assert (await _metrics(local))[("hashfed_forks_detected_total", "origin:main")] == 1
        events = {record.__dict__.get("event"): record.__dict__ for record in caplog.records}
        assert events["peer-sync"]["source"] == "origin:main" and events["peer-sync"]["entries"] >= 1
        assert events["fork-detected"]["source"] == "origin:main"
        assert events["fork-detected"]["reason"] == "rollback"
        (listed,) = (await local.get("/v1/sources"))["sources"]
        assert listed["forked"] and listed["evidence"][0]["reason"] == "rollback"
        assert [len(m) for m in await local.lookup("reader", [*H[:2], *H[5:8]])] == [1, 1, 0, 0, 0]
        # A mirrored collection is written only by sync.
        header = Header(FEDERATION, COLLECTION, next_seq(), utc_now())
        batch = batch_payload(header, "local", (Addition("pdq", H[9]),))
        async with HubClient(local.url, local.signer, retries=0) as client:
            with pytest.raises(HubError) as refused:
                await client.post_envelope("origin:main", sign_envelope(local.signer, BATCH_TYPE, batch))
        assert refused.value.status == 409 and refused.value.kind.endswith("mirrored-collection")
    finally:
        await local.stop()
        await proxy.close()
        await forked.stop()
        await origin.stop()


async def _metrics(hub: LiveHub) -> dict[tuple[str, str], float]:
    """The hub's per-source metrics, read with Prometheus's own parser: (sample name, source) -> value."""
    text = await hub.get_text("/metrics")
    return {
        (sample.name, sample.labels["source"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "source" in sample.labels
    }


async def _is(read: Callable[[], Awaitable[dict[str, Any]]], field: str, value: Any) -> bool:
    return (await read()).get(field) == value


# ---- configuration -------------------------------------------------------------------------


def _config(peers: str) -> str:
    return 'name = "hub-b"\nfederation = "f"\n' + peers


def test_peers_configuration_round_trips_and_explains_mistakes(tmp_path: Path) -> None:
    a, c = SignerKey.generate("hub-a").verifier.encode(), SignerKey.generate("hub-c").verifier.encode()
    text = _config(
        f'[[peers]]\nurl = "http://a.example/"\nkey = "{a}"\nmember_key = "a.key"\n'
        f'collections = ["main", "hub-c:main"]\nrelay_keys = ["{c}"]\ninterval = 2\n'
    )
    config = HubConfig.from_toml(text, "hub.toml", tmp_path)
    (parsed,) = config.peers
    assert parsed.url == "http://a.example" and parsed.member_key == str(tmp_path / "a.key")
    assert parsed.origin_key("hub-c:main") == c and parsed.origin_key("main") == a
    assert (parsed.interval, parsed.timeout) == (2.0, 60.0)
    assert HubConfig.from_toml(config.to_toml(), "again") == config

    def refused(peers: str) -> str:
        with pytest.raises(ConfigError) as caught:
            HubConfig.from_toml(_config(peers), "hub.toml")
        return str(caught.value)

    base = f'[[peers]]\nurl = "http://a"\nkey = "{a}"\nmember_key = "k"\n'
    assert "relay_keys" in refused(base + 'collections = ["hub-c:main"]\n')
    assert "not an http" in refused(base.replace("http://a", "ftp://a") + 'collections = ["main"]\n')
    assert "unknown setting 'colections'" in refused(base + 'colections = ["main"]\n')
    assert "empty" in refused(base + "collections = []\n")
    assert "both" in refused(base + 'collections = ["main"]\n' + base + 'collections = ["main"]\n')
    assert "positive number" in refused(base + 'collections = ["main"]\ninterval = 0\n')
