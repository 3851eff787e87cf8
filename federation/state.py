"""The projection of a log, and the one function that applies an entry to it.

Everything a hub (or a mirror) knows beyond the log itself is derived here:
members and their keys and rights, each signer's last ``seq``, which member
lists which hash with which labels, and opinions. :func:`check_entry` decides
whether an envelope may be appended (raising :class:`Refusal` otherwise), and
:func:`apply_entry` records its effect. Ingest, restart replay and sync all
call these two functions, against whatever storage implements
:class:`Projection`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .envelope import (
    BATCH_TYPE,
    HUB_PAYLOAD_TYPES,
    MEMBERSHIP_TYPE,
    BatchPayload,
    Envelope,
    HubKeyPayload,
    MembershipPayload,
    OpinionPayload,
    Payload,
)
from .keys import VerifierKey
from .signals import signal_type


class Refusal(Exception):
    """An entry that may not be appended. ``status`` and ``kind`` shape the HTTP problem."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class KeyRecord:
    key: VerifierKey
    rights: frozenset[str]
    granted_index: int
    revoked_index: int | None = None

    @property
    def member(self) -> str:
        return self.key.name

    @property
    def active(self) -> bool:
        return self.revoked_index is None


@dataclass(frozen=True)
class LogContext:
    """What a log is bound to: a federation, a collection and the hub that signs membership."""

    federation: str
    collection: str
    hub_key: VerifierKey
    """The hub key the log started with; rotations recorded in the projection hand it on."""


@dataclass(frozen=True)
class HubKeyRecord:
    """A hub key of a log, from the rotation entry at ``index`` that made it the key in force."""

    key: VerifierKey
    index: int
    previous: VerifierKey
    previous_until: int
    """Unix time until which checkpoints signed by ``previous`` are still accepted (the overlap)."""


def hub_key_in_force(context: LogContext, view: Projection) -> VerifierKey:
    """The key that signs this log's membership entries, rotations and checkpoints from here on."""
    rotations = view.hub_keys()
    return rotations[-1].key if rotations else context.hub_key


@dataclass(frozen=True)
class ListingChange:
    """A hash entering (``listed``) or leaving the set of listed hashes at a log index."""

    index: int
    signal: str
    hash: str
    listed: bool


class Projection(Protocol):
    """Reads and writes of one collection's projection, inside one transaction."""

    def log_size(self) -> int: ...
    def key_record(self, key_id: str) -> KeyRecord | None: ...
    def last_seq(self, key_id: str) -> int: ...
    def read_ahead(self, keys: Sequence[tuple[str, str]]) -> None:
        """A hint: ``lists`` and ``listers`` are about to be asked of these (type, hash) pairs."""
        ...

    def lists(self, signal: str, hash_hex: str, member: str) -> bool: ...
    def listers(self, signal: str, hash_hex: str) -> int: ...
    def hub_keys(self) -> list[HubKeyRecord]:
        """The log's hub key rotations so far, in log order (empty: its first key is in force)."""
        ...

    def put_hub_key(self, record: HubKeyRecord) -> None: ...

    def put_key(self, record: KeyRecord) -> None: ...
    def set_last_seq(self, key_id: str, seq: int) -> None: ...
    def put_listing(
        self,
        signal: str,
        hash_hex: str,
        member: str,
        labels: Sequence[str],
        quality: int | None,
        index: int,
    ) -> None: ...
    def delete_listing(self, signal: str, hash_hex: str, member: str) -> None: ...
    def put_content(self, signal: str, hash_hex: str, content: bytes) -> None: ...
    def put_opinion(
        self, signal: str, hash_hex: str, member: str, verdict: str, note: str | None, index: int
    ) -> None: ...
    def delete_opinion(self, signal: str, hash_hex: str, member: str) -> None: ...
    def record_change(self, change: ListingChange) -> None: ...


def signer_of(envelope: Envelope, payload: Payload, context: LogContext, view: Projection) -> str:
    """Check the envelope's signature and authority; return the signer's key id."""
    key_id = envelope.signer_key_id
    if isinstance(payload, MembershipPayload | HubKeyPayload):
        check_signer(envelope, context, None, hub_key_in_force(context, view))
        return key_id
    record = view.key_record(key_id)
    check_signer(envelope, context, record, context.hub_key)
    if record is not None and payload.member != record.member:
        raise Refusal(
            403,
            "wrong-member",
            f"payload member {payload.member!r} is not the signer's member {record.member!r}",
        )
    return key_id


def check_signer(
    envelope: Envelope, context: LogContext, record: KeyRecord | None, hub_key: VerifierKey
) -> None:
    """Check the envelope's signature and its signer's standing, from the payload type alone.

    ``record`` is the signer's key record in the collection, if any, and
    ``hub_key`` the hub key in force. Needing no payload, this runs before
    the payload is parsed (the hub's readers do, so a stranger's batch is
    never parsed) and again in :func:`signer_of`.
    """
    key_id = envelope.signer_key_id
    if envelope.payload_type in HUB_PAYLOAD_TYPES:
        if key_id != hub_key.key_id:
            what = "membership entries" if envelope.payload_type == MEMBERSHIP_TYPE else "hub key rotations"
            raise Refusal(
                403,
                "not-hub-key",
                f"{what} must be signed by the hub key in force, {hub_key.key_id}, not {key_id}",
            )
        if not envelope.verify(hub_key):
            raise Refusal(
                400, "bad-envelope-signature", f"the envelope signature by {key_id} does not verify"
            )
        return
    if record is None:
        raise Refusal(
            403, "unknown-key", f"key {key_id} is not a member key of collection {context.collection}"
        )
    if not record.active:
        raise Refusal(403, "revoked-key", f"key {key_id} was revoked at log index {record.revoked_index}")
    if not envelope.verify(record.key):
        raise Refusal(400, "bad-envelope-signature", f"the envelope signature by {key_id} does not verify")
    needed = "write" if envelope.payload_type == BATCH_TYPE else "read"
    if needed not in record.rights:
        raise Refusal(
            403,
            "missing-right",
            f"key {key_id} lacks the {needed!r} right on collection {context.collection}",
        )


def check_first_entry(envelope: Envelope, context: LogContext, log_size: int) -> None:
    """A collection's first entry must be a membership entry."""
    if log_size == 0 and envelope.payload_type != MEMBERSHIP_TYPE:
        raise Refusal(
            409,
            "no-membership-yet",
            f"collection {context.collection}'s first entry must be a membership entry",
        )


def check_entry(envelope: Envelope, payload: Payload, context: LogContext, view: Projection) -> str:
    """Decide whether the entry may be appended next; return its signer's key id."""
    header = payload.header
    if header.federation != context.federation:
        raise Refusal(
            400,
            "wrong-federation",
            f"payload federation {header.federation!r} is not this hub's federation {context.federation!r}",
        )
    if header.collection != context.collection:
        raise Refusal(
            400,
            "wrong-collection",
            f"payload collection {header.collection!r} does not match the collection posted to, {context.collection!r}",
        )
    check_first_entry(envelope, context, view.log_size())
    key_id = signer_of(envelope, payload, context, view)
    last = view.last_seq(key_id)
    if header.seq <= last:
        raise Refusal(
            409,
            "stale-seq",
            f"seq {header.seq} is not greater than {last}, the last seq accepted from {key_id}; "
            "sign a new envelope with a higher seq (the hashfed client takes seq from the clock, "
            "in microseconds, so a clock that ran ahead and was set back gives lower ones; "
            "it re-signs above the last accepted seq by itself)",
        )
    if isinstance(payload, BatchPayload):
        view.read_ahead(
            [(a.signal, a.hash) for a in payload.add] + [(r.signal, r.hash) for r in payload.remove]
        )
        for removal in payload.remove:
            if not view.lists(removal.signal, removal.hash, payload.member):
                raise Refusal(
                    422,
                    "not-listed",
                    f"member {payload.member} does not list {removal.signal} hash {removal.hash}, so it cannot remove it; the batch was refused whole",
                )
    if isinstance(payload, HubKeyPayload):
        check_rotation(payload, context, view)
    if isinstance(payload, MembershipPayload):
        for grant in payload.grant:
            record = view.key_record(grant.key.key_id)
            if record is not None and not record.active:
                raise Refusal(
                    409,
                    "key-revoked",
                    f"key {grant.key.key_id} was revoked at index {record.revoked_index}; a revoked key cannot be granted again, make a new one",
                )
        for key_id_to_revoke in payload.revoke:
            record = view.key_record(key_id_to_revoke)
            if record is None or not record.active:
                raise Refusal(
                    409,
                    "no-such-key",
                    f"key {key_id_to_revoke} is not an active key of collection {context.collection}",
                )
    return key_id


def check_rotation(payload: HubKeyPayload, context: LogContext, view: Projection) -> None:
    """A rotation names the key in force as ``previous`` and hands over to a key the log never had."""
    in_force = hub_key_in_force(context, view)
    if payload.previous != in_force:
        raise Refusal(
            409,
            "stale-hub-key",
            f"the rotation's previous key {payload.previous.key_id} is not the hub key in force, {in_force.key_id}",
        )
    earlier = {context.hub_key.key_id, *(rotation.key.key_id for rotation in view.hub_keys())}
    if payload.key.key_id in earlier or view.key_record(payload.key.key_id) is not None:
        raise Refusal(
            409,
            "key-reused",
            f"key {payload.key.key_id} was already used in collection {context.collection}; rotate to a new key",
        )


def apply_entry(index: int, signer: str, payload: Payload, view: Projection) -> list[ListingChange]:
    """Record the effect of an accepted entry at log ``index``; return the listing changes."""
    view.set_last_seq(signer, payload.header.seq)
    changes: list[ListingChange] = []
    if isinstance(payload, HubKeyPayload):
        view.put_hub_key(HubKeyRecord(payload.key, index, payload.previous, payload.overlap_until))
    elif isinstance(payload, MembershipPayload):
        for grant in payload.grant:
            # Re-granting an active key changes its rights; it was granted when first granted.
            earlier = view.key_record(grant.key.key_id)
            granted = earlier.granted_index if earlier is not None else index
            view.put_key(KeyRecord(grant.key, grant.rights, granted))
        for key_id in payload.revoke:
            old = view.key_record(key_id)
            if old is not None:
                view.put_key(KeyRecord(old.key, old.rights, old.granted_index, index))
    elif isinstance(payload, BatchPayload):  # check_entry has read its hashes ahead
        for addition in payload.add:
            newly_listed = view.listers(addition.signal, addition.hash) == 0
            signal = signal_type(addition.signal)
            if signal.has_content and newly_listed:
                content = signal.content(addition.quality, addition.frames)
                if content is not None:
                    view.put_content(addition.signal, addition.hash, content)
            view.put_listing(
                addition.signal,
                addition.hash,
                payload.member,
                addition.labels,
                addition.quality,
                index,
            )
            if newly_listed:
                changes.append(ListingChange(index, addition.signal, addition.hash, True))
        for removal in payload.remove:
            view.delete_listing(removal.signal, removal.hash, payload.member)
            if view.listers(removal.signal, removal.hash) == 0:
                changes.append(ListingChange(index, removal.signal, removal.hash, False))
    elif isinstance(payload, OpinionPayload):
        for opinion in payload.opinions:
            if opinion.verdict == "withdrawn":
                view.delete_opinion(opinion.signal, opinion.hash, payload.member)
            else:
                view.put_opinion(
                    opinion.signal,
                    opinion.hash,
                    payload.member,
                    opinion.verdict,
                    opinion.note,
                    index,
                )
    for change in changes:
        view.record_change(change)
    return changes
