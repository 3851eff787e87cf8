"""hashfed as a python-threatexchange exchange, driven by the real ``threatexchange`` CLI.

What the CLI needs, as a member would set it up: its state directory
(``TX_STATEDIR``, here a temporary one), the extension added with
``threatexchange config extensions add federation.threatexchange``, a
collaboration naming the hub, the collection and the pinned hub key, and the
member's signer key in ``HASHFED_SIGNER_KEY``. The extension's verified
mirror lives under ``HASHFED_CACHE``. Nothing is mocked: the hub serves on
loopback and the CLI runs as its own process.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import pickle
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.video import VideoContent
from threatexchange.exchanges.fetch_state import FetchDelta, SignalOpinion, SignalOpinionCategory
from threatexchange.signal_type.index import SignalTypeIndex
from threatexchange.signal_type.md5 import VideoMD5Signal
from threatexchange.signal_type.pdq.signal import PdqSignal
from threatexchange.signal_type.signal_base import SignalType, TrivialSignalTypeIndex
from threatexchange.utils import dataclass_json

from federation.envelope import Addition, Removal
from federation.signals.base import Frame
from federation.signals.vpdq import identity
from federation.threatexchange import (
    TX_MANIFEST,
    HashfedCollabConfig,
    HashfedCredentials,
    HashfedExchange,
    HashfedFetchError,
    PhotoDnaSignal,
    Sha1Signal,
)
from federation.threatexchange.exchange import HashfedCheckpoint, HashfedSignalMetadata
from tests.sync_helpers import (
    COLLECTION,
    READ,
    READ_WRITE,
    LiveHub,
    Proxy,
    clone_hub,
    flip_signature_bit,
    key_file,
    make_hub,
    pdq,
    tamper_entry,
)

THREATEXCHANGE = Path(sys.executable).with_name("threatexchange")
pytestmark = pytest.mark.skipif(
    not THREATEXCHANGE.exists(), reason="the threatexchange CLI is not installed (pip install -e '.[test]')"
)

SHA1 = "a9993e364706816aba3e25717850c26c9cd0d89d"
MD5 = "900150983cd24fb0d6963f7d28e17f72"
PHOTODNA = bytes(range(144)).hex()
NEAR_PHOTODNA = bytes([min(255, b + 3) for b in range(144)]).hex()  # distance 144 * 9 = 1,296


def near(hash_hex: str, bits: int = 4) -> str:
    value = int(hash_hex, 16)
    for bit in range(bits):
        value ^= 1 << (bit * 37)
    return f"{value:064x}"


@dataclass
class Member:
    """A member's pytx installation: its state directory and environment, and the hub it fetches from."""

    hub: LiveHub
    root: Path
    env: dict[str, str]

    async def tx(self, *argv: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            str(THREATEXCHANGE),
            *argv,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await process.communicate()
        return process.returncode or 0, out.decode(), err.decode()

    async def setup(self, url: str) -> None:
        for argv in (
            ("config", "extensions", "add", "federation.threatexchange"),
            (
                "config", "collab", "edit", "hashfed", "acme-main", "--create",
                "--hub-url", url, "--collection", COLLECTION, "--hub-key", self.hub.key,
            ),
        ):  # fmt: skip
            code, out, err = await self.tx(*argv)
            assert code == 0, out + err

    async def fetched(self) -> dict[tuple[str, str], tuple[str, str]]:
        """What pytx holds: (signal type, signal) -> (category, its tags sorted, space-separated)."""
        code, out, err = await self.tx("dataset", "-P", "--csv")
        assert code == 0, out + err
        return {
            (row["signal_type"], row["signal_str"]): (row["category"], " ".join(sorted(row["tags"].split())))
            for row in csv.DictReader(io.StringIO(out))
        }


@pytest.fixture
async def member(tmp_path: Path) -> AsyncIterator[Member]:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "beta": READ_WRITE, "reader": READ})
    await hub.serve()
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(tmp_path / "home"),
        "TX_STATEDIR": str(tmp_path / "tx-state"),
        "HASHFED_CACHE": str(tmp_path / "cache"),
        "HASHFED_SIGNER_KEY": str(key_file(tmp_path, hub.members["reader"])),
    }
    yield Member(hub, tmp_path, env)
    await hub.stop()


async def fetch(
    api: HashfedExchange, signal_types: list[type[SignalType]], checkpoint: HashfedCheckpoint | None
) -> list[FetchDelta[tuple[str, str], HashfedSignalMetadata, HashfedCheckpoint]]:
    """``fetch_iter`` as pytx and HMA call it: synchronously, here off the loop that serves the hub."""
    return await asyncio.to_thread(lambda: list(api.fetch_iter(signal_types, checkpoint)))


async def submit(hub: LiveHub, member: str, add: list[Addition], remove: list[Removal] | None = None) -> None:
    async with hub.client(member) as client:
        await client.submit(COLLECTION, add, remove or [])


async def test_fetch_gives_the_listed_set_then_follows_submissions_and_removals(member: Member) -> None:
    hub = member.hub
    await submit(
        hub,
        "acme",
        [
            Addition("pdq", pdq(1), ("csam",)),
            Addition("pdq", pdq(2), ("csam", "A1")),
            Addition("md5", MD5, ("csam",)),
            Addition("sha1", SHA1),
            Addition("photodna", PHOTODNA, ("ncmec",)),
        ],
    )
    await submit(hub, "beta", [Addition("pdq", pdq(3), ("terror",))])
    await hub.opinion("beta", [pdq(2)], "negative")
    await member.setup(hub.url)

    code, out, err = await member.tx("fetch")
    assert code == 0, out + err
    assert await member.fetched() == {
        ("pdq", pdq(1)): ("POSITIVE_CLASS", "csam"),
        ("pdq", pdq(2)): ("DISPUTED", "A1 csam"),
        ("pdq", pdq(3)): ("POSITIVE_CLASS", "terror"),
        ("md5", MD5): ("POSITIVE_CLASS", "csam"),
        ("sha1", SHA1): ("POSITIVE_CLASS", ""),
        ("photodna", PHOTODNA): ("POSITIVE_CLASS", "ncmec"),
    }

    await submit(
        hub, "acme", [Addition("pdq", pdq(4), ("new",))], [Removal("pdq", pdq(1)), Removal("sha1", SHA1)]
    )
    await hub.opinion("beta", [pdq(2)], "withdrawn")
    code, out, err = await member.tx("fetch")
    assert code == 0, out + err
    fetched = await member.fetched()
    assert set(fetched) == {
        ("pdq", pdq(2)),
        ("pdq", pdq(3)),
        ("pdq", pdq(4)),
        ("md5", MD5),
        ("photodna", PHOTODNA),
    }
    assert fetched[("pdq", pdq(2))][0] == "POSITIVE_CLASS"  # the negative opinion was withdrawn

    code, out, err = await member.tx("fetch")  # nothing new: the checkpoint holds
    assert code == 0, out + err
    assert await member.fetched() == fetched


async def test_match_finds_near_duplicates_of_fetched_hashes(member: Member) -> None:
    listed = [Addition("pdq", pdq(7), ("csam",)), Addition("pdq", pdq(9)), Addition("photodna", PHOTODNA)]
    await submit(member.hub, "acme", listed)  # two PDQ hashes: pytx 1.2's PDQ index reloaded from disk
    # finds no near match when it holds a single hash (an exact one still matches)
    await member.setup(member.hub.url)
    code, out, err = await member.tx("fetch")
    assert code == 0, out + err

    code, out, err = await member.tx("-v", "match", "-S", "pdq", "-H", "photo", "--", near(pdq(7)))
    assert code == 0, out + err
    assert "acme-main" in out and "POSITIVE_CLASS" in out, out + err
    code, out, err = await member.tx("match", "-S", "pdq", "-H", "photo", "--", pdq(8))
    assert "acme-main" not in out, out

    code, out, err = await member.tx("match", "-S", "photodna", "-H", "photo", "--", NEAR_PHOTODNA)
    assert code == 0, out + err
    assert "acme-main" in out and "1296" in out, out


async def test_a_tampered_log_fails_the_fetch_and_changes_nothing(member: Member) -> None:
    hub = member.hub
    await submit(hub, "acme", [Addition("pdq", pdq(1))])
    proxy = await Proxy(hub.url).start()
    try:
        await member.setup(proxy.url)
        code, out, err = await member.tx("fetch")
        assert code == 0, out + err
        before = await member.fetched()
        first_new = await hub.size()

        await submit(hub, "acme", [Addition("pdq", pdq(2))])
        await submit(hub, "acme", [Addition("pdq", pdq(3))], [Removal("pdq", pdq(1))])
        proxy.mutate = tamper_entry(first_new + 1, flip_signature_bit)
        code, out, err = await member.tx("-v", "fetch")
        assert code != 0, out + err
        assert "verification failed, nothing was fetched" in err and "does not verify" in err, err
        assert await member.fetched() == before

        proxy.mutate = None
        code, out, err = await member.tx("fetch")
        assert code == 0, out + err
        assert set(await member.fetched()) == {("pdq", pdq(2)), ("pdq", pdq(3))}
    finally:
        await proxy.close()


async def test_a_forked_hub_stops_the_fetch_with_evidence(member: Member, tmp_path: Path) -> None:
    hub = member.hub
    await submit(hub, "acme", [Addition("pdq", pdq(1))])
    fork = clone_hub(hub, tmp_path, "fork")
    await submit(hub, "acme", [Addition("pdq", pdq(2))])
    await member.setup(hub.url)
    code, out, err = await member.tx("fetch")
    assert code == 0, out + err
    before = await member.fetched()
    await hub.stop()

    fork.port = hub.port  # the same address now shows another history of the same size and more
    await fork.serve()
    try:
        await submit(fork, "acme", [Addition("pdq", pdq(5))])  # the size fetched, another root
        code, out, err = await member.tx("-v", "fetch")
        assert code != 0, out + err
        assert "FORK DETECTED" in err and "evidence kept in" in err, err
        assert await member.fetched() == before
        assert list((tmp_path / "cache").glob("*/evidence/*.json"))

        shutil.rmtree(tmp_path / "cache")  # a lost cache re-verifies the forked log from scratch...
        code, out, err = await member.tx("-v", "fetch")
        assert code != 0, out + err
        assert "not the one fetched before" in err, err  # ...and the stored checkpoint's root catches it
        assert await member.fetched() == before
    finally:
        await fork.stop()
        hub.server = None


async def test_hma_fetcher_path_round_trips_config_credentials_checkpoints_and_records(
    member: Member,
) -> None:
    """What HMA does with an exchange: configs, credentials and checkpoints stored as JSON, the client
    made by ``for_collab`` under credentials set as default, records converted one key at a time and
    pickled; and a runtime without the hub's own types is told what it misses."""
    hub = member.hub
    await submit(hub, "acme", [Addition("pdq", pdq(1), ("x",)), Addition("md5", MD5), Addition("sha1", SHA1)])
    # POST /c/exchanges {"bank": "ACME_MAIN", "api": "hashfed", "api_json": {...}}, as HMA's curation API
    # turns it into a config, and stores it as JSON
    api_json = {"hub_url": hub.url, "collection": COLLECTION, "hub_key": hub.key}
    created = dataclass_json.dataclass_load_dict(
        {**api_json, "name": "ACME_MAIN", "enabled": True, "api": "hashfed"}, HashfedCollabConfig
    )
    stored_config = dataclass_json.dataclass_load_dict(
        dataclass_json.dataclass_dump_dict(created), HashfedCollabConfig
    )
    # POST /c/exchanges/api/hashfed {"credential_json": {"signer_key": "PRIVATE+KEY+..."}}
    stored_credentials = dataclass_json.dataclass_load_dict(
        {"signer_key": hub.members["reader"].encode()}, HashfedCredentials
    )
    assert stored_credentials._are_valid()
    os.environ["HASHFED_CACHE"] = member.env["HASHFED_CACHE"]
    try:
        with stored_credentials.set_default(stored_credentials, "db"):
            api = HashfedExchange.for_collab(stored_config)
        hma_types = [PdqSignal, VideoMD5Signal]  # HMA's reference OMM_CONFIG
        deltas = await fetch(api, hma_types, None)
        records = {k: v for delta in deltas for k, v in delta.updates.items()}
        assert set(records) == {("pdq", pdq(1)), ("video_md5", MD5)}
        for key, value in records.items():
            converted = HashfedExchange.naive_convert_to_signal_type(hma_types, stored_config, {key: value})
            assert next(iter(converted.values())) == {key[1]: value}
            restored = pickle.loads(pickle.dumps(value))
            assert restored is not None and restored.get_as_opinions() == value.get_as_opinions()  # type: ignore[union-attr]
        checkpoint = dataclass_json.dataclass_load_dict(
            dataclass_json.dataclass_dump_dict(deltas[-1].checkpoint), HashfedExchange.get_checkpoint_cls()
        )
        assert checkpoint.index == await hub.size()

        await submit(hub, "acme", [], [Removal("pdq", pdq(1))])
        later = {k: v for delta in await fetch(api, hma_types, checkpoint) for k, v in delta.updates.items()}
        assert later == {("pdq", pdq(1)): None}
    finally:
        del os.environ["HASHFED_CACHE"]


async def test_report_opinion_writes_a_signed_opinion_that_comes_back_as_mine(
    member: Member, tmp_path: Path
) -> None:
    hub = member.hub
    await submit(hub, "acme", [Addition("pdq", pdq(1), ("csam",)), Addition("sha1", SHA1)])
    config = HashfedCollabConfig(name="acme-main", hub_url=hub.url, collection=COLLECTION, hub_key=hub.key)
    api = HashfedExchange(config, hub.members["beta"], cache=tmp_path / "cache")
    before = await hub.size()

    negative = SignalOpinion(True, SignalOpinionCategory.NEGATIVE_CLASS, {"meme"})
    await asyncio.to_thread(api.report_opinion, PdqSignal, pdq(1), negative)
    assert await hub.size() == before + 1
    with pytest.raises(ValueError, match="positive or negative"):
        api.report_opinion(
            Sha1Signal, SHA1, SignalOpinion(True, SignalOpinionCategory.INVESTIGATION_SEED, set())
        )

    records = {k: v for d in await fetch(api, [PdqSignal, Sha1Signal], None) for k, v in d.updates.items()}
    metadata = records[("pdq", pdq(1))]
    assert metadata is not None
    opinions = {(o.member, o.is_mine, o.category) for o in metadata.opinions}
    assert opinions == {
        ("acme", False, SignalOpinionCategory.POSITIVE_CLASS),
        ("beta", True, SignalOpinionCategory.NEGATIVE_CLASS),
    }


class VpdqStandIn(SignalType):
    """Stands in for pytx's vPDQ extension type (its ``vpdq`` package does not build everywhere):
    the same name and the same signal string, a JSON list of ``"pdqhex,quality,timestamp"``."""

    @classmethod
    def get_name(cls) -> str:
        return "vpdq"

    @classmethod
    def get_content_types(cls) -> list[type[ContentType]]:
        return [VideoContent]

    @classmethod
    def get_index_cls(cls) -> type[SignalTypeIndex[Any]]:
        return TrivialSignalTypeIndex

    @classmethod
    def validate_signal_str(cls, signal_str: str) -> str:
        for line in json.loads(signal_str):
            code, quality, timestamp = line.split(",")
            assert len(code) == 64 and 0 <= int(quality) <= 100 and float(timestamp) >= 0
        return signal_str


async def test_videos_reach_a_runtime_with_a_vpdq_type_and_are_named_where_none_is(
    member: Member, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hub = member.hub
    frames = (Frame(pdq(11), 100, 0.0), Frame(pdq(12), 80, 1.0), Frame(pdq(13), 20, 2.0))
    video = identity(frames)
    await submit(hub, "acme", [Addition("vpdq", video, ("clip",), frames=frames), Addition("pdq", pdq(1))])
    config = HashfedCollabConfig(name="acme-main", hub_url=hub.url, collection=COLLECTION, hub_key=hub.key)
    api = HashfedExchange(config, hub.members["reader"], cache=tmp_path / "cache")

    deltas = await fetch(api, [PdqSignal, VpdqStandIn], None)
    records = {k: v for d in deltas for k, v in d.updates.items()}
    metadata = records[("vpdq", video)]
    assert metadata is not None and metadata.signal is not None
    assert json.loads(metadata.signal) == [
        f"{pdq(11)},100,0.000",
        f"{pdq(12)},80,1.000",
        f"{pdq(13)},20,2.000",
    ]
    converted = HashfedExchange.naive_convert_to_signal_type([VpdqStandIn], config, records)
    assert converted == {VpdqStandIn: {metadata.signal: metadata}}

    await submit(hub, "acme", [], [Removal("vpdq", video)])
    later = await fetch(api, [PdqSignal, VpdqStandIn], deltas[-1].checkpoint)
    assert {k: v for d in later for k, v in d.updates.items()} == {("vpdq", video): None}

    with caplog.at_level(logging.WARNING, logger="hashfed.threatexchange"):
        records = {k: v for d in await fetch(api, [PdqSignal], None) for k, v in d.updates.items()}
    assert set(records) == {("pdq", pdq(1))}
    assert "1 vpdq hashes not delivered" in caplog.text and "add one of: vpdq" in caplog.text


def test_the_manifest_and_its_signal_types() -> None:
    names = {signal.get_name() for signal in TX_MANIFEST.signal_types}
    assert names == {"md5", "sha1", "sha256", "photodna"}
    assert [api.get_name() for api in TX_MANIFEST.apis] == ["hashfed"]
    assert PhotoDnaSignal.validate_signal_str(",".join(str(b) for b in range(144))) == PHOTODNA
    with pytest.raises(ValueError, match="photodna"):
        PhotoDnaSignal.validate_signal_str("abc")
    assert PhotoDnaSignal.compare_hash(PHOTODNA, NEAR_PHOTODNA).match
    far = bytes([255 - b for b in range(144)]).hex()
    assert not PhotoDnaSignal.compare_hash(PHOTODNA, far).match
    assert Sha1Signal.hash_from_bytes(b"abc") == SHA1
    with pytest.raises(ValueError):
        Sha1Signal.validate_signal_str("xyz")


async def test_a_log_shorter_than_the_checkpoint_fetched_is_refused(member: Member, tmp_path: Path) -> None:
    hub = member.hub
    await submit(hub, "acme", [Addition("pdq", pdq(1))])
    config = HashfedCollabConfig(name="acme-main", hub_url=hub.url, collection=COLLECTION, hub_key=hub.key)
    api = HashfedExchange(config, hub.members["reader"], cache=tmp_path / "cache")
    checkpoint = (await fetch(api, [PdqSignal], None))[-1].checkpoint
    ahead = HashfedExchange.get_checkpoint_cls()(checkpoint.index + 5, checkpoint.root)
    with pytest.raises(HashfedFetchError, match="rolled its log back"):
        await fetch(api, [PdqSignal], ahead)


def test_a_collab_that_cannot_work_is_refused_with_a_reason(tmp_path: Path) -> None:
    config = HashfedCollabConfig(name="c", hub_url="hub.example", collection="main", hub_key="nope")
    with pytest.raises(ValueError, match="not an http"):
        config.mirror_config()
    config.hub_url = "https://hub.example"
    with pytest.raises(ValueError, match="verifier key"):
        config.mirror_config()
    assert not HashfedCredentials("PRIVATE+KEY+broken")._are_valid()
