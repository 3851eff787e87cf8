"""What the console pages show, read from the node (synchronous: the handlers run these in worker threads).

Everything here is a read of the store, the indexes or the peering state;
nothing writes. Activity per member is counted over the most recent entries
only (``ACTIVITY_WINDOW``), so a page costs the same on a log of any length.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from .. import merkle
from ..checkpoint import Checkpoint
from ..checkpoint_record import HistoryMismatch
from ..envelope import (
    BATCH_TYPE,
    HUB_KEY_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Envelope,
    EnvelopeError,
    HubKeyPayload,
    MembershipPayload,
    parse_payload,
)
from ..hub.logs import entry_counts
from ..node import Node
from ..replay import REPLAY_LIMITS
from ..signals import LookupDefaults, SignalError, guess_type, signal_type
from ..state import KeyRecord
from ..store.base import StoreError

ACTIVITY_WINDOW = 5_000
RECENT_ENTRIES = 50
KINDS = {BATCH_TYPE: "batch", OPINION_TYPE: "opinion", MEMBERSHIP_TYPE: "membership", HUB_KEY_TYPE: "hub-key"}


@dataclass
class CollectionSummary:
    name: str
    mirrored_from: str | None
    size: int
    checkpoint_size: int | None
    checkpoint_root: str | None
    listed: dict[str, int]
    segments: dict[str, dict[str, int]]


def collections(node: Node) -> list[CollectionSummary]:
    sources = node.sources()
    summaries = []
    for name in node.collections():
        source = sources.get(name)
        try:
            note = node.checkpoint(name)
            checkpoint: Checkpoint | None = Checkpoint.parse_text(note.split("\n\n", 1)[0] + "\n")
        except (LookupError, StoreError, HistoryMismatch):
            # A mirrored collection before its first verified checkpoint, or a hub that cannot sign
            # now (a full disk, a log that no longer extends what it signed): the page still shows.
            checkpoint = None
        summaries.append(
            CollectionSummary(
                name=name,
                mirrored_from=source.url if source is not None else None,
                size=node.store.log_size(name),
                checkpoint_size=checkpoint.size if checkpoint else None,
                checkpoint_root=base64.b64encode(checkpoint.root).decode() if checkpoint else None,
                listed=node.indexes.size(name),
                segments=node.indexes.segments(name),
            )
        )
    return summaries


@dataclass
class EntryRow:
    index: int
    kind: str
    signer: str
    seq: int | None
    items: int
    created: str | None


def _row(index: int, data: bytes) -> tuple[EntryRow, Any]:
    try:
        envelope = Envelope.parse(data)
        payload = parse_payload(envelope.payload_type, envelope.payload, REPLAY_LIMITS)
    except EnvelopeError:
        return EntryRow(index, "unreadable", "", None, 0, None), None
    items = sum(entry_counts(payload).values())
    kind = KINDS.get(envelope.payload_type, envelope.payload_type)
    header = payload.header
    return EntryRow(index, kind, envelope.signer_key_id, header.seq, items, header.created), payload


def recent_entries(node: Node, collection: str, limit: int = RECENT_ENTRIES) -> list[EntryRow]:
    """The newest entries first."""
    size = node.store.log_size(collection)
    start = max(0, size - limit)
    return [
        _row(record.index, record.data)[0]
        for record in reversed(node.store.entries(collection, start, limit))
    ]


@dataclass
class EntryDetail:
    row: EntryRow
    payload_json: str
    leaf_data: str
    leaf_hash: str
    checkpoint_size: int
    checkpoint_root: str
    proof: list[str]
    proof_verified: bool


def entry_detail(node: Node, collection: str, index: int) -> EntryDetail | None:
    records = node.store.entries(collection, index, 1)
    if not records or records[0].index != index:
        return None
    record = records[0]
    row, _ = _row(index, record.data)
    envelope = Envelope.parse(record.data)
    payload = json.dumps(json.loads(envelope.payload), indent=2, ensure_ascii=False)
    size = node.store.log_size(collection)
    root = node.root(collection, size)
    proof = node.inclusion_proof(collection, index, size)
    try:
        merkle.verify_inclusion(record.leaf_hash, index, size, proof, root)
        verified = True
    except merkle.ProofError:
        verified = False
    return EntryDetail(
        row,
        payload,
        base64.b64encode(record.data).decode(),
        base64.b64encode(record.leaf_hash).decode(),
        size,
        base64.b64encode(root).decode(),
        [base64.b64encode(h).decode() for h in proof],
        verified,
    )


@dataclass
class MemberRow:
    collection: str
    record: KeyRecord
    last_index: int | None = None
    last_created: str | None = None
    submissions: int = 0
    opinions: int = 0


@dataclass
class Activity:
    """Entries per day over the recent window, by kind: the members page's chart."""

    days: list[str] = field(default_factory=list)
    batches: list[int] = field(default_factory=list)
    opinions: list[int] = field(default_factory=list)


def members(node: Node) -> tuple[list[MemberRow], Activity]:
    rows: list[MemberRow] = []
    per_day: dict[str, Counter[str]] = {}
    for collection in node.collections():
        by_key = {record.key.key_id: MemberRow(collection, record) for record in node.store.keys(collection)}
        rows.extend(by_key.values())
        size = node.store.log_size(collection)
        start = max(0, size - ACTIVITY_WINDOW)
        for record in node.store.entries(collection, start, ACTIVITY_WINDOW):
            row, payload = _row(record.index, record.data)
            member = by_key.get(row.signer)
            if isinstance(payload, HubKeyPayload | MembershipPayload) or payload is None:
                continue
            day = (row.created or "")[:10]
            per_day.setdefault(day, Counter())[row.kind] += 1
            if member is not None:
                member.last_index, member.last_created = row.index, row.created
                if row.kind == "batch":
                    member.submissions += 1
                else:
                    member.opinions += 1
    days = sorted(per_day)
    activity = Activity(days, [per_day[d]["batch"] for d in days], [per_day[d]["opinion"] for d in days])
    return rows, activity


@dataclass
class LookupRow:
    query: str
    signal: str
    matches: list[dict[str, Any]]
    error: str | None = None


def parse_lookup_text(text: str, defaults: LookupDefaults, max_distance: int | None) -> list[tuple[str, Any]]:
    """One query per line, ``TYPE:HASH`` or a bare hash whose form tells its type; errors per line."""
    parsed: list[tuple[str, Any]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kind, _, value = line.partition(":") if ":" in line[:9] else ("", "", line)
        try:
            signal = signal_type(kind) if kind else guess_type(value)
            parsed.append(
                (line, signal.parse_query({"type": signal.name, "hash": value}, max_distance, defaults))
            )
        except SignalError as exc:
            parsed.append((line, str(exc)))
    return parsed
