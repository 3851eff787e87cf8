"""The projection (federation.state) through a Node on a real SQLite file, without HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    FEDERATION,
    batch_doc,
    envelope,
    flip,
    item,
    md5,
    membership_doc,
    node_lookup,
    opinion_doc,
    pdq,
    sha256,
)

from federation.checkpoint import open_note
from federation.envelope import Envelope, Grant, parse_payload
from federation.keys import SignerKey
from federation.node import Match, Node
from federation.signals import MD5, PDQ, SHA256
from federation.state import ListingChange, Refusal, apply_entry, check_entry
from federation.store import SqliteStore
from federation.store.base import HubStore
from federation.store.opening import open_store

MAIN = "main"
RW = frozenset({"read", "write"})
R = frozenset({"read"})


def hub_node(store: HubStore, hub: SignerKey) -> Node:
    return Node(store, name="testhub", federation=FEDERATION, hub_key=hub.verifier, signer=hub)


@dataclass
class World:
    path: Path
    database: str
    """hub.toml's setting: "" for an SQLite file in ``path``, or a PostgreSQL URL."""
    hub: SignerKey
    keys: dict[str, SignerKey]
    store: HubStore
    node: Node

    def open(self) -> Node:
        """(Re)open the node on the same database."""
        self.store = open_store(self.database, self.path)
        self.node = hub_node(self.store, self.hub)
        return self.node

    def submit(self, who: str, doc: dict[str, Any], collection: str = MAIN) -> int:
        accepted = self.node.submit(collection, envelope(self.keys[who], doc))
        assert accepted.created
        return accepted.entry.index

    def refused(
        self, who: str, doc: dict[str, Any], status: int, kind: str, collection: str = MAIN
    ) -> Refusal:
        """The entry is refused and the log, tree and projection are untouched."""
        before = self.state(collection)
        with pytest.raises(Refusal) as caught:
            self.node.submit(collection, envelope(self.keys[who], doc))
        assert (caught.value.status, caught.value.kind) == (status, kind), caught.value.detail
        assert caught.value.detail
        assert self.state(collection) == before
        return caught.value

    def state(self, collection: str = MAIN) -> Any:
        store = self.store
        size = store.log_size(collection)
        listed, _ = store.listed(collection)
        by_signal: dict[str, list[str]] = {}
        for signal, hash_hex in listed:
            by_signal.setdefault(signal, []).append(hash_hex)
        details = {signal: store.details(collection, signal, hashes) for signal, hashes in by_signal.items()}
        changes, _ = store.changes_since(collection, 0)
        return (
            size,
            self.node.checkpoint(collection),
            sorted(listed),
            details,
            changes,
            sorted((r.key.key_id, sorted(r.rights), r.revoked_index) for r in store.keys(collection)),
        )

    def details(self, signal: str, hash_hex: str, collection: str = MAIN) -> Any:
        return self.store.details(collection, signal, [hash_hex]).get(hash_hex)


@pytest.fixture
def world(tmp_path: Path, database: str) -> Iterator[World]:
    hub = SignerKey.generate("testhub")
    keys = {
        "acme": SignerKey.generate("acme"),
        "acme2": SignerKey.generate("acme"),  # a second key of member acme (rotation)
        "beta": SignerKey.generate("beta"),
        "reader": SignerKey.generate("reader"),
        "outsider": SignerKey.generate("outsider"),
    }
    keys["hub"] = hub
    store = open_store(database, tmp_path)
    node = hub_node(store, hub)
    made = World(tmp_path, database, hub, keys, store, node)
    node.create_collection(
        MAIN,
        [
            Grant(keys["acme"].verifier, RW),
            Grant(keys["acme2"].verifier, RW),
            Grant(keys["beta"].verifier, RW),
            Grant(keys["reader"].verifier, R),
        ],
    )
    yield made
    made.store.close()


# ---- membership -------------------------------------------------------------------


def test_the_first_entry_grants_keys_and_rights(world: World) -> None:
    store = world.store
    assert store.log_size(MAIN) == 1
    records = {r.key.key_id: r for r in store.keys(MAIN)}
    assert set(records) == {world.keys[n].key_id for n in ("acme", "acme2", "beta", "reader")}
    acme = records[world.keys["acme"].key_id]
    assert acme.member == "acme" and acme.rights == RW and acme.granted_index == 0 and acme.active
    assert records[world.keys["acme2"].key_id].member == "acme"
    assert records[world.keys["reader"].key_id].rights == R
    assert store.key_memberships(world.keys["beta"].key_id) == [(MAIN, records[world.keys["beta"].key_id])]
    assert store.key_memberships(world.keys["outsider"].key_id) == []


def test_a_collection_starts_with_a_membership_entry(world: World) -> None:
    world.store.create_collection("bare")
    doc = batch_doc("acme", [item("pdq", pdq(1))], collection="bare")
    world.refused("acme", doc, 409, "no-membership-yet", "bare")
    grant = membership_doc([(world.keys["acme"].verifier, ["read", "write"])], collection="bare")
    world.refused("acme", grant, 403, "not-hub-key", "bare")
    assert world.submit("hub", grant, "bare") == 0
    assert world.submit("acme", doc, "bare") == 1


def test_revoke_retires_one_key(world: World) -> None:
    world.submit("acme", batch_doc("acme", [item("pdq", pdq(2), ["x"])]))
    accepted = world.node.change_membership(MAIN, (), [world.keys["acme"].key_id])
    [record] = [r for r in world.store.keys(MAIN) if r.key.key_id == world.keys["acme"].key_id]
    assert record.revoked_index == accepted.entry.index and not record.active
    assert record.rights == RW
    world.refused("acme", batch_doc("acme", [item("pdq", pdq(3))]), 403, "revoked-key")
    world.refused("acme", opinion_doc("acme", [("pdq", pdq(2), "negative")]), 403, "revoked-key")
    # The member's listings stay, and its other key still acts for it.
    assert world.details("pdq", pdq(2)).submitters == ("acme",)
    world.submit("acme2", batch_doc("acme", remove=[("pdq", pdq(2))]))
    assert world.details("pdq", pdq(2)) is None


def test_revoking_again_or_an_unknown_key_is_refused(world: World) -> None:
    acme = world.keys["acme"].key_id
    world.node.change_membership(MAIN, (), [acme])
    for key_id in (acme, world.keys["outsider"].key_id):
        world.refused("hub", membership_doc(revoke=[key_id]), 409, "no-such-key")


def test_a_revoked_key_cannot_be_granted_again(world: World) -> None:
    acme = world.keys["acme"]
    world.node.change_membership(MAIN, (), [acme.key_id])
    refusal = world.refused("hub", membership_doc([(acme.verifier, ["read"])]), 409, "key-revoked")
    assert acme.key_id in refusal.detail
    # A fresh key for the same member is fine.
    world.keys["acme3"] = SignerKey.generate("acme")
    world.submit("hub", membership_doc([(world.keys["acme3"].verifier, ["read", "write"])]))
    world.submit("acme3", batch_doc("acme", [item("md5", md5(4))]))


def test_granting_an_active_key_again_changes_its_rights(world: World) -> None:
    reader = world.keys["reader"]
    world.refused("reader", batch_doc("reader", [item("pdq", pdq(5))]), 403, "missing-right")
    world.submit("hub", membership_doc([(reader.verifier, ["read", "write"])]))
    world.submit("reader", batch_doc("reader", [item("pdq", pdq(5))]))
    world.submit("hub", membership_doc([(reader.verifier, ["write"])]))
    world.refused("reader", opinion_doc("reader", [("pdq", pdq(5), "negative")]), 403, "missing-right")


def test_rights_and_authority(world: World) -> None:
    world.refused("reader", batch_doc("reader", [item("pdq", pdq(6))]), 403, "missing-right")
    world.refused("outsider", batch_doc("outsider", [item("pdq", pdq(6))]), 403, "unknown-key")
    world.refused("acme", batch_doc("beta", [item("pdq", pdq(6))]), 403, "wrong-member")
    world.refused("acme", membership_doc([(world.keys["outsider"].verifier, ["read"])]), 403, "not-hub-key")
    bad = batch_doc("acme", [item("pdq", pdq(6))], federation="elsewhere")
    world.refused("acme", bad, 400, "wrong-federation")
    world.refused(
        "acme", batch_doc("acme", [item("pdq", pdq(6))], collection="other"), 400, "wrong-collection"
    )
    world.submit("reader", opinion_doc("reader", [("pdq", pdq(6), "positive")]))


def test_a_tampered_envelope_is_refused(world: World) -> None:
    env = envelope(world.keys["acme"], batch_doc("acme", [item("pdq", pdq(7))]))
    other = envelope(world.keys["acme"], batch_doc("acme", [item("pdq", pdq(8))]))
    forged = Envelope(other.payload, env.payload_type, env.signatures)
    size = world.store.log_size(MAIN)
    with pytest.raises(Refusal) as caught:
        world.node.submit(MAIN, forged)
    assert (caught.value.status, caught.value.kind) == (400, "bad-envelope-signature")
    assert world.store.log_size(MAIN) == size


# ---- seq ------------------------------------------------------------------------------


def test_seq_is_per_signer_key_and_strictly_increasing(world: World) -> None:
    world.submit("acme", batch_doc("acme", [item("md5", md5(10))], seq=1000))
    for stale in (1000, 999, 1):
        refusal = world.refused(
            "acme", batch_doc("acme", [item("md5", md5(11))], seq=stale), 409, "stale-seq"
        )
        assert "1000" in refusal.detail
    # Gaps are allowed; other signers, even of the same member, have their own seq.
    world.submit("acme", batch_doc("acme", [item("md5", md5(12))], seq=5000))
    world.submit("acme2", batch_doc("acme", [item("md5", md5(13))], seq=1))
    world.submit("beta", batch_doc("beta", [item("md5", md5(14))], seq=1000))
    world.refused("acme2", batch_doc("acme", [item("md5", md5(15))], seq=1), 409, "stale-seq")
    # Opinions and batches share one signer's seq.
    world.refused("acme", opinion_doc("acme", [("md5", md5(10), "positive")], seq=4999), 409, "stale-seq")
    world.submit("acme", opinion_doc("acme", [("md5", md5(10), "positive")], seq=5001))
    # seq is per collection too.
    world.node.create_collection("other", [Grant(world.keys["acme"].verifier, RW)])
    world.submit("acme", batch_doc("acme", [item("md5", md5(16))], seq=2, collection="other"), "other")
    with world.store.write(MAIN) as txn:
        assert txn.last_seq(world.keys["acme"].key_id) == 5001
        assert txn.last_seq(world.keys["acme2"].key_id) == 1
        assert txn.last_seq(world.keys["outsider"].key_id) == 0


def test_the_exact_same_envelope_is_answered_with_its_entry(world: World) -> None:
    env = envelope(world.keys["beta"], batch_doc("beta", [item("pdq", pdq(17))]))
    first = world.node.submit(MAIN, env)
    before = world.state()
    again = world.node.submit(MAIN, env)
    assert not again.created and again.entry == first.entry
    assert world.state() == before


# ---- listings and labels ----------------------------------------------------------------


def test_labels_are_the_union_of_current_submitters(world: World) -> None:
    h = pdq(20)
    first = world.submit("acme", batch_doc("acme", [item("pdq", h, ["b", "a", "a"])]))
    world.submit("beta", batch_doc("beta", [item("pdq", h, ["c", "b"])]))
    detail = world.details("pdq", h)
    assert detail.submitters == ("acme", "beta")
    assert detail.labels == ("a", "b", "c")
    assert detail.first_index == first
    # Adding again replaces that submitter's labels (and keeps its first index).
    world.submit("acme", batch_doc("acme", [item("pdq", h, ["d"])]))
    detail = world.details("pdq", h)
    assert detail.labels == ("b", "c", "d") and detail.first_index == first
    # A submitter's labels go when it removes the hash.
    world.submit("beta", batch_doc("beta", remove=[("pdq", h)]))
    detail = world.details("pdq", h)
    assert detail.submitters == ("acme",) and detail.labels == ("d",)
    # Keys of one member act for the member: acme2 removes what acme added.
    world.submit("acme2", batch_doc("acme", remove=[("pdq", h)]))
    assert world.details("pdq", h) is None


def test_removing_what_the_member_does_not_list_refuses_the_batch_whole(world: World) -> None:
    world.submit("beta", batch_doc("beta", [item("pdq", pdq(21))]))
    doc = batch_doc("acme", [item("pdq", pdq(22))], remove=[("pdq", pdq(21))])
    refusal = world.refused("acme", doc, 422, "not-listed")
    assert pdq(21) in refusal.detail
    assert world.details("pdq", pdq(22)) is None
    assert world.details("pdq", pdq(21)).submitters == ("beta",)


def test_listing_changes_are_recorded(world: World) -> None:
    h, m = pdq(23), md5(23)
    i1 = world.submit("acme", batch_doc("acme", [item("pdq", h), item("md5", m)]))
    world.submit("beta", batch_doc("beta", [item("pdq", h)]))  # already listed: no change
    world.submit("acme", batch_doc("acme", [item("pdq", h, ["relabel"])]))  # no change
    world.submit("reader", opinion_doc("reader", [("pdq", h, "negative")]))  # no change
    i2 = world.submit("acme", batch_doc("acme", remove=[("pdq", h), ("md5", m)]))  # h stays: beta lists it
    i3 = world.submit("beta", batch_doc("beta", remove=[("pdq", h)]))
    i4 = world.submit("acme2", batch_doc("acme", [item("pdq", h)]))
    changes, size = world.store.changes_since(MAIN, 0)
    assert size == i4 + 1
    assert changes == [
        ListingChange(i1, "pdq", h, True),
        ListingChange(i1, "md5", m, True),
        ListingChange(i2, "md5", m, False),
        ListingChange(i3, "pdq", h, False),
        ListingChange(i4, "pdq", h, True),
    ]
    assert world.store.changes_since(MAIN, i3)[0] == changes[3:]
    listed, _ = world.store.listed(MAIN)
    assert listed == [("pdq", h)]


def test_apply_entry_returns_the_changes_it_records(world: World) -> None:
    world.submit("beta", batch_doc("beta", [item("pdq", pdq(24))]))
    doc = batch_doc("acme", [item("pdq", pdq(24)), item("sha256", sha256(24))])
    env = envelope(world.keys["acme"], doc)
    payload = parse_payload(env.payload_type, env.payload)
    with world.store.write(MAIN) as txn:
        signer = check_entry(env, payload, world.node.context(MAIN), txn)
        assert signer == world.keys["acme"].key_id
        entry = txn.append(env.canonical())
        changes = apply_entry(entry.index, signer, payload, txn)
    assert changes == [ListingChange(entry.index, "sha256", sha256(24), True)]
    assert world.store.changes_since(MAIN, entry.index)[0] == changes


# ---- opinions ------------------------------------------------------------------------------


def test_opinions_count_each_members_latest_verdict(world: World) -> None:
    h = pdq(30)
    world.submit("acme", batch_doc("acme", [item("pdq", h)]))

    def counts() -> tuple[int, int]:
        detail = world.details("pdq", h)
        return detail.positive, detail.negative

    assert counts() == (0, 0)
    world.submit("reader", opinion_doc("reader", [("pdq", h, "positive")]))
    world.submit("beta", opinion_doc("beta", [("pdq", h, "negative")]))
    world.submit("acme", opinion_doc("acme", [("pdq", h, "positive")]))
    assert counts() == (2, 1)
    # acme's other key speaks for the same member: its latest verdict replaces the first.
    world.submit("acme2", opinion_doc("acme", [("pdq", h, "negative")]))
    assert counts() == (1, 2)
    world.submit("reader", opinion_doc("reader", [("pdq", h, "withdrawn")]))
    assert counts() == (0, 2)
    world.submit("reader", opinion_doc("reader", [("pdq", h, "withdrawn")]))  # nothing to clear
    assert counts() == (0, 2)
    world.submit("acme", opinion_doc("acme", [("pdq", h, "withdrawn")]))
    world.submit("beta", opinion_doc("beta", [("pdq", h, "withdrawn")]))
    assert counts() == (0, 0)


def test_opinions_outlive_a_removal_and_count_again_when_relisted(world: World) -> None:
    """Opinions are about a hash, not a listing: current behaviour, see the report."""
    h = pdq(31)
    world.submit("acme", batch_doc("acme", [item("pdq", h)]))
    world.submit("reader", opinion_doc("reader", [("pdq", h, "negative")]))
    world.submit("acme", batch_doc("acme", remove=[("pdq", h)]))
    assert world.details("pdq", h) is None
    world.submit("beta", batch_doc("beta", [item("pdq", h)]))
    assert (world.details("pdq", h).positive, world.details("pdq", h).negative) == (0, 1)


# ---- restart and replay -------------------------------------------------------------------


def _populate(world: World) -> list[tuple[Any, str]]:
    base = pdq(40)
    near = [flip(base, d, offset=d * 3) for d in (1, 4, 9, 30)]
    world.submit(
        "acme", batch_doc("acme", [item("pdq", base, ["a"]), *(item("pdq", h, ["n"]) for h in near)])
    )
    world.submit(
        "beta",
        batch_doc("beta", [item("pdq", base, ["b"]), item("md5", md5(40)), item("sha256", sha256(40))]),
    )
    world.submit("acme", batch_doc("acme", remove=[("pdq", near[1])]))
    world.submit("reader", opinion_doc("reader", [("pdq", base, "negative"), ("md5", md5(40), "positive")]))
    world.submit("beta", opinion_doc("beta", [("pdq", base, "positive")]))
    world.node.change_membership(MAIN, (), [world.keys["acme2"].key_id])
    world.submit("acme", batch_doc("acme", [item("pdq", near[2], ["relabelled"])]))
    for n in range(20):
        world.submit("beta", batch_doc("beta", [item("pdq", pdq(1000 + n))]))
    return [
        (PDQ, base),
        (PDQ, near[1]),
        (PDQ, flip(near[3], 2)),
        (PDQ, pdq(1005)),
        (PDQ, pdq(9999)),
        (MD5, md5(40)),
        (SHA256, sha256(40)),
        (MD5, md5(41)),
    ]


def _answers(node: Node, queries: list[tuple[Any, str]]) -> list[list[Match]]:
    return (
        node_lookup(node, [MAIN], queries, 63)
        + node_lookup(node, [MAIN], queries, 31)
        + node_lookup(node, [MAIN], queries, 0)
    )


def test_restart_gives_the_same_answers(world: World) -> None:
    queries = _populate(world)
    before_answers = _answers(world.node, queries)
    assert any(before_answers) and not all(before_answers)
    before_state = world.state()
    note = world.node.checkpoint(MAIN)

    world.store.close()
    node = world.open()
    node.load()
    assert _answers(node, queries) == before_answers
    assert world.state() == before_state
    assert node.checkpoint(MAIN) == note
    assert open_note(note, world.hub.verifier).size == world.store.log_size(MAIN)

    # The rules carry on from where they were: seqs, revocations, listings.
    with world.store.write(MAIN) as txn:
        last = txn.last_seq(world.keys["beta"].key_id)
    world.refused("beta", batch_doc("beta", [item("pdq", pdq(41))], seq=last), 409, "stale-seq")
    world.refused("acme2", batch_doc("acme", [item("pdq", pdq(41))]), 403, "revoked-key")
    world.refused("acme", batch_doc("acme", remove=[("pdq", flip(pdq(40), 4, offset=12))]), 422, "not-listed")
    world.submit("acme", batch_doc("acme", [item("pdq", pdq(41))]))
    [[match]] = node_lookup(node, [MAIN], [(PDQ, pdq(41))], 0)
    assert match.submitters == ("acme",)


def test_replaying_the_log_into_a_fresh_store_gives_the_same_projection(world: World, tmp_path: Path) -> None:
    queries = _populate(world)
    records = world.store.entries(MAIN, 0, 10_000)
    copy_store = SqliteStore(tmp_path / "copy.sqlite3")
    try:
        copy = hub_node(copy_store, world.hub)
        copy_store.create_collection(MAIN)
        for record in records:
            accepted = copy.submit(MAIN, Envelope.parse(record.data))
            assert accepted.created and accepted.entry == record
        assert _answers(copy, queries) == _answers(world.node, queries)
        assert copy.checkpoint(MAIN) == world.node.checkpoint(MAIN)
        assert copy_store.changes_since(MAIN, 0) == world.store.changes_since(MAIN, 0)
        assert sorted(copy_store.listed(MAIN)[0]) == sorted(world.store.listed(MAIN)[0])
    finally:
        copy_store.close()
