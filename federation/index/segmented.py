"""An index at scale: a large immutable segment, a fresh segment, a deletion bitmap.

* The **large segment** is an exact engine built once over the codes sorted
  as bytes (:class:`~federation.index.mih.MihIndex` for PDQ,
  :class:`~federation.index.pruned.PrunedL2Index` for PhotoDNA), so the row
  of a hash is found by binary search and no per-hash Python object is kept
  (10 million hashes cost arrays, not dicts).
* The **fresh segment** is a FAISS flat index that takes new hashes at once.
* The **deletion bitmap** hides removed rows of the large segment; a removed
  hash that is added again is simply un-hidden.

When the fresh segment grows past a threshold, a **merge** builds a new large
segment from the live codes in a background thread. Lookups and updates go on
meanwhile against the old segments; updates made during the merge are recorded
and replayed onto the new segments when they are swapped in, under the lock,
so nothing is lost and no lookup ever waits for the build.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .budget import MatchBudget
from .engines import CodeFormat, FaissBinaryIndex, FlatL2Index, Match, check_max_distance, decode_hashes
from .mih import MihIndex

Codes = npt.NDArray[np.uint8]
DEFAULT_FRESH_LIMIT = 32_768
"""Hashes the fresh (flat, linearly scanned) segment takes before a merge starts."""


class FreshEngine(Protocol):
    def add(self, hashes: Sequence[str]) -> None: ...
    def remove(self, hashes: Sequence[str]) -> None: ...
    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]: ...
    def codes(self) -> Codes: ...
    def __len__(self) -> int: ...
    def __contains__(self, hash_hex: object) -> bool: ...


class LargeEngine(Protocol):
    """An immutable exact engine over sorted codes; results are ``(rows, distances)`` by (distance, row)."""

    @property
    def nbytes(self) -> int: ...

    def search(
        self,
        queries: Codes,
        max_distance: int,
        deleted: npt.NDArray[np.bool_] | None = None,
        *,
        budget: MatchBudget | None = None,
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]]: ...


def _as_rows(raw: bytes, width: int) -> Codes:
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)


def sorted_unique(codes: Codes, width: int | None = None) -> Codes:
    """Codes sorted as byte strings, without duplicates (the large segment's order)."""
    width = codes.shape[1] if width is None else width
    if len(codes) == 0:
        return np.empty((0, width), dtype=np.uint8)
    keys = np.unique(np.ascontiguousarray(codes).view(f"V{width}").ravel())
    return keys.view(np.uint8).reshape(-1, width)


def merge_sorted(ordered: Codes, others: Codes) -> Codes:
    """``ordered`` (sorted, unique) with ``others`` added, sorted and unique, in one new array."""
    width = ordered.shape[1]
    extra = sorted_unique(others, width)
    if len(extra) == 0:
        return ordered
    keys = ordered.view(f"V{width}").ravel()
    extra_keys = extra.view(f"V{width}").ravel()
    positions = np.searchsorted(keys, extra_keys)
    inside = positions < len(keys)
    already = np.zeros(len(extra), dtype=np.bool_)
    already[inside] = keys[positions[inside]] == extra_keys[inside]
    return np.insert(ordered, positions[~already], extra[~already], axis=0)


@dataclass(frozen=True)
class _Large:
    codes: Codes
    keys: npt.NDArray[np.void]
    index: LargeEngine | None

    @classmethod
    def from_sorted(cls, ordered: Codes, engine: Callable[[Codes], LargeEngine]) -> _Large:
        """A segment over codes already sorted as bytes and unique."""
        width = ordered.shape[1]
        return cls(ordered, ordered.view(f"V{width}").ravel(), engine(ordered) if len(ordered) else None)

    def rows(self, codes: Codes) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Row of each code in the segment, and whether it is there at all."""
        if len(self.keys) == 0:
            return np.zeros(len(codes), dtype=np.intp), np.zeros(len(codes), dtype=np.bool_)
        wanted = np.ascontiguousarray(codes).view(self.keys.dtype).ravel()
        rows = np.minimum(np.searchsorted(self.keys, wanted), len(self.keys) - 1)
        return rows, self.keys[rows] == wanted


class SegmentedIndex:
    """A :class:`~federation.index.engines.SearchIndex` built to hold millions of hashes.

    ``fresh`` makes the fresh segment's engine, ``large`` builds the large
    segment's over sorted codes; :meth:`binary` and :meth:`l2` are the two
    pairings the signal types use.
    """

    def __init__(
        self,
        signal: CodeFormat,
        codes: Codes | None = None,
        *,
        fresh: Callable[[CodeFormat], FreshEngine],
        large: Callable[[Codes], LargeEngine],
        distance_limit: int,
        fresh_limit: int = DEFAULT_FRESH_LIMIT,
        background_merge: bool = True,
        on_merged: Callable[[float], None] | None = None,
    ) -> None:
        self.signal = signal
        self.fresh_limit = fresh_limit
        self.background_merge = background_merge
        self.on_merged = on_merged
        self.distance_limit = distance_limit
        self._width = signal.byte_length
        self._new_fresh = fresh
        self._new_large = large
        self._lock = threading.Lock()
        empty = np.empty((0, self._width), np.uint8)
        self._large = _Large.from_sorted(
            sorted_unique(codes if codes is not None else empty, self._width), large
        )
        self._deleted = np.zeros(len(self._large.codes), dtype=np.bool_)
        self._hidden = 0
        self._fresh = fresh(signal)
        self._pending: list[tuple[bool, bytes]] | None = None
        self._merger: threading.Thread | None = None
        self.merges = 0

    # ---- updates ----------------------------------------------------------

    def add(self, hashes: Sequence[str]) -> None:
        raw = decode_hashes(self.signal, hashes)
        with self._lock:
            self._apply(True, raw)
            if self._pending is not None:
                self._pending.append((True, raw))
            start_merge = self._merger is None and len(self._fresh) >= self.fresh_limit
        if start_merge:
            self.merge(wait=not self.background_merge)

    def remove(self, hashes: Sequence[str]) -> None:
        raw = decode_hashes(self.signal, hashes)
        with self._lock:
            self._apply(False, raw)
            if self._pending is not None:
                self._pending.append((False, raw))

    def _apply(self, listed: bool, raw: bytes) -> None:
        """Add or remove raw codes (the lock is held)."""
        codes = _as_rows(raw, self._width)
        rows, present = self._large.rows(codes)
        hits = rows[present]
        changing = np.unique(hits[self._deleted[hits] == listed])
        if len(changing):
            # Copy on write: a search already under way keeps the bitmap it started with.
            deleted = self._deleted.copy()
            deleted[changing] = not listed
            self._deleted = deleted
            self._hidden += len(changing) if not listed else -len(changing)
        others = codes[~present]
        if len(others):
            others_hex = [row.tobytes().hex() for row in others]
            if listed:
                self._fresh.add(others_hex)
            else:
                self._fresh.remove(others_hex)

    # ---- merging ----------------------------------------------------------

    def merge(self, *, wait: bool = True) -> None:
        """Fold the fresh segment and the deletions into a new large segment."""
        with self._lock:
            if self._merger is not None:
                merger = self._merger
            else:
                # The large segment's codes are immutable: with nothing hidden the
                # merge reads them in place instead of copying 32 bytes per hash.
                kept = self._large.codes if self._hidden == 0 else self._large.codes[~self._deleted]
                parts = [(kept, self._fresh.codes())]
                self._pending = []
                merger = self._merger = threading.Thread(
                    target=self._build_and_swap, args=(parts,), name="hashfed-merge", daemon=True
                )
                merger.start()
        if wait:
            merger.join()

    def _build_and_swap(self, parts: list[tuple[Codes, Codes]]) -> None:
        # Taken out of the list so the inputs can be freed before the index is
        # built: at 10M hashes each is 320 MB, and a merge already holds two segments.
        kept, fresh = parts.pop()
        started = time.perf_counter()
        codes = merge_sorted(kept, fresh)
        del kept, fresh
        large = _Large.from_sorted(codes, self._new_large)
        del codes
        with self._lock:
            pending = self._pending or []
            self._large = large
            self._deleted = np.zeros(len(large.codes), dtype=np.bool_)
            self._hidden = 0
            self._fresh = self._new_fresh(self.signal)
            for listed, raw in pending:
                self._apply(listed, raw)
            self._pending = None
            self._merger = None
            self.merges += 1
        if self.on_merged is not None:
            self.on_merged(time.perf_counter() - started)

    def _live_codes(self) -> Codes:
        """Every listed code (the lock is held)."""
        fresh = self._fresh.codes()
        return np.concatenate([self._large.codes[~self._deleted], fresh])

    def live_codes(self) -> Codes:
        with self._lock:
            return self._live_codes()

    # ---- lookups ----------------------------------------------------------

    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]:
        check_max_distance(self.distance_limit, max_distance)
        raw = decode_hashes(self.signal, queries)
        # Each segment keeps what the merged answer may need (see budget.py).
        fresh_budget = budget.fork() if budget is not None else None
        large_budget = budget.fork() if budget is not None else None
        with self._lock:
            # The fresh segment is small: searching it under the lock, with the large
            # segment's state taken at the same instant, means a lookup sees every
            # batch of updates whole or not at all.
            large, deleted, hidden = self._large, self._deleted, self._hidden
            results = self._fresh.search(queries, max_distance, fresh_budget)
        if large.index is not None and queries:
            found = large.index.search(
                _as_rows(raw, self._width), max_distance, deleted if hidden else None, budget=large_budget
            )
            for matches, (rows, distances) in zip(results, found, strict=True):
                if len(rows) == 0:
                    continue
                hexes = [row.tobytes().hex() for row in large.codes[rows]]
                matches.extend(zip(hexes, distances.tolist(), strict=True))
                matches.sort(key=lambda match: (match[1], match[0]))
        if budget is not None and fresh_budget is not None and large_budget is not None:
            budget.cut(results, fresh_budget.truncated | large_budget.truncated)
        return results

    def __len__(self) -> int:
        with self._lock:
            return len(self._large.codes) - self._hidden + len(self._fresh)

    def segment_sizes(self) -> dict[str, int]:
        """Live hashes in the large (immutable) segment and in the fresh one."""
        with self._lock:
            return {"large": len(self._large.codes) - self._hidden, "fresh": len(self._fresh)}

    def __contains__(self, hash_hex: object) -> bool:
        try:
            raw = decode_hashes(self.signal, [hash_hex])  # type: ignore[list-item]
        except (ValueError, TypeError):
            return False
        with self._lock:
            rows, present = self._large.rows(_as_rows(raw, self._width))
            if present[0]:
                return not bool(self._deleted[rows[0]])
            return hash_hex in self._fresh

    @property
    def nbytes(self) -> int:
        with self._lock:
            # MihIndex.nbytes already counts the codes array it shares with the segment.
            if self._large.index is not None:
                return self._large.index.nbytes + self._deleted.nbytes
            return self._large.codes.nbytes + self._deleted.nbytes

    # ---- the two pairings the signal types use ----------------------------

    @classmethod
    def binary(cls, signal: CodeFormat, codes: Codes | None = None, **options: object) -> SegmentedIndex:
        """Hamming radius: FAISS binary flat for fresh codes, multi-index hashing for the large segment."""
        return cls(
            signal,
            codes,
            fresh=FaissBinaryIndex,
            large=MihIndex,
            distance_limit=signal.bits,
            **options,  # type: ignore[arg-type]
        )

    @classmethod
    def l2(cls, signal: CodeFormat, codes: Codes | None = None, **options: object) -> SegmentedIndex:
        """Squared Euclidean radius: FAISS float flat (re-ranked) for fresh codes, a pruned exact search for the large."""
        from .pruned import PrunedL2Index

        return cls(
            signal,
            codes,
            fresh=FlatL2Index,
            large=PrunedL2Index,
            distance_limit=signal.byte_length * 255 * 255,
            **options,  # type: ignore[arg-type]
        )
