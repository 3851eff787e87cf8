"""DSSE envelopes and v1 payload schemas (design §5, §6): known answers, round trips, refusals."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.envelope import (
    BATCH_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Addition,
    BatchPayload,
    Envelope,
    EnvelopeError,
    Grant,
    Header,
    Limits,
    MembershipPayload,
    OpinionItem,
    OpinionPayload,
    Removal,
    Signature,
    batch_payload,
    membership_payload,
    opinion_payload,
    pae,
    parse_payload,
    sign_envelope,
)
from federation.keys import SignerKey

ACME = SignerKey("acme", bytes(range(32)))
BETA = SignerKey("beta", bytes(range(1, 33)))
PDQ_HASH = "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22"
MD5_HASH = "d41d8cd98f00b204e9800998ecf8427e"
SHA_HASH = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
CREATED = "2026-11-21T19:00:00Z"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- PAE and the canonical form ---------------------------------------------------


def test_pae_known_answers() -> None:
    # The example of the DSSE specification.
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    assert pae(BATCH_TYPE, b'{"v":1}') == b'DSSEv1 34 application/vnd.hashfed.batch+json 7 {"v":1}'
    assert pae("t", b"") == b"DSSEv1 1 t 0 "
    # Lengths count bytes, not characters.
    assert pae("t\u00ff", "\u00e9\u00e9".encode()) == b"DSSEv1 3 t\xc3\xbf 4 \xc3\xa9\xc3\xa9"
    assert pae("x", b"a b\nc") == b"DSSEv1 1 x 5 a b\nc"


def test_signature_covers_pae_and_canonical_form_is_literal() -> None:
    payload = b'{"hello":"world"}'
    envelope = sign_envelope(ACME, BATCH_TYPE, payload)
    (signature,) = envelope.signatures
    assert signature.keyid == ACME.key_id
    public = Ed25519PublicKey.from_public_bytes(ACME.verifier.public)
    public.verify(signature.sig, b"DSSEv1 34 application/vnd.hashfed.batch+json 17 " + payload)
    expected = (
        f'{{"payload":"{b64(payload)}","payloadType":"application/vnd.hashfed.batch+json",'
        f'"signatures":[{{"keyid":"{ACME.key_id}","sig":"{b64(signature.sig)}"}}]}}'
    ).encode()
    assert envelope.canonical() == expected
    assert b" " not in envelope.canonical() and b"\n" not in envelope.canonical()


def test_parse_normalises_layout_and_key_order() -> None:
    envelope = sign_envelope(ACME, OPINION_TYPE, b"{}")
    loose = json.dumps(
        {
            "signatures": [{"sig": b64(envelope.signatures[0].sig), "keyid": ACME.key_id}],
            "payloadType": OPINION_TYPE,
            "payload": b64(b"{}"),
        },
        indent=2,
    )
    parsed = Envelope.parse(loose)
    assert parsed == envelope
    assert parsed.canonical() == envelope.canonical()


def test_verify_is_bound_to_key_type_and_payload() -> None:
    envelope = sign_envelope(ACME, BATCH_TYPE, b"{}")
    assert envelope.verify(ACME.verifier)
    assert not envelope.verify(BETA.verifier)
    assert not Envelope(b"{} ", BATCH_TYPE, envelope.signatures).verify(ACME.verifier)
    assert not Envelope(b"{}", OPINION_TYPE, envelope.signatures).verify(ACME.verifier)
    # Right signature under a key id that is not the key's: not accepted.
    renamed = Envelope(b"{}", BATCH_TYPE, (Signature(BETA.key_id, envelope.signatures[0].sig),))
    assert not renamed.verify(ACME.verifier)


# ---- round trips ---------------------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
seqs = st.integers(1, 2**53 - 1)
times = st.builds(
    lambda y, mo, d, h, mi, s, frac: f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}Z",
    st.integers(1970, 9999),
    st.integers(1, 12),
    st.integers(1, 28),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.sampled_from(["", ".5", ".123456789"]),
)
headers = st.builds(Header, names, names, seqs, times)
label_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, blacklist_categories=("Cs",), blacklist_characters="\x7f"),
    min_size=1,
    max_size=30,
)
labels = st.lists(label_text, max_size=4, unique=True).map(lambda x: tuple(sorted(x)))


@st.composite
def signal_hashes(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["pdq", "md5", "sha256"]))
    size = 16 if kind == "md5" else 32
    return kind, draw(st.binary(min_size=size, max_size=size)).hex()


unique_hashes = st.lists(signal_hashes(), min_size=1, max_size=12, unique=True)


@st.composite
def batches(draw: st.DrawFn) -> tuple[Header, str, tuple[Addition, ...], tuple[Removal, ...]]:
    items = draw(unique_hashes)
    cut = draw(st.integers(0, len(items)))
    add = []
    for kind, value in items[:cut]:
        quality = draw(st.none() | st.integers(50, 100)) if kind == "pdq" else None
        add.append(Addition(kind, value, draw(labels), quality))
    remove = tuple(Removal(kind, value) for kind, value in items[cut:])
    return draw(headers), draw(names), tuple(add), remove


def check_round_trip(signer: SignerKey, payload_type: str, payload: bytes) -> Envelope:
    envelope = sign_envelope(signer, payload_type, payload)
    data = envelope.canonical()
    assert (
        data
        == (
            f'{{"payload":"{b64(payload)}","payloadType":"{payload_type}",'
            f'"signatures":[{{"keyid":"{signer.key_id}","sig":"{b64(envelope.signatures[0].sig)}"}}]}}'
        ).encode()
    )
    parsed = Envelope.parse(data)
    assert parsed == envelope
    assert parsed.canonical() == data
    assert parsed.verify(signer.verifier)
    return parsed


@settings(max_examples=60, deadline=None)
@given(batches())
def test_batch_round_trip(batch: tuple[Header, str, tuple[Addition, ...], tuple[Removal, ...]]) -> None:
    header, member, add, remove = batch
    parsed = check_round_trip(ACME, BATCH_TYPE, batch_payload(header, member, add, remove))
    assert parse_payload(parsed.payload_type, parsed.payload) == BatchPayload(header, member, add, remove)


@settings(max_examples=40, deadline=None)
@given(
    headers,
    names,
    unique_hashes,
    st.lists(st.sampled_from(["positive", "negative", "withdrawn"]), min_size=12, max_size=12),
    st.lists(st.none() | label_text, min_size=12, max_size=12),
)
def test_opinion_round_trip(
    header: Header,
    member: str,
    items: list[tuple[str, str]],
    verdicts: list[str],
    notes: list[str | None],
) -> None:
    opinions = tuple(
        OpinionItem(kind, value, verdict, note)
        for (kind, value), verdict, note in zip(items, verdicts, notes, strict=False)
    )
    parsed = check_round_trip(BETA, OPINION_TYPE, opinion_payload(header, member, opinions))
    assert parse_payload(OPINION_TYPE, parsed.payload) == OpinionPayload(header, member, opinions)


@settings(max_examples=30, deadline=None)
@given(
    headers,
    st.lists(st.tuples(names, st.binary(min_size=32, max_size=32)), max_size=4, unique_by=lambda x: x[1]),
    st.lists(st.sampled_from([("read",), ("write",), ("read", "write")]), min_size=4, max_size=4),
    st.lists(st.tuples(names, st.binary(min_size=4, max_size=4)), max_size=3, unique=True),
)
def test_membership_round_trip(
    header: Header,
    keys: list[tuple[str, bytes]],
    rights: list[tuple[str, ...]],
    revoked: list[tuple[str, bytes]],
) -> None:
    grants = tuple(
        Grant(SignerKey(name, seed).verifier, frozenset(r))
        for (name, seed), r in zip(keys, rights, strict=False)
    )
    revoke = tuple(f"{name}+{raw.hex()}" for name, raw in revoked)
    if len({g.key.key_id for g in grants} | set(revoke)) != len(grants) + len(revoke):
        return
    hub = SignerKey("hub", bytes(32))
    parsed = check_round_trip(hub, MEMBERSHIP_TYPE, membership_payload(header, grants, revoke))
    assert parse_payload(MEMBERSHIP_TYPE, parsed.payload) == MembershipPayload(header, grants, revoke)


# ---- payload refusals ---------------------------------------------------------------


def base_batch() -> dict[str, Any]:
    return {
        "v": 1,
        "federation": "fed",
        "collection": "main",
        "member": "acme",
        "seq": 7,
        "created": CREATED,
        "add": [{"type": "pdq", "hash": PDQ_HASH, "labels": ["csam"], "quality": 80}],
        "remove": [{"type": "md5", "hash": MD5_HASH}],
    }


def base_opinion() -> dict[str, Any]:
    return {
        "v": 1,
        "federation": "fed",
        "collection": "main",
        "member": "acme",
        "seq": 7,
        "created": CREATED,
        "opinions": [{"type": "sha256", "hash": SHA_HASH, "verdict": "negative", "note": "a cat"}],
    }


def base_membership() -> dict[str, Any]:
    return {
        "v": 1,
        "federation": "fed",
        "collection": "main",
        "seq": 7,
        "created": CREATED,
        "grant": [{"member": "acme", "key": ACME.verifier.encode(), "rights": ["read", "write"]}],
        "revoke": [{"key": BETA.key_id}],
    }


BASES = {BATCH_TYPE: base_batch, OPINION_TYPE: base_opinion, MEMBERSHIP_TYPE: base_membership}


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_the_bases_are_accepted() -> None:
    batch = parse_payload(BATCH_TYPE, encode(base_batch()))
    assert isinstance(batch, BatchPayload)
    assert batch.add == (Addition("pdq", PDQ_HASH, ("csam",), 80),)
    assert batch.remove == (Removal("md5", MD5_HASH),)
    assert isinstance(parse_payload(OPINION_TYPE, encode(base_opinion())), OpinionPayload)
    membership = parse_payload(MEMBERSHIP_TYPE, encode(base_membership()))
    assert isinstance(membership, MembershipPayload)
    assert membership.grant[0].member == "acme" and membership.revoke == (BETA.key_id,)


def variant(payload_type: str, path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """The base payload with the value at ``path`` replaced (``...`` deletes it)."""
    obj = BASES[payload_type]()
    target = obj
    for step in path[:-1]:
        target = target[step]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return obj


def nan_payload() -> bytes:
    return encode(base_batch()).replace(b'"quality": 80', b'"quality": NaN')


REFUSED: dict[str, tuple[str, bytes]] = {
    "unknown field": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("extra",), 1))),
    "unknown item field": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "note"), "x"))),
    "unknown removal field": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("remove", 0, "labels"), []))),
    "seq is a bool": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), True))),
    "seq is a string": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), "7"))),
    "seq is a float": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), 7.0))),
    "seq 0": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), 0))),
    "seq negative": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), -1))),
    "seq 2^53": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), 2**53))),
    "seq null": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("seq",), None))),
    "v is a string": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("v",), "1"))),
    "v is true": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("v",), True))),
    "v is 2": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("v",), 2))),
    "v is a float": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("v",), 1.0))),
    "created with a space": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-11-21 19:00:00Z"))),
    "created with an offset": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("created",), "2026-11-21T19:00:00+00:00")),
    ),
    "created without zone": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-11-21T19:00:00"))),
    "created a date only": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-11-21"))),
    "created month 13": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-13-01T00:00:00Z"))),
    "created February 30": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-02-30T00:00:00Z"))),
    "created hour 24": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), "2026-11-21T24:00:00Z"))),
    "created an epoch number": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("created",), 1_790_000_000))),
    "created with non-ASCII digits": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("created",), "\u0662\u0660\u0662\u0666-11-21T19:00:00Z")),
    ),
    "created with a trailing newline": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("created",), CREATED + "\n")),
    ),
    "duplicate JSON key": (BATCH_TYPE, encode(base_batch())[:-1] + b', "seq": 8}'),
    "duplicate JSON key in an item": (
        BATCH_TYPE,
        encode(base_batch()).replace(b'"quality": 80', b'"quality": 80, "quality": 90'),
    ),
    "NaN": (BATCH_TYPE, nan_payload()),
    "Infinity": (BATCH_TYPE, encode(base_batch()).replace(b'"seq": 7', b'"seq": Infinity')),
    "-Infinity": (BATCH_TYPE, encode(base_batch()).replace(b'"seq": 7', b'"seq": -Infinity')),
    "not UTF-8": (BATCH_TYPE, encode(base_batch()).replace(b"csam", b"cs\xffam")),
    "trailing garbage": (BATCH_TYPE, encode(base_batch()) + b"x"),
    "not an object": (BATCH_TYPE, b"[1]"),
    "hash with a non-hex digit": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("add", 0, "hash"), "g" + PDQ_HASH[1:])),
    ),
    "hash one digit short": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "hash"), PDQ_HASH[:-1]))),
    "hash one digit long": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "hash"), PDQ_HASH + "0"))),
    "md5 of sha256 length": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("remove", 0, "hash"), SHA_HASH))),
    "hash with 0x": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("remove", 0, "hash"), "0x" + MD5_HASH[2:]))),
    "hash a number": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("remove", 0, "hash"), 12))),
    "unknown signal type": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "type"), "PDQ"))),
    "quality 49": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), 49))),
    "quality 101": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), 101))),
    "quality a float": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), 80.0))),
    "quality a string": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), "80"))),
    "quality a bool": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), True))),
    "quality null": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), None))),
    "quality on md5": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("add", 0), {"type": "md5", "hash": "a" * 32, "quality": 90})),
    ),
    "quality on sha256": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("add", 0), {"type": "sha256", "hash": "a" * 64, "quality": 90})),
    ),
    "labels not a list": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), "csam"))),
    "label not a string": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), [1]))),
    "label empty": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), [""]))),
    "label with a control character": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("add", 0, "labels"), ["a\nb"])),
    ),
    "label too long": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), ["x" * 129]))),
    "33 labels": (
        BATCH_TYPE,
        encode(variant(BATCH_TYPE, ("add", 0, "labels"), [f"l{i}" for i in range(33)])),
    ),
    "add not a list": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add",), {"type": "pdq"}))),
    "item not an object": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0), PDQ_HASH))),
    "empty batch": (BATCH_TYPE, encode({**base_batch(), "add": [], "remove": []})),
    "duplicate hash in add": (BATCH_TYPE, encode({**base_batch(), "add": [base_batch()["add"][0]] * 2})),
    "same hash added and removed": (
        BATCH_TYPE,
        encode({**base_batch(), "remove": [{"type": "pdq", "hash": PDQ_HASH}]}),
    ),
    "duplicate hash differing in case": (
        BATCH_TYPE,
        encode({**base_batch(), "remove": [{"type": "pdq", "hash": PDQ_HASH.upper()}]}),
    ),
    "bad federation name": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("federation",), "a fed"))),
    "federation not a string": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("federation",), ["fed"]))),
    "empty collection": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("collection",), ""))),
    "bad member name": (BATCH_TYPE, encode(variant(BATCH_TYPE, ("member",), "acme+1234abcd"))),
    "verdict unknown": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("opinions", 0, "verdict"), "maybe"))),
    "verdict upper-case": (
        OPINION_TYPE,
        encode(variant(OPINION_TYPE, ("opinions", 0, "verdict"), "Positive")),
    ),
    "verdict missing": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("opinions", 0, "verdict"), ...))),
    "note too long": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("opinions", 0, "note"), "n" * 1001))),
    "note empty": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("opinions", 0, "note"), ""))),
    "no opinions": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("opinions",), []))),
    "duplicate opinion": (
        OPINION_TYPE,
        encode(variant(OPINION_TYPE, ("opinions",), base_opinion()["opinions"] * 2)),
    ),
    "opinion payload with add": (OPINION_TYPE, encode(variant(OPINION_TYPE, ("add",), []))),
    "rights unknown": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "rights"), ["read", "admin"])),
    ),
    "rights empty": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "rights"), []))),
    "rights repeated": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "rights"), ["read", "read"])),
    ),
    "rights a string": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "rights"), "read"))),
    "rights unhashable": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "rights"), [["read"]])),
    ),
    "grant member is not the key name": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "member"), "beta")),
    ),
    "grant member missing": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "member"), ...))),
    "grant key is a key id": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "key"), ACME.key_id)),
    ),
    "grant key is a signer key": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "key"), ACME.encode())),
    ),
    "grant key not a string": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("grant", 0, "key"), 5))),
    "revoke a full key": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("revoke", 0, "key"), BETA.verifier.encode())),
    ),
    "revoke a bare name": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("revoke", 0, "key"), "beta"))),
    "grant and revoke one key": (
        MEMBERSHIP_TYPE,
        encode(variant(MEMBERSHIP_TYPE, ("revoke", 0, "key"), ACME.key_id)),
    ),
    "membership with member": (MEMBERSHIP_TYPE, encode(variant(MEMBERSHIP_TYPE, ("member",), "acme"))),
}


@pytest.mark.parametrize(("payload_type", "payload"), REFUSED.values(), ids=REFUSED.keys())
def test_payload_refusals(payload_type: str, payload: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_payload(payload_type, payload)


@pytest.mark.parametrize(
    ("payload_type", "field"),
    [(t, f) for t, base in BASES.items() for f in base()],
)
def test_every_missing_field_is_refused(payload_type: str, field: str) -> None:
    with pytest.raises(EnvelopeError, match="missing"):
        parse_payload(payload_type, encode(variant(payload_type, (field,), ...)))


@pytest.mark.parametrize("field", ["type", "hash"])
def test_missing_item_fields_are_refused(field: str) -> None:
    with pytest.raises(EnvelopeError):
        parse_payload(BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, field), ...)))
    with pytest.raises(EnvelopeError):
        parse_payload(BATCH_TYPE, encode(variant(BATCH_TYPE, ("remove", 0, field), ...)))


def test_unknown_payload_type_is_refused() -> None:
    with pytest.raises(EnvelopeError):
        parse_payload("application/json", encode(base_batch()))


def test_upper_case_hashes_are_accepted_and_normalised() -> None:
    obj = base_batch()
    obj["add"][0]["hash"] = PDQ_HASH.upper()
    obj["remove"][0]["hash"] = MD5_HASH.upper()
    parsed = parse_payload(BATCH_TYPE, encode(obj))
    assert isinstance(parsed, BatchPayload)
    assert parsed.add[0].hash == PDQ_HASH and parsed.remove[0].hash == MD5_HASH


@pytest.mark.parametrize("quality", [50, 51, 99, 100])
def test_pdq_quality_from_50_is_accepted(quality: int) -> None:
    parsed = parse_payload(BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "quality"), quality)))
    assert isinstance(parsed, BatchPayload) and parsed.add[0].quality == quality


def test_labels_are_deduplicated_and_sorted_and_optional() -> None:
    parsed = parse_payload(BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), ["b", "a", "b"])))
    assert isinstance(parsed, BatchPayload) and parsed.add[0].labels == ("a", "b")
    parsed = parse_payload(BATCH_TYPE, encode(variant(BATCH_TYPE, ("add", 0, "labels"), ...)))
    assert isinstance(parsed, BatchPayload) and parsed.add[0].labels == ()


def test_item_limits() -> None:
    def batch_of(adds: int, removes: int) -> bytes:
        obj = base_batch()
        obj["add"] = [{"type": "md5", "hash": f"{i:032x}"} for i in range(adds)]
        obj["remove"] = [{"type": "md5", "hash": f"{i:032x}"} for i in range(adds, adds + removes)]
        return encode(obj)

    with pytest.raises(EnvelopeError, match="100000"):
        parse_payload(BATCH_TYPE, batch_of(50_000, 50_001))
    with pytest.raises(EnvelopeError):
        parse_payload(BATCH_TYPE, batch_of(100_001, 0))
    parsed = parse_payload(BATCH_TYPE, batch_of(0, 100_000))
    assert isinstance(parsed, BatchPayload) and len(parsed.remove) == 100_000
    # The boundary, with a hub's tighter limit.
    small = Limits(max_items=10)
    assert isinstance(parse_payload(BATCH_TYPE, batch_of(4, 6), small), BatchPayload)
    with pytest.raises(EnvelopeError):
        parse_payload(BATCH_TYPE, batch_of(5, 6), small)
    opinions = [{"type": "md5", "hash": f"{i:032x}", "verdict": "positive"} for i in range(11)]
    with pytest.raises(EnvelopeError):
        parse_payload(OPINION_TYPE, encode({**base_opinion(), "opinions": opinions}), small)
    assert isinstance(
        parse_payload(OPINION_TYPE, encode({**base_opinion(), "opinions": opinions[:10]}), small),
        OpinionPayload,
    )


# ---- envelope refusals -------------------------------------------------------------------

GOOD = sign_envelope(ACME, BATCH_TYPE, encode(base_batch()))
GOOD_JSON = GOOD.to_json()
GOOD_SIG = GOOD_JSON["signatures"][0]


def envelope_with(**changes: Any) -> bytes:
    obj = {**copy.deepcopy(GOOD_JSON), **changes}
    return encode({k: v for k, v in obj.items() if v is not ...})


BAD_ENVELOPES = {
    "two signatures": envelope_with(signatures=[GOOD_SIG, GOOD_SIG]),
    "no signatures": envelope_with(signatures=[]),
    "signatures an object": envelope_with(signatures=GOOD_SIG),
    "missing payload": envelope_with(payload=...),
    "missing payloadType": envelope_with(payloadType=...),
    "missing signatures": envelope_with(signatures=...),
    "extra field": envelope_with(extra="x"),
    "unknown payload type": envelope_with(payloadType="application/json"),
    "payload type not a string": envelope_with(payloadType=1),
    "payload not base64": envelope_with(payload="not base64!"),
    "payload url-safe base64": envelope_with(payload=b64(b"\xfb\xff").replace("+", "-").replace("/", "_")),
    "payload without padding": envelope_with(payload=b64(b"ab").rstrip("=")),
    "payload not a string": envelope_with(payload=[1]),
    "keyid without hash": envelope_with(signatures=[{**GOOD_SIG, "keyid": "acme"}]),
    "keyid upper-case hash": envelope_with(signatures=[{**GOOD_SIG, "keyid": ACME.key_id.upper()}]),
    "keyid a full key": envelope_with(signatures=[{**GOOD_SIG, "keyid": ACME.verifier.encode()}]),
    "sig 63 bytes": envelope_with(signatures=[{**GOOD_SIG, "sig": b64(GOOD.signatures[0].sig[:63])}]),
    "sig 65 bytes": envelope_with(signatures=[{**GOOD_SIG, "sig": b64(GOOD.signatures[0].sig + b"\0")}]),
    "sig not a string": envelope_with(signatures=[{**GOOD_SIG, "sig": 5}]),
    "signature extra field": envelope_with(signatures=[{**GOOD_SIG, "cert": "x"}]),
    "signature missing keyid": envelope_with(signatures=[{"sig": GOOD_SIG["sig"]}]),
    "not an object": b'"envelope"',
    "empty": b"",
    "duplicate key": GOOD.canonical()[:-1] + b',"payload":"e30="}',
    "not UTF-8": b'{"payload":"\xff"}',
}


@pytest.mark.parametrize("data", BAD_ENVELOPES.values(), ids=BAD_ENVELOPES.keys())
def test_envelope_refusals(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Envelope.parse(data)


def test_the_envelope_fixture_is_valid() -> None:
    assert Envelope.parse(envelope_with()) == GOOD


# ---- only EnvelopeError comes out ------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.sampled_from([PDQ_HASH, MD5_HASH, "pdq", "md5", "positive", "read", ACME.key_id, CREATED, 1]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=16,
)


def only_envelope_errors(payload_type: str | None, data: bytes) -> None:
    try:
        if payload_type is None:
            Envelope.parse(data)
        else:
            parse_payload(payload_type, data)
    except EnvelopeError:
        pass


fuzz = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fuzz
@given(st.binary(max_size=200))
def test_fuzz_bytes(data: bytes) -> None:
    only_envelope_errors(None, data)
    for payload_type in BASES:
        only_envelope_errors(payload_type, data)


@fuzz
@given(json_values)
def test_fuzz_json(value: Any) -> None:
    data = json.dumps(value).encode()
    only_envelope_errors(None, data)
    for payload_type in BASES:
        only_envelope_errors(payload_type, data)


@fuzz
@given(st.dictionaries(st.sampled_from(["payload", "payloadType", "signatures", "x"]), json_values))
def test_fuzz_envelope_shapes(value: dict[str, Any]) -> None:
    only_envelope_errors(None, json.dumps(value).encode())


@fuzz
@given(st.sampled_from(list(BASES)), st.data())
def test_fuzz_mutated_payloads(payload_type: str, data: st.DataObject) -> None:
    """A valid payload with one value, anywhere in it, replaced by arbitrary JSON."""
    obj = BASES[payload_type]()
    target: Any = obj
    while True:
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        key = data.draw(st.sampled_from(keys))
        child = target[key]
        if isinstance(child, dict | list) and child and data.draw(st.booleans()):
            target = child
            continue
        target[key] = data.draw(json_values)
        break
    only_envelope_errors(payload_type, json.dumps(obj).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b'{"payload":' + b"1" * 5000 + b"}",
        b'{"seq":' + b"9" * 10_000 + b"}",
    ],
    ids=["deeply nested array", "deeply nested object", "5000-digit integer", "10000-digit integer"],
)
def test_hostile_json_gives_envelope_error(data: bytes) -> None:
    """Bodies well under the 64 MiB limit that make json.loads raise RecursionError / ValueError."""
    with pytest.raises(EnvelopeError):
        Envelope.parse(data)
    for payload_type in BASES:
        with pytest.raises(EnvelopeError):
            parse_payload(payload_type, data)
