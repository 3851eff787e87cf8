"""Replaying a stored log into a fresh projection: the restart path taken the long way.

``hashfed rebuild`` runs every stored entry through the same checks and the
same apply function as ingest (:mod:`federation.state`), in one transaction,
and compares the stored tree hashes with ones recomputed from the entries.
"""

from __future__ import annotations

from . import merkle
from .envelope import Envelope, EnvelopeError, Limits, Payload, parse_payload
from .state import LogContext, Refusal, apply_entry, check_entry
from .store.base import HubStore, StoreError

REPLAY_LIMITS = Limits(
    max_items=2**31, max_labels_per_item=2**31, max_label_length=2**31, max_note_length=2**31
)
"""Entries already in the log were accepted under the limits of their day; replay does not re-judge them."""


def stored_payload(data: bytes) -> Payload:
    """The payload of an entry already in a log, read under :data:`REPLAY_LIMITS` (signature not re-checked)."""
    envelope = Envelope.parse(data)
    return parse_payload(envelope.payload_type, envelope.payload, REPLAY_LIMITS)


def replay_log(store: HubStore, collection: str, context: LogContext) -> int:
    """Replace a collection's projection with one replayed from its log, checking every entry again.

    Raises :class:`StoreError` naming the first entry that fails; the
    transaction is then rolled back and the old projection stays. Returns the
    number of entries replayed.
    """
    frontier = merkle.Frontier()
    expected: list[tuple[merkle.HashKey, bytes]] = []
    with store.rebuild(collection) as txn:
        for record in txn.logged_entries():
            if merkle.leaf_hash(record.data) != record.leaf_hash:
                raise StoreError(
                    f"{collection} entry {record.index}: stored leaf hash does not match its data"
                )
            try:
                envelope = Envelope.parse(record.data)
                payload = parse_payload(envelope.payload_type, envelope.payload, REPLAY_LIMITS)
                signer = check_entry(envelope, payload, context, txn)
            except (EnvelopeError, Refusal) as exc:
                raise StoreError(f"{collection} entry {record.index} fails verification: {exc}") from exc
            if envelope.canonical() != record.data:
                raise StoreError(f"{collection} entry {record.index} is not in canonical form")
            txn.replayed(record)
            apply_entry(record.index, signer, payload, txn)
            expected.extend(frontier.append(record.leaf_hash))
            if len(expected) >= 4096:
                _check_tree(txn, collection, expected)
        _check_tree(txn, collection, expected)
        if frontier.size != store.log_size(collection):
            raise StoreError(
                f"{collection}: the log size on record does not match its {frontier.size} entries"
            )
    return frontier.size


def _check_tree(
    reader: merkle.HashReader, collection: str, expected: list[tuple[merkle.HashKey, bytes]]
) -> None:
    """Compare stored subtree hashes with ones recomputed from the entries; empty the list."""
    stored = reader.read_hashes([key for key, _ in expected])
    for (key, value), found in zip(expected, stored, strict=True):
        if value != found:
            raise StoreError(f"{collection}: stored tree hash {key} does not match the entries")
    expected.clear()
