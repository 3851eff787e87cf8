"""Keeping search indexes in step with the log.

The store records, in the same transaction as each entry, which hashes
entered or left the listed set (``ListingChange``). An :class:`IndexCatalog`
holds one search index per (collection, signal type) and the log position it
reflects; :meth:`IndexCatalog.catch_up` applies the changes recorded since
then. Ingest calls it before acknowledging, so an acknowledged hash is
searchable; lookups call it too, so entries written by another process (a CLI
command, another replica) become visible without a restart.

Snapshots make restarts fast: for each signal type whose index is an array
of codes (PDQ, PhotoDNA; see ``SignalType.snapshot_width``), the large index
segment is written into files (:mod:`~federation.index.segment_files`) and
published with a log position its codes reflect, after each merge and after
a build from the store. A restart maps the published segments and replays
only the listing changes recorded since the oldest of their positions. Other
types are built from the store.

Several worker processes of one hub share the segments: one of them (the one
that ``writes_snapshots``) merges into files and publishes; the others map
what it publishes, within :data:`ADOPT_POLL_SECONDS`, and replay the changes
since, so the workers hold one copy of each segment in the page cache.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..signals import SIGNAL_TYPES, Hit, Query, SignalType
from ..state import ListingChange
from ..store.base import HubStore
from .budget import MatchBudget
from .engines import SearchIndex, decode_hashes
from .segment_files import SavedSegment, SnapshotFiles
from .segmented import SegmentedIndex

FOLLOWER_FRESH_FACTOR = 4
"""A worker that does not write segments merges on its own only when its fresh segment grows this
many times past the usual limit (the writing worker is far behind); normally it adopts the
writer's segment first."""
ADOPT_POLL_SECONDS = 1.0
"""How often a worker that does not write segments looks for a newer one to map."""
EXTERNAL_POLL_SECONDS = 0.1
"""How often a lookup checks the store for entries written by other processes.

This process's own writes catch the index up before they are acknowledged;
only writes by another process (another replica, a CLI command) wait for
this poll, which costs a query per lookup without it."""
FOLLOW_SECONDS = 1.0
"""How often a worker of several catches its indexes up with the log when no lookup asks it to."""
log = logging.getLogger("hashfed.index")


@dataclass
class _CollectionIndexes:
    position: int
    by_signal: dict[str, SearchIndex]
    looked: float = field(default_factory=time.monotonic)
    """When a follower last looked for newer published segments."""


class IndexCatalog:
    def __init__(self, store: HubStore, snapshot_dir: Path | None = None) -> None:
        self._store = store
        self._snapshots = SnapshotFiles(snapshot_dir) if snapshot_dir is not None else None
        self._collections: dict[str, _CollectionIndexes] = {}
        self._checked: dict[str, float] = {}
        self._unsaved: set[str] = set()
        """Collections whose last snapshot could not be written (retried by :meth:`retry_snapshots`)."""
        self.on_merge: Callable[[float], None] | None = None
        """Told how long each merge of a large segment took (the hub's metrics)."""
        self.external_poll = EXTERNAL_POLL_SECONDS
        """Seconds a search may go without checking the store for other processes' writes; 0 with
        several workers, so that a lookup reflects every entry any of them acknowledged before it began."""
        self.writes_snapshots = True
        """False in all workers but one: segments are written and published by one, mapped by all."""
        self._tidied = False
        self._lock = threading.Lock()

    def _build(self, collection: str) -> _CollectionIndexes:
        """Each type's index from its published segment where one is usable, else from the listed hashes.

        The indexes may then reflect different log positions; replaying the
        changes since the oldest of them onto all is harmless: each change
        sets a hash's presence outright, so the last change per hash, which
        a newer index already reflects, wins.
        """
        if self._snapshots is not None and self.writes_snapshots and not self._tidied:
            self._snapshots.remove_unfinished()
            self._tidied = True
        size = self._store.log_size(collection)
        by_signal: dict[str, SearchIndex] = {}
        positions: list[int] = []
        for signal in SIGNAL_TYPES.values():
            opened = self._open_saved(collection, signal, size)
            if opened is not None:
                by_signal[signal.name], saved_position = opened
                positions.append(saved_position)
                continue
            listed, position = self._store.listed(collection, signal.name)
            hashes = [hash_hex for _, hash_hex in listed]
            if signal.snapshot_width:
                # Built in one go over every listed code: into files (and published) where this
                # process writes segments, so the first start after an upgrade or a rebuild
                # leaves a segment every later start maps.
                codes = np.frombuffer(decode_hashes(signal, hashes), dtype=np.uint8)
                index = self._new_index(collection, signal, codes.reshape(-1, signal.snapshot_width))
                assert isinstance(index, SegmentedIndex)
                index.label = index.merged_label = position
                self._publish(collection, signal.name, index)
            else:
                index = self._new_index(collection, signal)
                self._add(collection, signal, index, hashes)
            by_signal[signal.name] = index
            positions.append(position)
        built = _CollectionIndexes(min(positions), by_signal)
        self._apply_changes(collection, built)
        for index in by_signal.values():
            if isinstance(index, SegmentedIndex):
                index.now_serving()
        return built

    def _publish(self, collection: str, signal: str, index: SegmentedIndex) -> None:
        """Name the index's large segment as the collection's snapshot; remember it if that fails.

        A snapshot is an optimisation: on a full or read-only disk the index
        still serves from memory, and :meth:`retry_snapshots` tries again.
        """
        if self._snapshots is None or not self.writes_snapshots:
            return
        segment = index.segment
        if segment is None:
            if len(index):  # its files could not be written: it was built in memory
                log.warning("could not save the %s index snapshot of %s; will retry", signal, collection)
                self._unsaved.add(collection)
            return
        try:
            self._snapshots.publish(collection, signal, index.merged_label, segment)
        except OSError as exc:
            log.warning(
                "could not save the %s index snapshot of %s (%s); will retry", signal, collection, exc
            )
            self._unsaved.add(collection)

    def _load(self, collection: str, signal: SignalType) -> SavedSegment | None:
        if self._snapshots is None or signal.snapshot_width is None:
            return None
        return self._snapshots.load(collection, signal.name, signal.snapshot_width)

    def _open_saved(
        self, collection: str, signal: SignalType, log_size: int
    ) -> tuple[SearchIndex, int] | None:
        """An index over the published segment and the log position it reflects, if there is a usable one.

        A segment whose files are sound but whose engine arrays this version
        cannot open (written by a version whose engine kept other arrays) is
        passed over like a damaged one: the index is then built from the log.
        """
        saved = self._load(collection, signal)
        if saved is None or saved.position > log_size:
            return None
        try:
            return self._new_index(collection, signal, saved=saved), saved.position
        except ValueError as exc:
            log.warning(
                "ignoring the %s index snapshot of %s, which this version cannot open (%s); "
                "building the index from the log",
                signal.name,
                collection,
                exc,
            )
            return None

    def _new_index(
        self,
        collection: str,
        signal: SignalType,
        codes: np.ndarray | None = None,
        *,
        saved: SavedSegment | None = None,
    ) -> SearchIndex:
        if not signal.snapshot_width or self._snapshots is None:
            return signal.new_index(codes)
        snapshots = self._snapshots
        writes = self.writes_snapshots
        options: dict[str, object] = {}
        if writes:
            options["spill"] = lambda: snapshots.builder(collection, signal.name)
        if saved is not None:
            options["segment"] = saved.segment
        index = signal.new_index(codes, **options)
        if isinstance(index, SegmentedIndex):
            if saved is not None:
                index.label = index.merged_label = saved.position
            if not writes:
                index.fresh_limit *= FOLLOWER_FRESH_FACTOR
            index.on_merged = lambda seconds: self._merged(collection, signal.name, index, seconds)
        return index

    def _add(self, collection: str, signal: SignalType, index: SearchIndex, hashes: list[str]) -> None:
        """Add listed hashes, with the content their type keeps beside them (a video's frames)."""
        if not hashes:
            return
        if not signal.has_content:
            index.add(hashes)
            return
        contents = self._store.contents(collection, signal.name, hashes)
        present = [hash_hex for hash_hex in hashes if hash_hex in contents]
        # A hash without content was listed and later unlisted; a later change removes it anyway.
        index.add(present, [contents[hash_hex] for hash_hex in present])  # type: ignore[call-arg]

    def _apply_changes(self, collection: str, current: _CollectionIndexes) -> None:
        """Apply the listing changes since ``current.position`` (lock held)."""
        changes, size = self._store.changes_since(collection, current.position)
        self._replay(collection, current.by_signal, changes)
        current.position = size
        for index in current.by_signal.values():
            if isinstance(index, SegmentedIndex):
                index.label = size

    def _replay(
        self, collection: str, indexes: dict[str, SearchIndex], changes: Sequence[ListingChange]
    ) -> None:
        """Apply ``changes`` to those of ``indexes`` whose type they concern, in runs of one type and direction."""
        run: list[str] = []
        for position, change in enumerate(changes):
            if change.signal not in indexes:
                continue
            run.append(change.hash)
            following = changes[position + 1] if position + 1 < len(changes) else None
            if following is None or (following.signal, following.listed) != (change.signal, change.listed):
                index = indexes[change.signal]
                if change.listed:
                    self._add(collection, SIGNAL_TYPES[change.signal], index, run)
                else:
                    index.remove(run)
                run = []

    def catch_up(self, collection: str) -> int:
        """Bring one collection's indexes up to the log; return the position reached."""
        if not self.writes_snapshots and self._snapshots is not None:
            self._adopt_published(collection)
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                current = self._collections[collection] = self._build(collection)
                return current.position
            if self._store.log_size(collection) != current.position:
                self._apply_changes(collection, current)
            return current.position

    def follow(self) -> None:
        """Catch every loaded collection up with the log (what other processes appended, too).

        A worker of several calls this every :data:`FOLLOW_SECONDS`, so one
        that answers no requests still keeps up: the writing worker merges
        and publishes as the log grows, and the others map what it publishes,
        instead of replaying a whole import at their next lookup.
        """
        with self._lock:
            names = list(self._collections)
        for name in names:
            self.catch_up(name)

    def _adopt_published(self, collection: str) -> None:
        """Map the segments the writing worker published since we last looked.

        Checking and mapping a segment (its files' SHA-256 are read) and
        replaying the changes since it happen outside the lock, so lookups
        go on meanwhile; the lock is taken to replay what came after and swap.
        """
        now = time.monotonic()
        with self._lock:
            current = self._collections.get(collection)
            if current is None or self._snapshots is None or now - current.looked < ADOPT_POLL_SECONDS:
                return
            current.looked = now
            segmented = {
                name: index
                for name, index in current.by_signal.items()
                if isinstance(index, SegmentedIndex) and SIGNAL_TYPES[name].snapshot_width
            }
        for name, index in segmented.items():
            published = self._snapshots.version(collection, name)
            mapped = index.segment
            if published is None or (mapped is not None and mapped.name == published):
                continue
            opened = self._open_saved(collection, SIGNAL_TYPES[name], self._store.log_size(collection))
            if opened is None:
                continue
            adopted, saved_position = opened
            changes, reached = self._store.changes_since(collection, saved_position)
            self._replay(collection, {name: adopted}, changes)
            with self._lock:
                current = self._collections.get(collection)
                if current is None or current.by_signal.get(name) is not index:
                    continue  # forgotten, or replaced meanwhile
                if current.position > reached:
                    later, _ = self._store.changes_since(collection, reached)
                    self._replay(collection, {name: adopted}, later)
                current.by_signal[name] = adopted
            if isinstance(adopted, SegmentedIndex):
                adopted.now_serving()

    def snapshot(self, collection: str) -> None:
        """Merge each segmented index of the collection into files now and publish it at the current position.

        Costs a merge; a restart needs none (it replays the log since the
        last published segment), so this is for tools and tests, and for
        segments whose publication failed (:meth:`retry_snapshots`).
        """
        if self._snapshots is None or not self.writes_snapshots:
            return
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                return
            indexes = [
                (name, index)
                for name, index in current.by_signal.items()
                if isinstance(index, SegmentedIndex) and SIGNAL_TYPES[name].snapshot_width
            ]
            self._unsaved.discard(collection)
        for name, index in indexes:
            if index.unmerged or (len(index) and index.segment is None):
                index.merge(wait=True)
            self._publish(collection, name, index)

    def retry_snapshots(self) -> None:
        """Save again the snapshots that failed (a disk that was full or read-only)."""
        with self._lock:
            pending = sorted(self._unsaved)
        for collection in pending:
            self.snapshot(collection)

    def snapshot_all(self) -> None:
        with self._lock:
            collections = list(self._collections)
        for collection in collections:
            self.snapshot(collection)

    def _merged(self, collection: str, signal: str, index: SegmentedIndex, seconds: float) -> None:
        log.info(
            "merged the large index segment of %s in %.1f s",
            collection,
            seconds,
            extra={"event": "index-merge", "collection": collection, "seconds": round(seconds, 3)},
        )
        if self.on_merge is not None:
            self.on_merge(seconds)
        with self._lock:
            current = self._collections.get(collection)
            still_used = current is not None and current.by_signal.get(signal) is index
        if still_used:
            self._publish(collection, signal, index)

    def segments(self, collection: str) -> dict[str, dict[str, int]]:
        """Live hashes per index segment, for each type whose index has segments."""
        with self._lock:
            current = self._collections.get(collection)
            indexes = dict(current.by_signal) if current else {}
        return {
            name: index.segment_sizes()
            for name, index in indexes.items()
            if isinstance(index, SegmentedIndex)
        }

    def close(self) -> None:
        """Let go of every index (and so of the segment files they map); a later search builds afresh."""
        with self._lock:
            self._collections.clear()

    def forget(self, collection: str) -> None:
        """Drop a collection's indexes; the next catch-up builds them afresh."""
        with self._lock:
            self._collections.pop(collection, None)

    def ready(self, collections: Sequence[str]) -> bool:
        with self._lock:
            return all(name in self._collections for name in collections)

    def search(
        self,
        collection: str,
        signal: SignalType,
        queries: Sequence[Query],
        budget: MatchBudget | None = None,
    ) -> list[list[Hit]]:
        now = time.monotonic()
        stale = now - self._checked.get(collection, -1.0) >= self.external_poll
        if stale or collection not in self._collections:
            self.catch_up(collection)
            self._checked[collection] = now
        with self._lock:
            index = self._collections[collection].by_signal[signal.name]
        return signal.search(index, queries, budget)

    def size(self, collection: str) -> dict[str, int]:
        with self._lock:
            current = self._collections.get(collection)
            return {name: len(index) for name, index in current.by_signal.items()} if current else {}
