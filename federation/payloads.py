"""The v1 payload schemas (design §5): batch, opinion and membership payloads, and the hub-key
payload added to v1 for hub key rotation (docs/protocol.md).

Parsing here is strict and context-free: it checks shape, types, limits and
hash formats. Whether the signer may do what a payload asks (rights, ``seq``,
federation binding, removals) is decided against the projection in
:mod:`federation.state`. The builders write the canonical JSON a member or
the hub signs. The DSSE envelope that carries a payload is in
:mod:`federation.envelope`, which re-exports every public name here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .keys import KEY_ID_PATTERN, KeyFormatError, VerifierKey, check_name
from .signals import Frame, SignalError, signal_type
from .strictjson import EnvelopeError, compact_json, exact_keys, strict_json

BATCH_TYPE = "application/vnd.hashfed.batch+json"
OPINION_TYPE = "application/vnd.hashfed.opinion+json"
MEMBERSHIP_TYPE = "application/vnd.hashfed.membership+json"
HUB_KEY_TYPE = "application/vnd.hashfed.hub-key+json"
PAYLOAD_TYPES = (BATCH_TYPE, OPINION_TYPE, MEMBERSHIP_TYPE, HUB_KEY_TYPE)
HUB_PAYLOAD_TYPES = (MEMBERSHIP_TYPE, HUB_KEY_TYPE)
"""Payloads only the hub key in force may sign."""
MAX_OVERLAP_SECONDS = 90 * 24 * 3600
VERDICTS = ("positive", "negative", "withdrawn")
RIGHTS = ("read", "write")
MAX_SEQ = 2**53 - 1
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?Z")


@dataclass(frozen=True)
class Limits:
    """Size limits on a payload; the hub's configuration may tighten them."""

    max_items: int = 100_000
    max_labels_per_item: int = 32
    max_label_length: int = 128
    max_note_length: int = 1_000


@dataclass(frozen=True)
class Header:
    federation: str
    collection: str
    seq: int
    created: str


@dataclass(frozen=True)
class Addition:
    signal: str
    hash: str
    labels: tuple[str, ...] = ()
    quality: int | None = None
    frames: tuple[Frame, ...] | None = None
    """A video's frames (vpdq); its ``hash`` is computed from them."""


@dataclass(frozen=True)
class Removal:
    signal: str
    hash: str


@dataclass(frozen=True)
class OpinionItem:
    signal: str
    hash: str
    verdict: str
    note: str | None = None


@dataclass(frozen=True)
class Grant:
    key: VerifierKey
    rights: frozenset[str]

    @property
    def member(self) -> str:
        return self.key.name


@dataclass(frozen=True)
class BatchPayload:
    header: Header
    member: str
    add: tuple[Addition, ...] = ()
    remove: tuple[Removal, ...] = ()


@dataclass(frozen=True)
class OpinionPayload:
    header: Header
    member: str
    opinions: tuple[OpinionItem, ...] = ()


@dataclass(frozen=True)
class MembershipPayload:
    header: Header
    grant: tuple[Grant, ...] = ()
    revoke: tuple[str, ...] = field(default=())


@dataclass(frozen=True)
class HubKeyPayload:
    """A hub key rotation: ``previous`` (the key in force, which signs this) hands over to ``key``."""

    header: Header
    previous: VerifierKey
    key: VerifierKey
    overlap_seconds: int
    """For this long after ``created`` the hub signs checkpoints with both keys."""

    @property
    def overlap_until(self) -> int:
        """Unix time at which checkpoints by ``previous`` stop being accepted."""
        created = datetime.strptime(self.header.created[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
        return int(created.timestamp()) + self.overlap_seconds


Payload = BatchPayload | OpinionPayload | MembershipPayload | HubKeyPayload


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _string(value: Any, where: str, max_length: int) -> str:
    if not isinstance(value, str) or not value:
        raise EnvelopeError(f"{where} must be a non-empty string")
    if len(value) > max_length:
        raise EnvelopeError(f"{where} is longer than {max_length} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
        raise EnvelopeError(f"{where} contains a control character")
    return value


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise EnvelopeError(f"{where} must be a string")
    try:
        return check_name(value)
    except KeyFormatError as exc:
        raise EnvelopeError(f"{where}: {exc}") from exc


def _header(obj: dict[str, Any]) -> Header:
    if type(obj["v"]) is not int or obj["v"] != 1:
        raise EnvelopeError(f"payload version v must be 1, got {obj['v']!r}")
    seq = obj["seq"]
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq <= MAX_SEQ:
        raise EnvelopeError(f"payload seq must be an integer from 1 to {MAX_SEQ}")
    created = obj["created"]
    if not isinstance(created, str) or not _TIME.fullmatch(created):
        raise EnvelopeError("payload created must be an RFC 3339 UTC time like 2026-11-21T19:00:00Z")
    try:
        datetime.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError as exc:
        raise EnvelopeError(f"payload created {created!r} is not a real date and time") from exc
    return Header(
        federation=_name(obj["federation"], "payload federation"),
        collection=_name(obj["collection"], "payload collection"),
        seq=seq,
        created=created,
    )


def _items(obj: dict[str, Any], key: str) -> list[Any]:
    items = obj[key]
    if not isinstance(items, list):
        raise EnvelopeError(f"payload {key} must be a list")
    return items


def _signal_and_hash(item: dict[str, Any], where: str) -> tuple[str, str]:
    try:
        signal = signal_type(item["type"])
        return signal.name, signal.parse(item["hash"])
    except SignalError as exc:
        raise EnvelopeError(f"{where}: {exc}") from exc


def _check_unique(keys: list[tuple[str, str]], where: str) -> None:
    seen: set[tuple[str, str]] = set()
    for signal, value in keys:
        if (signal, value) in seen:
            raise EnvelopeError(f"{where} lists {signal} hash {value} more than once")
        seen.add((signal, value))


def _parse_addition(item: Any, where: str, limits: Limits) -> Addition:
    exact_keys(item, where, required=("type", "hash"), optional=("labels", "quality", "frames"))
    signal, value = _signal_and_hash(item, where)
    labels_value = item.get("labels", [])
    if not isinstance(labels_value, list):
        raise EnvelopeError(f"{where}.labels must be a list of strings")
    if len(labels_value) > limits.max_labels_per_item:
        raise EnvelopeError(f"{where} has more than {limits.max_labels_per_item} labels")
    labels = [
        _string(label, f"{where}.labels[{n}]", limits.max_label_length)
        for n, label in enumerate(labels_value)
    ]
    try:
        quality, frames = signal_type(signal).parse_extras(item, value)
    except SignalError as exc:
        raise EnvelopeError(f"{where}: {exc}") from exc
    return Addition(signal, value, tuple(sorted(set(labels))), quality, frames)


def _parse_batch(obj: Any, limits: Limits) -> BatchPayload:
    exact_keys(
        obj,
        "batch payload",
        ("v", "federation", "collection", "member", "seq", "created", "add", "remove"),
    )
    header = _header(obj)
    add_items, remove_items = _items(obj, "add"), _items(obj, "remove")
    if not add_items and not remove_items:
        raise EnvelopeError("batch payload is empty: add and remove may not both be empty")
    if len(add_items) + len(remove_items) > limits.max_items:
        raise EnvelopeError(f"batch payload has more than {limits.max_items} items in add and remove")
    add = tuple(_parse_addition(item, f"add[{n}]", limits) for n, item in enumerate(add_items))
    remove = []
    for n, item in enumerate(remove_items):
        exact_keys(item, f"remove[{n}]", required=("type", "hash"))
        remove.append(Removal(*_signal_and_hash(item, f"remove[{n}]")))
    keys = [(a.signal, a.hash) for a in add] + [(r.signal, r.hash) for r in remove]
    _check_unique(keys, "batch payload")
    return BatchPayload(header, _name(obj["member"], "payload member"), add, tuple(remove))


def _parse_opinion(obj: Any, limits: Limits) -> OpinionPayload:
    exact_keys(
        obj,
        "opinion payload",
        ("v", "federation", "collection", "member", "seq", "created", "opinions"),
    )
    header = _header(obj)
    items = _items(obj, "opinions")
    if not items:
        raise EnvelopeError("opinion payload is empty: opinions may not be empty")
    if len(items) > limits.max_items:
        raise EnvelopeError(f"opinion payload has more than {limits.max_items} opinions")
    opinions = []
    for n, item in enumerate(items):
        where = f"opinions[{n}]"
        exact_keys(item, where, required=("type", "hash", "verdict"), optional=("note",))
        signal, value = _signal_and_hash(item, where)
        verdict = item["verdict"]
        if verdict not in VERDICTS:
            raise EnvelopeError(f"{where}.verdict must be one of {', '.join(VERDICTS)}")
        note = None
        if "note" in item:
            note = _string(item["note"], f"{where}.note", limits.max_note_length)
        opinions.append(OpinionItem(signal, value, verdict, note))
    _check_unique([(o.signal, o.hash) for o in opinions], "opinion payload")
    return OpinionPayload(header, _name(obj["member"], "payload member"), tuple(opinions))


def _parse_membership(obj: Any, limits: Limits) -> MembershipPayload:
    exact_keys(
        obj,
        "membership payload",
        ("v", "federation", "collection", "seq", "created", "grant", "revoke"),
    )
    header = _header(obj)
    grant_items, revoke_items = _items(obj, "grant"), _items(obj, "revoke")
    if len(grant_items) + len(revoke_items) > limits.max_items:
        raise EnvelopeError(f"membership payload has more than {limits.max_items} items")
    grants = []
    for n, item in enumerate(grant_items):
        where = f"grant[{n}]"
        exact_keys(item, where, required=("member", "key", "rights"))
        if not isinstance(item["key"], str):
            raise EnvelopeError(f"{where}.key must be a verifier key string")
        try:
            key = VerifierKey.parse(item["key"])
        except KeyFormatError as exc:
            raise EnvelopeError(f"{where}.key: {exc}") from exc
        if item["member"] != key.name:
            raise EnvelopeError(f"{where}.member must be the key's name {key.name!r}")
        rights = item["rights"]
        if (
            not isinstance(rights, list)
            or not rights
            or any(r not in RIGHTS for r in rights)
            or len(set(rights)) != len(rights)
        ):
            raise EnvelopeError(f"{where}.rights must be a non-empty list of distinct 'read', 'write'")
        grants.append(Grant(key, frozenset(rights)))
    revokes = []
    for n, item in enumerate(revoke_items):
        exact_keys(item, f"revoke[{n}]", required=("key",))
        key_id = item["key"]
        if not isinstance(key_id, str) or not KEY_ID_PATTERN.fullmatch(key_id):
            raise EnvelopeError(f"revoke[{n}].key must be a key id <name>+<8 hex digits>")
        revokes.append(key_id)
    mentioned = [g.key.key_id for g in grants] + revokes
    if len(set(mentioned)) != len(mentioned):
        raise EnvelopeError("membership payload names the same key more than once")
    return MembershipPayload(header, tuple(grants), tuple(revokes))


def _parse_hub_key(obj: Any, limits: Limits) -> HubKeyPayload:
    exact_keys(
        obj,
        "hub-key payload",
        ("v", "federation", "collection", "seq", "created", "previous", "key", "overlap_seconds"),
    )
    header = _header(obj)
    keys = []
    for name in ("previous", "key"):
        if not isinstance(obj[name], str):
            raise EnvelopeError(f"hub-key payload {name} must be a verifier key string")
        try:
            keys.append(VerifierKey.parse(obj[name]))
        except KeyFormatError as exc:
            raise EnvelopeError(f"hub-key payload {name}: {exc}") from exc
    previous, key = keys
    if key.name != previous.name:
        raise EnvelopeError(
            f"hub-key payload key must keep the hub's name {previous.name!r} (checkpoints are signed in it)"
        )
    if key.key_id == previous.key_id:
        raise EnvelopeError("hub-key payload key must differ from previous")
    overlap = obj["overlap_seconds"]
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap <= MAX_OVERLAP_SECONDS:
        raise EnvelopeError(
            f"hub-key payload overlap_seconds must be an integer from 0 to {MAX_OVERLAP_SECONDS}"
        )
    return HubKeyPayload(header, previous, key, overlap)


_PARSERS: Mapping[str, Callable[[Any, Limits], Payload]] = {
    BATCH_TYPE: _parse_batch,
    OPINION_TYPE: _parse_opinion,
    MEMBERSHIP_TYPE: _parse_membership,
    HUB_KEY_TYPE: _parse_hub_key,
}


def parse_payload(payload_type: str, payload: bytes, limits: Limits | None = None) -> Payload:
    if payload_type not in _PARSERS:
        raise EnvelopeError(f"unknown payload type {payload_type!r}")
    return _PARSERS[payload_type](strict_json(payload, "payload"), limits or Limits())


# ---- builders, for members and the hub ------------------------------------


def _document(header: Header, member: str | None, body: dict[str, Any]) -> bytes:
    """A payload in the field order of the wire format: v, federation, collection, member, seq, created, body."""
    document: dict[str, Any] = {"v": 1, "federation": header.federation, "collection": header.collection}
    if member is not None:
        document["member"] = member
    document.update(seq=header.seq, created=header.created)
    document.update(body)
    return compact_json(document)


def batch_payload(
    header: Header,
    member: str,
    add: list[Addition] | tuple[Addition, ...] = (),
    remove: list[Removal] | tuple[Removal, ...] = (),
) -> bytes:
    def addition(item: Addition) -> dict[str, Any]:
        out: dict[str, Any] = {"type": item.signal, "hash": item.hash, "labels": list(item.labels)}
        if item.quality is not None:
            out["quality"] = item.quality
        if item.frames is not None:
            out["frames"] = [frame_json(frame) for frame in item.frames]
        return out

    return _document(
        header,
        member,
        {
            "add": [addition(item) for item in add],
            "remove": [{"type": item.signal, "hash": item.hash} for item in remove],
        },
    )


def query_json(item: Addition, max_distance: int | None = None) -> dict[str, Any]:
    """A lookup query object for a hash read from a file (a video's query carries its frames)."""
    out: dict[str, Any] = {"type": item.signal, "hash": item.hash}
    if item.frames is not None:
        out["frames"] = [frame_json(frame) for frame in item.frames]
    if max_distance is not None:
        out["max_distance"] = max_distance
    return out


def frame_json(frame: Frame) -> dict[str, Any]:
    out: dict[str, Any] = {"pdq": frame.pdq, "quality": frame.quality}
    if frame.time is not None:
        out["time"] = frame.time
    return out


def opinion_payload(
    header: Header, member: str, opinions: list[OpinionItem] | tuple[OpinionItem, ...]
) -> bytes:
    def opinion(item: OpinionItem) -> dict[str, Any]:
        out: dict[str, Any] = {"type": item.signal, "hash": item.hash, "verdict": item.verdict}
        if item.note is not None:
            out["note"] = item.note
        return out

    return _document(header, member, {"opinions": [opinion(item) for item in opinions]})


def membership_payload(
    header: Header,
    grant: list[Grant] | tuple[Grant, ...] = (),
    revoke: list[str] | tuple[str, ...] = (),
) -> bytes:
    grants = [
        {"member": g.member, "key": g.key.encode(), "rights": [r for r in RIGHTS if r in g.rights]}
        for g in grant
    ]
    return _document(header, None, {"grant": grants, "revoke": [{"key": key_id} for key_id in revoke]})


def hub_key_payload(header: Header, previous: VerifierKey, key: VerifierKey, overlap_seconds: int) -> bytes:
    return _document(
        header,
        None,
        {"previous": previous.encode(), "key": key.encode(), "overlap_seconds": overlap_seconds},
    )
