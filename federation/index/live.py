"""Keeping search indexes in step with the log.

The store records, in the same transaction as each entry, which hashes
entered or left the listed set (``ListingChange``). An :class:`IndexCatalog`
holds one search index per (collection, signal type) and the log position it
reflects; :meth:`IndexCatalog.catch_up` applies the changes recorded since
then. Ingest calls it before acknowledging, so an acknowledged hash is
searchable; lookups call it too, so entries written by another process (a CLI
command, another replica) become visible without a restart.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from ..signals import SIGNAL_TYPES, SignalType
from ..store.base import HubStore
from .engines import SearchIndex, new_index


@dataclass
class _CollectionIndexes:
    position: int
    by_signal: dict[str, SearchIndex]


class IndexCatalog:
    def __init__(self, store: HubStore) -> None:
        self._store = store
        self._collections: dict[str, _CollectionIndexes] = {}
        self._lock = threading.Lock()

    def _build(self, collection: str) -> _CollectionIndexes:
        listed, position = self._store.listed(collection)
        grouped: dict[str, list[str]] = {name: [] for name in SIGNAL_TYPES}
        for signal_name, hash_hex in listed:
            grouped[signal_name].append(hash_hex)
        by_signal = {}
        for name, signal in SIGNAL_TYPES.items():
            index = new_index(signal)
            index.add(grouped[name])
            by_signal[name] = index
        return _CollectionIndexes(position, by_signal)

    def catch_up(self, collection: str) -> int:
        """Bring one collection's indexes up to the log; return the position reached."""
        with self._lock:
            current = self._collections.get(collection)
            if current is None:
                current = self._collections[collection] = self._build(collection)
                return current.position
            if self._store.log_size(collection) == current.position:
                return current.position
            changes, size = self._store.changes_since(collection, current.position)
            run: list[str] = []
            for position, change in enumerate(changes):
                run.append(change.hash)
                following = changes[position + 1] if position + 1 < len(changes) else None
                if following is None or (following.signal, following.listed) != (
                    change.signal,
                    change.listed,
                ):
                    index = current.by_signal[change.signal]
                    index.add(run) if change.listed else index.remove(run)
                    run = []
            current.position = size
            return size

    def forget(self, collection: str) -> None:
        """Drop a collection's indexes; the next catch-up builds them afresh."""
        with self._lock:
            self._collections.pop(collection, None)

    def ready(self, collections: Sequence[str]) -> bool:
        with self._lock:
            return all(name in self._collections for name in collections)

    def search(
        self, collection: str, signal: SignalType, queries: Sequence[str], max_distance: int
    ) -> list[list[tuple[str, int]]]:
        self.catch_up(collection)
        with self._lock:
            index = self._collections[collection].by_signal[signal.name]
        return index.search(queries, max_distance)

    def size(self, collection: str) -> dict[str, int]:
        with self._lock:
            current = self._collections.get(collection)
            return {name: len(index) for name, index in current.by_signal.items()} if current else {}
