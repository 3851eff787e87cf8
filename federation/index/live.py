"""Keeping search indexes in step with the log.

The store records, in the same transaction as each entry, which hashes
entered or left the listed set (``ListingChange``). An :class:`IndexCatalog`
holds one search index per (collection, signal type) and the log position it
reflects; :meth:`IndexCatalog.catch_up` applies the changes recorded since
then. Ingest calls it before acknowledging, so an acknowledged hash is
searchable; lookups call it too, so entries written by another process (a CLI
command, another replica) become visible without a restart.

Snapshots make restarts fast: for each signal type whose index is an array
of codes (PDQ, PhotoDNA; see ``SignalType.snapshot_width``), the live codes of
a collection are saved with the log position they reflect (after each merge
of the large segment, after a build from the store, and on shutdown). A
restart loads the snapshots and replays only the listing changes recorded
since the oldest of their positions. Other types are built from the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..durable import OWNER_ONLY_FILE, make_private_directory, write_atomically
from ..signals import SIGNAL_TYPES, Hit, Query, SignalType
from ..store.base import HubStore
from .budget import MatchBudget
from .engines import SearchIndex
from .segmented import Codes, SegmentedIndex

SNAPSHOT_FORMAT = 2
EXTERNAL_POLL_SECONDS = 0.1
"""How often a lookup checks the store for entries written by other processes.

This process's own writes catch the index up before they are acknowledged;
only writes by another process (another replica, a CLI command) wait for
this poll, which costs a query per lookup without it."""
log = logging.getLogger("hashfed.index")


@dataclass
class _CollectionIndexes:
    position: int
    by_signal: dict[str, SearchIndex]


class SnapshotFiles:
    """``<dir>/<collection>.<type>.npy`` (the live codes) and ``.json`` (their position and checksum).

    Each file is written to a temporary name, fsynced and renamed into place.
    The metadata carries a SHA-256 of the codes and a checksum over all of its
    own fields with it, so a changed ``position`` or ``count`` is detected
    like changed codes. A crash between the two
    renames, a torn write or a stale pair is detected at load and the snapshot
    ignored (the index is then built from the store). Two saves racing each
    other never leave the older one in place: a save whose position is not
    newer than the one on disk is dropped.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _paths(self, collection: str, signal: str) -> tuple[Path, Path]:
        stem = f"{quote(collection, safe='')}.{signal}"
        return self.directory / f"{stem}.npy", self.directory / f"{stem}.json"

    def _meta(self, path: Path) -> dict[str, object] | None:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def save(self, collection: str, signal: str, position: int, codes: Codes) -> None:
        codes_path, meta_path = self._paths(collection, signal)
        make_private_directory(self.directory)
        codes = np.ascontiguousarray(codes)
        meta = _sealed(
            {
                "format": SNAPSHOT_FORMAT,
                "collection": collection,
                "signal": signal,
                "position": position,
                "count": len(codes),
                "codes_sha256": hashlib.sha256(codes.data).hexdigest(),
            }
        )
        unique = f".{os.getpid()}.{threading.get_ident()}.tmp"
        codes_tmp = codes_path.with_name(codes_path.name + unique)
        try:
            fd = os.open(codes_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OWNER_ONLY_FILE)
            with os.fdopen(fd, "wb") as handle:
                np.save(handle, codes, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            with self._lock:
                current = self._meta(meta_path)
                on_disk = current.get("position") if current else None
                if isinstance(on_disk, int) and on_disk > position:
                    return  # a newer snapshot landed while this one was being written
                os.replace(codes_tmp, codes_path)
                write_atomically(meta_path, json.dumps(meta))
        finally:
            codes_tmp.unlink(missing_ok=True)

    def load(self, collection: str, signal: str, width: int) -> tuple[int, Codes] | None:
        """The snapshot of a collection's codes of one type, or None if there is none or it is unusable.

        Loading happens before this process can be saving the same collection,
        so temporary files left by a save that was killed are removed here.
        """
        codes_path, meta_path = self._paths(collection, signal)
        for stale in self.directory.glob(f"{quote(collection, safe='')}.{signal}.*.tmp"):
            stale.unlink(missing_ok=True)
        for stale in self.directory.glob(f".{quote(collection, safe='')}.{signal}.json.*.tmp"):
            stale.unlink(missing_ok=True)
        meta = self._meta(meta_path)
        if meta is None:
            return None
        if meta.get("checksum") != _sealed(meta).get("checksum") or (
            meta.get("format"),
            meta.get("collection"),
            meta.get("signal"),
        ) != (SNAPSHOT_FORMAT, collection, signal):
            log.warning(
                "ignoring the index snapshot of %s (%s): its metadata is damaged or stale", collection, signal
            )
            return None
        try:
            codes = np.load(codes_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            log.warning("ignoring the unreadable index snapshot of %s (%s)", collection, signal)
            return None
        position = meta.get("position")
        if (
            not isinstance(position, int)
            or codes.dtype != np.uint8
            or codes.ndim != 2
            or codes.shape[1] != width
            or len(codes) != meta.get("count")
            or hashlib.sha256(np.ascontiguousarray(codes).data).hexdigest() != meta.get("codes_sha256")
        ):
            log.warning("ignoring the unusable index snapshot of %s (%s)", collection, signal)
            return None
        return position, codes


def _sealed(meta: dict[str, object]) -> dict[str, object]:
    """``meta`` with a ``checksum`` over every other field (the codes' own SHA-256 among them)."""
    fields = {key: value for key, value in meta.items() if key != "checksum"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return {**fields, "checksum": hashlib.sha256(canonical).hexdigest()}


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
        """False in all workers but one: snapshots are read by all, written by one."""
        self._lock = threading.Lock()

    def _build(self, collection: str) -> _CollectionIndexes:
        """Each type's index from its snapshot where one is usable, else from the listed hashes.

        The indexes may then reflect different log positions; replaying the
        changes since the oldest of them onto all is harmless: each change
        sets a hash's presence outright, so the last change per hash, which
        a newer index already reflects, wins.
        """
        size = self._store.log_size(collection)
        by_signal: dict[str, SearchIndex] = {}
        positions: list[int] = []
        built_from_store: list[SignalType] = []
        for signal in SIGNAL_TYPES.values():
            snapshot = self._load(collection, signal)
            if snapshot is not None and snapshot[0] <= size:
                position, codes = snapshot
                by_signal[signal.name] = self._new_index(collection, signal, codes)
            else:
                listed, position = self._store.listed(collection, signal.name)
                index = by_signal[signal.name] = self._new_index(collection, signal)
                self._add(collection, signal, index, [hash_hex for _, hash_hex in listed])
                built_from_store.append(signal)
            positions.append(position)
        built = _CollectionIndexes(min(positions), by_signal)
        self._apply_changes(collection, built)
        for signal in built_from_store:
            index = by_signal[signal.name]
            if signal.snapshot_width and len(index):
                assert isinstance(index, SegmentedIndex)
                self._save(collection, signal.name, built.position, index.live_codes())
        return built

    def _save(self, collection: str, signal: str, position: int, codes: Codes) -> None:
        """Save a snapshot if possible; a snapshot is an optimisation, so a failure is logged and retried.

        On a full or read-only disk the index still serves from memory; the
        collection is remembered and saved again by :meth:`retry_snapshots`.
        """
        if self._snapshots is None or not self.writes_snapshots:
            return
        try:
            self._snapshots.save(collection, signal, position, codes)
        except OSError as exc:
            log.warning(
                "could not save the %s index snapshot of %s (%s); will retry", signal, collection, exc
            )
            self._unsaved.add(collection)

    def _load(self, collection: str, signal: SignalType) -> tuple[int, Codes] | None:
        if self._snapshots is None or signal.snapshot_width is None:
            return None
        return self._snapshots.load(collection, signal.name, signal.snapshot_width)

    def _new_index(self, collection: str, signal: SignalType, codes: Codes | None = None) -> SearchIndex:
        index = signal.new_index(codes)
        if isinstance(index, SegmentedIndex) and signal.snapshot_width:
            index.on_merged = lambda seconds: self._merged(collection, seconds)
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
        run: list[str] = []
        for position, change in enumerate(changes):
            run.append(change.hash)
            following = changes[position + 1] if position + 1 < len(changes) else None
            if following is None or (following.signal, following.listed) != (change.signal, change.listed):
                index = current.by_signal[change.signal]
                if change.listed:
                    self._add(collection, SIGNAL_TYPES[change.signal], index, run)
                else:
                    index.remove(run)
                run = []
        current.position = size

    def catch_up(self, collection: str) -> int:
        """Bring one collection's indexes up to the log; return the position reached."""
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                current = self._collections[collection] = self._build(collection)
                return current.position
            if self._store.log_size(collection) != current.position:
                self._apply_changes(collection, current)
            return current.position

    def snapshot(self, collection: str) -> None:
        """Save the collection's codes, of each type that keeps them, with the log position they reflect."""
        if self._snapshots is None or not self.writes_snapshots:
            return
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                return
            saved = [
                (name, index.live_codes())
                for name, index in current.by_signal.items()
                if isinstance(index, SegmentedIndex) and SIGNAL_TYPES[name].snapshot_width
            ]
            position = current.position
            self._unsaved.discard(collection)
        for name, codes in saved:
            self._save(collection, name, position, codes)

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

    def _merged(self, collection: str, seconds: float) -> None:
        log.info(
            "merged the large index segment of %s in %.1f s",
            collection,
            seconds,
            extra={"event": "index-merge", "collection": collection, "seconds": round(seconds, 3)},
        )
        if self.on_merge is not None:
            self.on_merge(seconds)
        self._snapshot_in_background(collection)

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

    def _snapshot_in_background(self, collection: str) -> None:
        def run() -> None:
            self.snapshot(collection)

        threading.Thread(target=run, name="hashfed-snapshot", daemon=True).start()

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
