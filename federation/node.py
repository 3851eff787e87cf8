"""The hub's synchronous core: verify, append, apply, index, answer.

A :class:`Node` ties a store, the projection rules of :mod:`federation.state`
and the search indexes together. It does no I/O of its own beyond the store,
so the HTTP layer calls it from worker threads and tests call it directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import merkle
from .checkpoint import Checkpoint
from .checkpoint_record import CheckpointRecord, check_extends, check_stored_log
from .envelope import (
    HUB_KEY_TYPE,
    HUB_PAYLOAD_TYPES,
    MEMBERSHIP_TYPE,
    Envelope,
    EnvelopeError,
    Grant,
    Header,
    Limits,
    Payload,
    hub_key_payload,
    membership_payload,
    parse_payload,
    sign_envelope,
    utc_now,
)
from .hub_keys import HubKeyring
from .index.budget import MatchBudget
from .index.live import IndexCatalog
from .keys import SignerKey, VerifierKey, check_collection_name
from .replay import REPLAY_LIMITS, replay_log
from .signals import Query
from .state import LogContext, Refusal, apply_entry, check_entry, check_first_entry, check_signer
from .store.base import CollectionTxn, EntryRecord, HubStore, SourceRecord, StoreError


class UnknownCollection(LookupError):
    def __init__(self, collection: str) -> None:
        super().__init__(f"no collection named {collection!r} on this hub")
        self.collection = collection


class NoCheckpointYet(LookupError):
    """A mirrored collection whose first signed checkpoint has not been reached yet."""

    def __init__(self, collection: str) -> None:
        super().__init__(
            f"mirrored collection {collection} has not reached a verified checkpoint yet; retry shortly"
        )
        self.collection = collection


class NotYetSearchable(RuntimeError):
    """An entry was appended durably, but the index could not be caught up to it.

    The append stands (it is in the log and will be indexed once the cause
    is gone); the caller must be told so, not that nothing changed.
    """

    def __init__(self, collection: str, entry: EntryRecord, cause: BaseException) -> None:
        super().__init__(
            f"entry {entry.index} was appended to the log of {collection} and is durable, but the hub "
            f"could not make it searchable yet ({cause}); resubmitting the same envelope answers "
            "this entry once it is"
        )
        self.entry = entry


@dataclass(frozen=True)
class Accepted:
    entry: EntryRecord
    created: bool
    """False when the exact same envelope was already in the log."""


@dataclass(frozen=True)
class Prepared:
    """A submission whose signer and payload were checked, ready for the writer."""

    envelope: Envelope
    payload: Payload
    data: bytes
    """The envelope's canonical form: the leaf data."""
    leaf: bytes


@dataclass(frozen=True)
class Match:
    collection: str
    signal: str
    hash: str
    distance: int
    submitters: tuple[str, ...]
    labels: tuple[str, ...]
    first_index: int
    positive: int
    negative: int
    fields: tuple[tuple[str, float], ...] = ()
    """Answer fields a signal type adds (a video's match percentages), in order."""


class Node:
    def __init__(
        self,
        store: HubStore,
        *,
        name: str,
        federation: str,
        hub_key: VerifierKey,
        signer: SignerKey | None = None,
        retired: Sequence[SignerKey] = (),
        limits: Limits | None = None,
        index_dir: Path | None = None,
        signed_dir: Path | None = None,
        searchable: bool = True,
    ) -> None:
        self.store = store
        self.name = name
        self.federation = federation
        self.hub_key = hub_key
        self.signer = signer
        self.keys = HubKeyring(store, hub_key, (*retired, *([signer] if signer else [])))
        """Every hub key this node holds: the current one and those it rotated away from."""
        self.limits = limits or Limits()
        self.indexes = IndexCatalog(store, index_dir)
        self.searchable = searchable
        """False for a node that only writes (admin commands): it keeps no search index,
        and a serving hub catches its own index up from the store."""
        self.signed = CheckpointRecord(signed_dir, self.keys.verifiers())
        """The last checkpoint signed per collection, kept outside the database (None: in memory)."""
        self._checkpoints: dict[str, tuple[int, str]] = {}
        self._checkpoint_lock = threading.Lock()

    # ---- collections ----------------------------------------------------

    def collections(self) -> list[str]:
        return self.store.collections()

    def require_collection(self, collection: str) -> None:
        if collection not in self.store.collections():
            raise UnknownCollection(collection)

    def context(self, collection: str) -> LogContext:
        """What entries of ``collection`` are checked against: this hub's, or a mirrored log's origin."""
        source = self.store.source(collection)
        if source is not None:
            return source_context(source)
        return LogContext(self.federation, collection, self.keys.first_key(collection))

    def hub_key_in_force(self, collection: str) -> VerifierKey:
        """The key that signs a collection's membership entries, rotations and checkpoints now."""
        return self.keys.in_force(collection)

    def check_signed_history(self) -> None:
        """Refuse to go on if any own collection's log contradicts a checkpoint this hub signed.

        Run at start, before serving: a log shorter than the last signed
        checkpoint, or with a different root at that size, raises
        :class:`HistoryMismatch` saying what was found and how to recover.
        """
        for collection in self.own_collections():
            size = self.store.log_size(collection)
            check_stored_log(
                collection, self.signed.last(collection), size, StoredTree(self.store, collection)
            )

    def load(self) -> None:
        """Build every collection's indexes (startup; ``/v1/ready`` waits for this)."""
        for collection in self.store.collections():
            self.indexes.catch_up(collection)

    # ---- the write path -------------------------------------------------

    def submit(self, collection: str, envelope: Envelope) -> Accepted:
        """Verify an envelope, append it and apply it in one transaction, then index it."""
        prepared = self.prepare(collection, envelope)
        if isinstance(prepared, Accepted):
            return prepared
        return self.append(collection, prepared)

    def prepare(self, collection: str, envelope: Envelope) -> Accepted | Prepared:
        """Everything about a submission that can be judged before the single writer sees it.

        Runs in any thread. An exact resubmission is answered at once; then the
        envelope signature and its signer's standing are checked against the
        current projection before the payload is even parsed, so a batch of
        100,000 items signed by a key nobody granted costs a signature check,
        not a parse, and never waits in the writer's queue. :meth:`append`
        checks everything again inside the write transaction: the projection
        may change in between.
        """
        self.require_collection(collection)
        data = envelope.canonical()
        leaf = merkle.leaf_hash(data)
        existing = self.store.entry_by_leaf(collection, leaf)
        if existing is not None:
            self._make_searchable(collection, existing)
            return Accepted(existing, created=False)
        if self.store.source(collection) is not None:
            raise Refusal(
                409,
                "mirrored-collection",
                f"collection {collection} is mirrored from another hub; submit to its origin hub",
            )
        context = self.context(collection)  # an own collection
        check_first_entry(envelope, context, self.store.log_size(collection))
        memberships = self.store.key_memberships(envelope.signer_key_id)
        record = next((r for c, r in memberships if c == collection), None)
        hub_entry = envelope.payload_type in HUB_PAYLOAD_TYPES  # only those need the key in force
        check_signer(
            envelope, context, record, self.hub_key_in_force(collection) if hub_entry else context.hub_key
        )
        try:
            payload = parse_payload(envelope.payload_type, envelope.payload, self.limits)
        except EnvelopeError as exc:
            raise Refusal(400, "invalid-payload", str(exc)) from exc
        return Prepared(envelope, payload, data, leaf)

    def append(self, collection: str, prepared: Prepared) -> Accepted:
        """Append a prepared submission and apply it in one transaction, then index it (the writer)."""
        try:
            with self.store.write(collection) as txn:
                entry = _append(
                    txn, prepared.envelope, prepared.payload, self.context(collection), prepared.data
                )
        except Refusal:
            # The same envelope may have landed meanwhile (an earlier request
            # still queued, or another process): then its own seq refuses it,
            # and the answer is the original entry, as for any exact resubmission.
            existing = self.store.entry_by_leaf(collection, prepared.leaf)
            if existing is not None:
                self._make_searchable(collection, existing)
                return Accepted(existing, created=False)
            raise
        self._make_searchable(collection, entry)
        return Accepted(entry, created=True)

    def _make_searchable(self, collection: str, entry: EntryRecord) -> None:
        """Catch the index up past ``entry`` before it is acknowledged (design §6)."""
        if not self.searchable:
            return
        try:
            self.indexes.catch_up(collection)
        except Exception as exc:
            raise NotYetSearchable(collection, entry, exc) from exc

    def create_collection(self, collection: str, grants: Sequence[Grant] = ()) -> Accepted:
        """Create a collection with its first entry: a membership entry signed by the hub."""
        check_collection_name(collection)
        self.store.create_collection(collection)
        return self.change_membership(collection, grants, ())

    def change_membership(self, collection: str, grant: Sequence[Grant], revoke: Sequence[str]) -> Accepted:
        return self._hub_entry(
            collection,
            MEMBERSHIP_TYPE,
            lambda header: membership_payload(header, tuple(grant), tuple(revoke)),
        )

    def rotate_key(self, collection: str, new: SignerKey, overlap_seconds: int) -> Accepted | None:
        """Hand a collection over to the hub key ``new`` (held in the keyring); None if it already is."""
        if self.hub_key_in_force(collection) == new.verifier:
            return None
        previous = self.hub_key_in_force(collection)
        return self._hub_entry(
            collection,
            HUB_KEY_TYPE,
            lambda header: hub_key_payload(header, previous, new.verifier, overlap_seconds),
        )

    def _hub_entry(self, collection: str, payload_type: str, payload: Callable[[Header], bytes]) -> Accepted:
        """Sign an entry with the hub key in force and submit it, choosing a fresh seq."""
        if self.signer is None:
            raise RuntimeError("this node has no hub signer key; membership entries need one")
        for attempt in range(5):
            signer = self.keys.signer(collection)
            with self.store.write(collection) as txn:
                seq = max(txn.last_seq(signer.key_id) + 1, time.time_ns() // 1000)
            header = Header(self.federation, collection, seq, utc_now())
            try:
                return self.submit(collection, sign_envelope(signer, payload_type, payload(header)))
            except Refusal as exc:
                # Another process (a CLI command, a replica) appended a membership
                # entry between choosing this seq and appending: choose again.
                if exc.kind != "stale-seq" or attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def rebuild(self, collection: str) -> int:
        """Replay a collection's log into a fresh projection, checking every entry again.

        This is the restart path taken the long way: the same checks and the
        same apply function as ingest, over the stored log. The stored tree
        hashes are checked against a root recomputed from the entries alone.
        """
        size = replay_log(self.store, collection, self.context(collection))
        self.indexes.forget(collection)
        if self.searchable:
            self.indexes.catch_up(collection)
        return size

    # ---- mirrored collections (federation.sync) ---------------------------

    def sources(self) -> dict[str, SourceRecord]:
        """Mirrored collections by local name."""
        return {record.name: record for record in self.store.sources()}

    def own_collections(self) -> list[str]:
        mirrored = {record.name for record in self.store.sources()}
        return [name for name in self.store.collections() if name not in mirrored]

    def ingest_remote(
        self,
        source: SourceRecord,
        start: int,
        envelopes: Sequence[Envelope],
        check_root: Callable[[int, bytes], None],
        *,
        index: bool = True,
    ) -> int:
        """Append a span of a mirrored log, checked exactly as :meth:`submit` checks, in one transaction.

        The entries must continue the local log at ``start``. Each is checked
        by :func:`federation.state.check_entry` against the source's context
        (its federation and collection, the membership entries of its own log
        and its pinned hub key) and applied by the same
        :func:`federation.state.apply_entry`. Then ``check_root(size, root)``
        sees the new local root and raises unless it is proven against the
        source's signed checkpoint. Any exception rolls the whole span back,
        together with the new ``source`` record, so nothing unproven is kept.
        Returns the new log size.
        """
        context = source_context(source)
        with self.store.write_source(source) as txn:
            if txn.log_size() != start:
                raise StoreError(
                    f"{source.name}: this span starts at {start} but the local log has {txn.log_size()} entries"
                )
            for position, envelope in enumerate(envelopes, start):
                try:
                    payload = parse_payload(envelope.payload_type, envelope.payload, REPLAY_LIMITS)
                    _append(txn, envelope, payload, context, envelope.canonical())
                except EnvelopeError as exc:
                    raise Refusal(400, "invalid-payload", f"entry {position}: {exc}") from exc
                except Refusal as exc:
                    raise Refusal(exc.status, exc.kind, f"entry {position}: {exc.detail}") from exc
            size = txn.log_size()
            check_root(size, merkle.root(txn, size))
        if index and self.searchable:
            self.indexes.catch_up(source.name)
        return size

    def record_fork(self, collection: str, body: str) -> None:
        """Keep fork evidence (JSON text) for a mirrored collection and stop applying from it."""
        self.store.add_evidence(collection, utc_now(), body)

    def root(self, collection: str, size: int) -> bytes:
        """The root of the first ``size`` entries of a collection's log, from the stored tree."""
        self._check_size(collection, size)
        return merkle.root(StoredTree(self.store, collection), size)

    # ---- the read path --------------------------------------------------

    def checkpoint(self, collection: str) -> str:
        """The latest signed checkpoint, re-signed only when the log has grown.

        Before signing, the stored log is proven to extend the last checkpoint
        this hub signed (:mod:`federation.checkpoint_record`), and the new
        note is recorded durably before it is returned; a log that does not
        extend it raises :class:`HistoryMismatch` and nothing is signed.
        """
        source = self.store.source(collection)
        if source is not None:  # the origin hub's note, as verified: never re-signed here
            if source.checkpoint is None:
                raise NoCheckpointYet(collection)
            return source.checkpoint
        if self.signer is None:
            raise RuntimeError("this node has no hub signer key; it cannot sign checkpoints")
        size = self.store.log_size(collection)
        with self._checkpoint_lock:
            cached = self._checkpoints.get(collection)
            if cached and cached[0] == size:
                return cached[1]
            reader = StoredTree(self.store, collection)
            with self.signed.locked():
                # Another worker of this hub may have appended, and signed a larger
                # checkpoint, since the size above was read: sign the log as it is now.
                size = self.store.log_size(collection)
                last = self.signed.last(collection)
                root = merkle.root(reader, size)
                check_extends(collection, last, size, root, reader)
                note = Checkpoint(f"{self.name}/{collection}", size, root).sign(
                    *self.keys.checkpoint_signers(collection)
                )
                if last is None or last.size != size:
                    self.signed.remember(collection, note)
            self._checkpoints[collection] = (size, note)
            return note

    def inclusion_proof(self, collection: str, index: int, size: int) -> list[bytes]:
        self._check_size(collection, size)
        return merkle.inclusion_proof(StoredTree(self.store, collection), index, size)

    def consistency_proof(self, collection: str, old: int, new: int) -> list[bytes]:
        self._check_size(collection, new)
        return merkle.consistency_proof(StoredTree(self.store, collection), old, new)

    def _check_size(self, collection: str, size: int) -> None:
        current = self.store.log_size(collection)
        if size > current:
            raise merkle.ProofError(f"size {size} is larger than the log ({current} entries)")

    def lookup(
        self,
        collections: Sequence[str],
        queries: Sequence[Query],
        budget: MatchBudget | None = None,
    ) -> list[list[Match]]:
        """One list of matches per query, sorted by distance, over the given collections.

        Each query carries its own resolved ``max_distance``. With a
        ``budget``, each query keeps only the nearest matches it allows
        (across all collections), and ``budget.truncated`` names the queries cut.
        """
        results: list[list[Match]] = [[] for _ in queries]
        by_signal: dict[str, list[int]] = {}
        for position, query in enumerate(queries):
            by_signal.setdefault(query.signal.name, []).append(position)
        cut: set[int] = set()
        for collection in collections:
            for name, positions in by_signal.items():
                signal = queries[positions[0]].signal
                part = budget.subset(positions) if budget is not None else None
                hits = self.indexes.search(collection, signal, [queries[p] for p in positions], part)
                if part is not None:
                    cut.update(positions[offset] for offset in part.truncated)
                found = {hit.hash for per_query in hits for hit in per_query}
                if not found:
                    continue
                details = self.store.details(collection, name, sorted(found))
                for position, per_query in zip(positions, hits, strict=True):
                    for hit in per_query:
                        detail = details.get(hit.hash)
                        if detail is None:  # removed after the index answered
                            continue
                        results[position].append(
                            Match(
                                collection,
                                name,
                                hit.hash,
                                hit.distance,
                                detail.submitters,
                                detail.labels,
                                detail.first_index,
                                detail.positive,
                                detail.negative,
                                hit.fields,
                            )
                        )
        for matches in results:
            matches.sort(key=lambda m: (m.distance, m.collection, m.hash))
        if budget is not None:
            budget.cut(results, cut)
        return results


def source_context(source: SourceRecord) -> LogContext:
    """A mirrored log is checked against its origin: federation, collection name and pinned hub key."""
    return LogContext(source.federation, source.collection, VerifierKey.parse(source.key))


def _append(
    txn: CollectionTxn, envelope: Envelope, payload: Payload, context: LogContext, data: bytes
) -> EntryRecord:
    """The one write path: check an entry against the projection, append it, apply it (one transaction).

    ``data`` is the envelope's canonical form (the leaf data).
    """
    signer = check_entry(envelope, payload, context, txn)
    entry = txn.append(data)
    apply_entry(entry.index, signer, payload, txn)
    return entry


class StoredTree:
    """Adapts a store to :class:`federation.merkle.HashReader` for one collection."""

    def __init__(self, store: HubStore, collection: str) -> None:
        self._store = store
        self._collection = collection

    def read_hashes(self, keys: Sequence[merkle.HashKey]) -> list[bytes]:
        return self._store.read_hashes(self._collection, keys)
