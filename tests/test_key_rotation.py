"""Hub key rotation: an entry signed by the old key hands each log over to a new one.

During the overlap checkpoints carry both signatures, so a mirror or a peering hub that pinned
the old key verifies the hand-over and follows it; afterwards only the new key signs, and a
follower that missed the overlap refuses what it cannot verify. A new mirror pins the hub's
``hub.keys`` (every key, oldest first).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.admin import change_membership, rebuild, rotate_hub_key
from federation.checkpoint import split_note
from federation.config import PeerConfig
from federation.envelope import HUB_KEY_TYPE, Grant, Header, hub_key_payload, sign_envelope, utc_now
from federation.hub import open_node
from federation.keys import SignerKey, VerifierKey
from federation.state import Refusal
from federation.sync.mirror import MirrorDir
from tests.helpers import fresh_seq
from tests.sync_helpers import (
    COLLECTION,
    FEDERATION,
    READ,
    READ_WRITE,
    LiveHub,
    key_file,
    make_hub,
    mirror_argv,
    mirror_size,
    pdq,
    run_cli,
)

DAY = 86_400


async def rotate(hub: LiveHub, overlap_seconds: int) -> VerifierKey:
    """Stop the hub, hand it over to a new key, and serve it again; return the new key."""
    await hub.stop()
    _, new, rotated = rotate_hub_key(hub.data, overlap_seconds)
    assert all(index is not None for index in rotated.values())
    hub.signer = hub.data.signer()
    await hub.serve()
    return new


def signers(note: str) -> set[bytes]:
    return {raw[:4] for _, raw in split_note(note)[1]}


@dataclass
class Mirrored:
    hub: LiveHub
    old_key: str
    reader: Path
    mirror: Path


@pytest.fixture
async def mirrored(tmp_path: Path) -> AsyncIterator[Mirrored]:
    """A served hub with one entry of acme's, mirrored (pinning its first key) as ``reader``."""
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "reader": READ})
    await hub.serve()
    try:
        await hub.submit("acme", [pdq(1)])
        made = Mirrored(hub, hub.key, key_file(tmp_path, hub.members["reader"]), tmp_path / "mirror")
        code, _, err = await run_cli(*mirror_argv(hub.url, made.reader, made.old_key, made.mirror))
        assert code == 0, err
        yield made
    finally:
        await hub.stop()


async def test_a_mirror_follows_a_rotation_during_the_overlap(mirrored: Mirrored) -> None:
    hub, old_key, directory = mirrored.hub, mirrored.old_key, mirrored.mirror
    new = await rotate(hub, 14 * DAY)
    note = await hub.get_text(f"/v1/collections/{COLLECTION}/checkpoint")
    assert signers(note) == {new.hash, VerifierKey.parse(old_key).hash}  # both keys sign in the overlap
    assert hub.data.verifier_file.read_text().strip() == new.encode()
    assert hub.data.key_chain_file.read_text().split() == [old_key, new.encode()]

    change_membership(
        hub.data, COLLECTION, grant=[Grant(SignerKey.generate("beta").verifier, frozenset({"read"}))]
    )
    await hub.submit("acme", [pdq(2)])
    code, _, err = await run_cli("mirror", str(directory))
    assert code == 0, err
    assert mirror_size(directory) == await hub.size()
    node = MirrorDir(directory).open_node()
    try:
        assert [record.key for record in node.store.hub_keys(f"hub-a:{COLLECTION}")] == [new]
    finally:
        node.store.close()
    code, out, err = await run_cli("lookup", "--mirror", str(directory), "--type", "pdq", "--json", pdq(2))
    assert code == 0 and json.loads(out)[0]["matches"], err

    await hub.stop()
    done = await asyncio.to_thread(rebuild, hub.data)  # replay verifies the entries the old key signed
    assert done[COLLECTION] == _size_offline(hub)
    await hub.serve()


async def test_after_the_overlap_only_followers_that_kept_up_verify(
    mirrored: Mirrored, tmp_path: Path
) -> None:
    hub, reader, late = mirrored.hub, mirrored.reader, mirrored.mirror
    new = await rotate(hub, 0)  # no overlap: the new key alone signs at once
    await hub.submit("acme", [pdq(2)])
    note = await hub.get_text(f"/v1/collections/{COLLECTION}/checkpoint")
    assert signers(note) == {new.hash}

    code, _, err = await run_cli("mirror", str(late))
    assert code == 4
    assert "if the hub rotated its key and the overlap has passed" in err

    fresh = tmp_path / "fresh"
    chain = str(hub.data.key_chain_file)
    code, _, err = await run_cli(*mirror_argv(hub.url, reader, chain, fresh))
    assert code == 0, err
    assert mirror_size(fresh) == await hub.size()

    wrong = tmp_path / "wrong"
    code, _, err = await run_cli(*mirror_argv(hub.url, reader, new.encode(), wrong))
    assert code == 4
    assert "must be signed by the hub key in force" in err


async def test_a_peering_hub_follows_a_rotation(tmp_path: Path) -> None:
    origin = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE})
    follower = make_hub(tmp_path, "hub-b", {"reader": READ})
    member = SignerKey.generate("hub-b-peer")
    origin.grant(member, READ)
    await origin.serve()
    peer = PeerConfig(
        url=origin.url,
        key=origin.key,
        member_key=str(key_file(tmp_path, member)),
        collections=(COLLECTION,),
        interval=0.05,
        timeout=5.0,
    )
    await follower.serve([peer])
    try:
        await origin.submit("acme", [pdq(1)])
        await _until_found(follower, pdq(1))
        await rotate(origin, 14 * DAY)
        await origin.submit("acme", [pdq(2)])
        await _until_found(follower, pdq(2))
    finally:
        await follower.stop()
        await origin.stop()


def test_only_the_hub_key_in_force_may_rotate(tmp_path: Path) -> None:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE})
    node = open_node(hub.data, searchable=False)
    try:
        old = hub.signer
        newer = SignerKey.generate(old.name)

        def rotation(signer: SignerKey, previous: VerifierKey, key: VerifierKey) -> Refusal:
            header = Header(FEDERATION, COLLECTION, fresh_seq(), utc_now())
            envelope = sign_envelope(signer, HUB_KEY_TYPE, hub_key_payload(header, previous, key, DAY))
            with pytest.raises(Refusal) as refused:
                node.submit(COLLECTION, envelope)
            return refused.value

        by_member = rotation(hub.members["acme"], old.verifier, newer.verifier)
        assert (by_member.status, by_member.kind) == (403, "not-hub-key")
        assert node.store.hub_keys(COLLECTION) == []

        node.keys.add(newer)
        assert node.rotate_key(COLLECTION, newer, DAY) is not None
        back = rotation(newer, newer.verifier, old.verifier)
        assert (back.status, back.kind) == (409, "key-reused")
        stale = rotation(newer, old.verifier, SignerKey.generate(old.name).verifier)
        assert (stale.status, stale.kind) == (409, "stale-hub-key")
        by_old = rotation(old, old.verifier, SignerKey.generate(old.name).verifier)
        assert (by_old.status, by_old.kind) == (403, "not-hub-key")
        assert [record.key for record in node.store.hub_keys(COLLECTION)] == [newer.verifier]
    finally:
        node.store.close()


def _size_offline(hub: LiveHub) -> int:
    node = open_node(hub.data, searchable=False)
    try:
        return node.store.log_size(COLLECTION)
    finally:
        node.store.close()


async def _until_found(hub: LiveHub, hash_hex: str) -> None:
    for _ in range(400):
        answers = await hub.lookup("reader", [hash_hex])
        if answers[0]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{hash_hex} never reached {hub.name}")
