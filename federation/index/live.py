"""Keeping search indexes in step with the log.

The store records, in the same transaction as each entry, which hashes
entered or left the listed set (``ListingChange``). An :class:`IndexCatalog`
holds one search index per (collection, signal type) and the log position it
reflects; :meth:`IndexCatalog.catch_up` applies the changes recorded since
then. Ingest calls it before acknowledging, so an acknowledged hash is
searchable; lookups call it too, so entries written by another process (a CLI
command, another replica) become visible without a restart.

Snapshots make restarts fast: the live PDQ codes of a collection are saved
with the log position they reflect (after each merge of the large segment,
after a build from the store, and on shutdown). A restart loads the snapshot
and replays only the listing changes recorded since that position.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..signals import PDQ, SIGNAL_TYPES, SignalType
from ..store.base import HubStore
from .budget import MatchBudget
from .engines import SearchIndex, new_index
from .segmented import Codes, SegmentedPdqIndex

SNAPSHOT_FORMAT = 1
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
    """``<dir>/<collection>.pdq.npy`` (the live codes) and ``.json`` (their position and checksum).

    Each file is written to a temporary name and renamed into place. The
    metadata carries a SHA-256 of the codes, so a crash between the two
    renames, a torn write or a stale pair is detected at load and the snapshot
    ignored (the index is then built from the store). Two saves racing each
    other never leave the older one in place: a save whose position is not
    newer than the one on disk is dropped.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _paths(self, collection: str) -> tuple[Path, Path]:
        stem = quote(collection, safe="")
        return self.directory / f"{stem}.pdq.npy", self.directory / f"{stem}.pdq.json"

    def _meta(self, path: Path) -> dict[str, object] | None:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def save(self, collection: str, position: int, codes: Codes) -> None:
        codes_path, meta_path = self._paths(collection)
        self.directory.mkdir(parents=True, exist_ok=True)
        codes = np.ascontiguousarray(codes)
        meta = {
            "format": SNAPSHOT_FORMAT,
            "position": position,
            "count": len(codes),
            "sha256": hashlib.sha256(codes.data).hexdigest(),
        }
        unique = f".{os.getpid()}.{threading.get_ident()}.tmp"
        codes_tmp = codes_path.with_name(codes_path.name + unique)
        meta_tmp = meta_path.with_name(meta_path.name + unique)
        try:
            with open(codes_tmp, "wb") as handle:
                np.save(handle, codes, allow_pickle=False)
                handle.flush()
                os.fsync(handle.fileno())
            with open(meta_tmp, "wb") as handle:
                handle.write(json.dumps(meta).encode())
                handle.flush()
                os.fsync(handle.fileno())
            with self._lock:
                current = self._meta(meta_path)
                on_disk = current.get("position") if current else None
                if isinstance(on_disk, int) and on_disk > position:
                    return  # a newer snapshot landed while this one was being written
                os.replace(codes_tmp, codes_path)
                os.replace(meta_tmp, meta_path)
        finally:
            codes_tmp.unlink(missing_ok=True)
            meta_tmp.unlink(missing_ok=True)

    def load(self, collection: str) -> tuple[int, Codes] | None:
        """The snapshot of a collection, or None if there is none or it is unusable.

        Loading happens before this process can be saving the same collection,
        so temporary files left by a save that was killed are removed here.
        """
        codes_path, meta_path = self._paths(collection)
        for stale in self.directory.glob(f"{quote(collection, safe='')}.pdq.*.tmp"):
            stale.unlink(missing_ok=True)
        meta = self._meta(meta_path)
        if meta is None:
            return None
        try:
            codes = np.load(codes_path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            log.warning("ignoring the unreadable index snapshot of %s", collection)
            return None
        position = meta.get("position")
        if (
            meta.get("format") != SNAPSHOT_FORMAT
            or not isinstance(position, int)
            or codes.dtype != np.uint8
            or codes.ndim != 2
            or codes.shape[1] != 32
            or len(codes) != meta.get("count")
            or hashlib.sha256(np.ascontiguousarray(codes).data).hexdigest() != meta.get("sha256")
        ):
            log.warning("ignoring the unusable index snapshot of %s", collection)
            return None
        return position, codes


class IndexCatalog:
    def __init__(self, store: HubStore, snapshot_dir: Path | None = None) -> None:
        self._store = store
        self._snapshots = SnapshotFiles(snapshot_dir) if snapshot_dir is not None else None
        self._collections: dict[str, _CollectionIndexes] = {}
        self._checked: dict[str, float] = {}
        self._lock = threading.Lock()

    def _build(self, collection: str) -> _CollectionIndexes:
        snapshot = self._snapshots.load(collection) if self._snapshots else None
        size = self._store.log_size(collection)
        if snapshot is not None and snapshot[0] <= size:
            position, codes = snapshot
            by_signal: dict[str, SearchIndex] = {PDQ.name: self._pdq_index(collection, codes)}
            for name, signal in SIGNAL_TYPES.items():
                if signal is not PDQ:
                    by_signal[name] = self._exact_index(signal, collection)
            built = _CollectionIndexes(position, by_signal)
            self._apply_changes(collection, built)
            return built
        listed, position = self._store.listed(collection)
        grouped: dict[str, list[str]] = {name: [] for name in SIGNAL_TYPES}
        for signal_name, hash_hex in listed:
            grouped[signal_name].append(hash_hex)
        raw = bytes.fromhex("".join(grouped[PDQ.name]))
        codes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 32)
        by_signal = {PDQ.name: self._pdq_index(collection, codes)}
        for name, signal in SIGNAL_TYPES.items():
            if signal is not PDQ:
                index = new_index(signal)
                index.add(grouped[name])
                by_signal[name] = index
        built = _CollectionIndexes(position, by_signal)
        if self._snapshots is not None and len(codes):
            self._snapshots.save(collection, position, codes)
        return built

    def _exact_index(self, signal: SignalType, collection: str) -> SearchIndex:
        """Exact-type hashes as listed now (they are not in the PDQ snapshot).

        Replaying the changes since the snapshot's older position onto this
        newer state is harmless: each change sets a hash's presence outright,
        so the last change per hash, which the state already reflects, wins.
        """
        index = new_index(signal)
        listed, _ = self._store.listed(collection, signal.name)
        index.add([hash_hex for _, hash_hex in listed])
        return index

    def _pdq_index(self, collection: str, codes: Codes) -> SegmentedPdqIndex:
        index = SegmentedPdqIndex(PDQ, codes)
        index.on_merged = lambda: self._snapshot_in_background(collection)
        return index

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
                    index.add(run)
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
        """Save the collection's PDQ codes with the log position they reflect."""
        if self._snapshots is None:
            return
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                return
            index = current.by_signal[PDQ.name]
            assert isinstance(index, SegmentedPdqIndex)
            position, codes = current.position, index.live_codes()
        self._snapshots.save(collection, position, codes)

    def snapshot_all(self) -> None:
        with self._lock:
            collections = list(self._collections)
        for collection in collections:
            self.snapshot(collection)

    def _snapshot_in_background(self, collection: str) -> None:
        def run() -> None:
            try:
                self.snapshot(collection)
            except OSError:
                log.exception("saving the index snapshot of %s failed", collection)

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
        queries: Sequence[str],
        max_distance: int,
        budget: MatchBudget | None = None,
    ) -> list[list[tuple[str, int]]]:
        now = time.monotonic()
        stale = now - self._checked.get(collection, -1.0) >= EXTERNAL_POLL_SECONDS
        if stale or collection not in self._collections:
            self.catch_up(collection)
            self._checked[collection] = now
        with self._lock:
            index = self._collections[collection].by_signal[signal.name]
        return index.search(queries, max_distance, budget)

    def size(self, collection: str) -> dict[str, int]:
        with self._lock:
            current = self._collections.get(collection)
            return {name: len(index) for name, index in current.by_signal.items()} if current else {}
