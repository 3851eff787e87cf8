"""The narrow storage interface the hub and mirrors are written against.

A store holds, per collection, the log entries, the stored Merkle subtree
hashes (see :mod:`federation.merkle`) and the projection of
:mod:`federation.state`. All writes for one entry happen in one
:class:`CollectionTxn`, so after a crash either all of an entry is there or
none of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from ..merkle import HashKey
from ..state import HubKeyRecord, KeyRecord, ListingChange, Projection


class StoreError(Exception):
    """A storage failure or a request the store cannot satisfy."""


class StorageUnavailable(StoreError):
    """The storage cannot be used now (full, read-only, failing, or a database that cannot be
    reached); nothing was written.

    A full or read-only disk still serves reads. ``reason`` is ``full``,
    ``read-only`` or ``io-error``.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class EntryRecord:
    index: int
    leaf_hash: bytes
    data: bytes


@dataclass(frozen=True)
class ListingDetail:
    submitters: tuple[str, ...]
    labels: tuple[str, ...]
    first_index: int
    positive: int
    negative: int


@dataclass(frozen=True)
class MemberView:
    """What one member says of one listed hash: whether it lists it (with which labels), and its opinion."""

    member: str
    listed: bool
    labels: tuple[str, ...] = ()
    verdict: str | None = None
    """``positive`` or ``negative``; None when the member gave no opinion."""


@dataclass(frozen=True)
class SourceRecord:
    """A collection mirrored from another hub: where its log comes from and how far it is verified.

    The local log of a source is always a proven prefix of ``target``; once it
    has reached ``target``'s size (and matched its root), ``checkpoint`` is
    that note. Both are the origin hub's own signed notes, kept verbatim so
    they can be served to others and used as evidence.
    """

    name: str
    """The local collection name, ``<origin hub>:<origin collection>``."""
    hub: str
    collection: str
    """The collection's name at its origin hub."""
    key: str
    """The origin hub's verifier key, pinned by configuration."""
    federation: str
    url: str
    """Where the log is pulled from: the origin hub or a hub that relays it."""
    checkpoint: str | None = None
    target: str | None = None
    forked: bool = False
    """Set with the first fork evidence: nothing more is applied from this source."""


class CollectionTxn(Projection, Protocol):
    """One write transaction on one collection: append to its log and update its projection."""

    def append(self, data: bytes) -> EntryRecord: ...
    def read_hashes(self, keys: Sequence[HashKey]) -> list[bytes]: ...
    def replayed(self, record: EntryRecord) -> None: ...
    def logged_entries(self) -> Iterator[EntryRecord]: ...


class HubStore(Protocol):
    shared: bool
    """True when other hub processes, anywhere, may append to the same log (replicas on PostgreSQL)."""

    def owner(self) -> str | None: ...
    def claim(self, hub: str) -> None: ...
    def collections(self) -> list[str]: ...
    def create_collection(self, name: str) -> None: ...
    def write(self, collection: str) -> AbstractContextManager[CollectionTxn]: ...
    def rebuild(self, collection: str) -> AbstractContextManager[CollectionTxn]: ...

    def log_size(self, collection: str) -> int: ...
    def read_hashes(self, collection: str, keys: Sequence[HashKey]) -> list[bytes]: ...
    def entries(
        self, collection: str, start: int, limit: int, max_bytes: int | None = None
    ) -> list[EntryRecord]: ...
    def entry_by_leaf(self, collection: str, leaf_hash: bytes) -> EntryRecord | None: ...
    def keys(self, collection: str) -> list[KeyRecord]: ...
    def hub_keys(self, collection: str) -> list[HubKeyRecord]: ...
    def key_memberships(self, key_id: str) -> list[tuple[str, KeyRecord]]: ...
    def changes_since(self, collection: str, position: int) -> tuple[list[ListingChange], int]: ...
    def listed(self, collection: str, signal: str | None = None) -> tuple[list[tuple[str, str]], int]: ...
    def contents(self, collection: str, signal: str, hashes: Sequence[str]) -> dict[str, bytes]: ...
    def details(self, collection: str, signal: str, hashes: Sequence[str]) -> dict[str, ListingDetail]: ...
    def member_views(
        self, collection: str, signal: str, hashes: Sequence[str]
    ) -> dict[str, list[MemberView]]: ...
    def close(self) -> None: ...
    def unavailable(self) -> str | None: ...

    # ---- mirrored collections (federation.sync) ----
    def sources(self) -> list[SourceRecord]: ...
    def source(self, name: str) -> SourceRecord | None: ...
    def write_source(self, record: SourceRecord) -> AbstractContextManager[CollectionTxn]: ...
    def add_evidence(self, name: str, detected: str, body: str) -> None: ...
    def evidence(self, name: str) -> list[str]: ...
    def resume_source(self, name: str) -> bool: ...
