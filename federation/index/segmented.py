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

Given somewhere to write (``spill``), the large segment lives in files (see
:mod:`~federation.index.segment_files`): a merge streams the merged codes and
the engine's tables into a new segment directory and maps it, so the build
holds the old segment plus a table's worth of temporaries rather than two
segments, and other processes can map the same files. Without it (tests,
tools, a disk that refused the write) the segment is built in memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .budget import MatchBudget
from .engines import CodeFormat, FaissBinaryIndex, FlatL2Index, Match, check_max_distance, decode_hashes
from .mih import MihIndex
from .mih_plan import choose_widths
from .mih_tables import offsets_dtype, table_buckets, write_tables
from .segment_files import CODES, RowReader, Segment, SegmentBuilder, UnmappedRows

Codes = npt.NDArray[np.uint8]
Arrays = Mapping[str, npt.NDArray[np.generic]]
DEFAULT_FRESH_LIMIT = 32_768
"""Hashes the fresh (flat, linearly scanned) segment takes before a merge starts."""
_MERGE_ROWS = 1 << 18
"""Codes of the old segment copied per step of a merge into files."""
log = logging.getLogger("hashfed.index")


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


class LargeKind(Protocol):
    """How one engine is built over sorted codes: in memory, into a segment's files, or from them."""

    def build(self, codes: Codes) -> LargeEngine: ...

    def write(self, codes: RowReader, builder: SegmentBuilder) -> None: ...

    def open(self, codes: Codes, arrays: Arrays) -> LargeEngine: ...


class MihKind:
    """Multi-index hashing; its tables are written a table at a time (see :func:`write_tables`)."""

    def build(self, codes: Codes) -> LargeEngine:
        return MihIndex(codes)

    def write(self, codes: RowReader, builder: SegmentBuilder) -> None:
        n = len(codes)
        widths = choose_widths(n)
        builder.put("widths", np.array(widths, dtype=np.int64))
        rows = builder.stream("sorted_rows", np.uint32, (len(widths) * n,))
        offsets = builder.stream("offsets", offsets_dtype(widths, n), (table_buckets(widths) + 1,))
        write_tables(codes, n, widths, rows.write, offsets.write)
        builder.done("sorted_rows")
        builder.done("offsets")

    def open(self, codes: Codes, arrays: Arrays) -> LargeEngine:
        widths = tuple(int(width) for width in arrays["widths"])
        sorted_rows = arrays["sorted_rows"]
        offsets = arrays["offsets"]
        if sorted_rows.dtype != np.uint32 or offsets.dtype != offsets_dtype(widths, len(codes)):
            raise ValueError("the segment's tables have the wrong types")
        return MihIndex(codes, widths=widths, tables=(sorted_rows, offsets))  # type: ignore[arg-type]


class PrunedKind:
    """The pruned L2 engine; built in memory over the mapped codes, then its arrays are written."""

    def build(self, codes: Codes) -> LargeEngine:
        from .pruned import PrunedL2Index

        return PrunedL2Index(codes)

    def write(self, codes: RowReader, builder: SegmentBuilder) -> None:
        from .pruned import PrunedL2Index

        mapped = np.load(codes.path, mmap_mode="r", allow_pickle=False)
        for name, array in PrunedL2Index(mapped).arrays().items():
            builder.put(name, np.ascontiguousarray(array))

    def open(self, codes: Codes, arrays: Arrays) -> LargeEngine:
        from .pruned import PrunedL2Index

        return PrunedL2Index.from_arrays(codes, arrays)


def write_segment(
    builder: SegmentBuilder,
    kind: LargeKind,
    parts: list[tuple[Codes, npt.NDArray[np.bool_] | None]],
    fresh: Codes,
) -> Segment:
    """Write the live codes of ``parts`` (sorted, unique, minus rows flagged deleted) merged with ``fresh``.

    ``fresh`` holds no code of ``parts``. The codes are copied ``_MERGE_ROWS`` rows
    at a time, so the merge never holds them all in memory at once.
    """
    width = fresh.shape[1]
    extra = sorted_unique(fresh, width)
    extra_keys = extra.view(f"V{width}").ravel()
    count = len(extra) + sum(
        len(codes) - (int(deleted.sum()) if deleted is not None else 0) for codes, deleted in parts
    )
    writer = builder.stream(CODES, np.uint8, (count, width))
    taken = 0
    for codes, deleted in parts:
        for begin in range(0, len(codes), _MERGE_ROWS):
            chunk = np.asarray(codes[begin : begin + _MERGE_ROWS])
            live = chunk if deleted is None else chunk[~deleted[begin : begin + _MERGE_ROWS]]
            last = chunk[-1:].view(f"V{width}").ravel()
            upto = int(np.searchsorted(extra_keys, last, side="right")[0])
            writer.write(merge_sorted(live, extra[taken:upto]))
            taken = upto
    writer.write(extra[taken:])
    builder.done(CODES)
    if count:
        kind.write(builder.rows(CODES), builder)
    return builder.finish()


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

    segment: Segment | None = None
    """The files it is mapped from, if it was written to files."""

    @classmethod
    def from_sorted(cls, ordered: Codes, kind: LargeKind) -> _Large:
        """A segment built in memory over codes already sorted as bytes and unique."""
        width = ordered.shape[1]
        return cls(ordered, ordered.view(f"V{width}").ravel(), kind.build(ordered) if len(ordered) else None)

    @classmethod
    def mapped(cls, segment: Segment, kind: LargeKind) -> _Large:
        """A segment over files already written (its codes sorted and unique)."""
        codes = segment.codes
        width = codes.shape[1]
        index = kind.open(codes, segment.arrays) if len(codes) else None
        return cls(codes, codes.view(f"V{width}").ravel(), index, segment)

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
        large: LargeKind,
        distance_limit: int,
        fresh_limit: int = DEFAULT_FRESH_LIMIT,
        background_merge: bool = True,
        on_merged: Callable[[float], None] | None = None,
        spill: Callable[[], SegmentBuilder] | None = None,
        segment: Segment | None = None,
    ) -> None:
        """An index over ``codes`` (or over the mapped ``segment``); ``spill`` gives builders for segment files."""
        self.signal = signal
        self.fresh_limit = fresh_limit
        self.background_merge = background_merge
        self.on_merged = on_merged
        self.distance_limit = distance_limit
        self.spill = spill
        self.label = 0
        """A log position the caller keeps here (the last one it fully applied); a merge records the
        value current when it starts as the position its segment reflects at the latest."""
        self.merged_label = 0
        """``label`` as it was when the large segment now in use started being built."""
        self._width = signal.byte_length
        self._new_fresh = fresh
        self._kind = large
        self._lock = threading.Lock()
        self._unmapped: UnmappedRows | None = None
        """Finds rows in the large segment's files while the segment it replaces may still be mapped."""
        if segment is not None:
            if segment.codes.shape[1] != self._width:
                raise ValueError(f"the segment holds {segment.codes.shape[1]}-byte codes, not {self._width}")
            self._large = _Large.mapped(segment, large)
            self._unmapped = UnmappedRows(segment)
        else:
            empty = np.empty((0, self._width), np.uint8)
            ordered = sorted_unique(codes if codes is not None else empty, self._width)
            self._large = self._build_large([(ordered, None)], empty)
        self._deleted = np.zeros(len(self._large.codes), dtype=np.bool_)
        self._hidden = 0
        self._fresh = fresh(signal)
        self._pending: list[tuple[bool, bytes]] | None = None
        self._merger: threading.Thread | None = None
        self.merges = 0

    def now_serving(self) -> None:
        """Lookups use this index from now on (its first search says so too).

        Until then, an index opened over a published segment finds the rows
        of the changes replayed onto it in the segment's files rather than
        through its mapping, since the index it replaces may still be mapped
        and resident (see :class:`~federation.index.segment_files.UnmappedRows`).
        """
        with self._lock:
            self._unmapped = None

    @property
    def segment(self) -> Segment | None:
        """The files the large segment is mapped from, or None when it lives in memory."""
        with self._lock:
            return self._large.segment

    def _build_large(self, parts: list[tuple[Codes, npt.NDArray[np.bool_] | None]], fresh: Codes) -> _Large:
        """A large segment of the live codes of ``parts`` and ``fresh``: in files if possible, else in memory."""
        if self.spill is not None and (len(fresh) or any(len(codes) for codes, _ in parts)):
            try:
                with self.spill() as builder:
                    return _Large.mapped(write_segment(builder, self._kind, parts, fresh), self._kind)
            except OSError as exc:
                log.warning("could not write the index segment to files (%s); building it in memory", exc)
        live = [codes if deleted is None else codes[~deleted] for codes, deleted in parts]
        ordered = live[0] if len(live) == 1 else np.concatenate(live)
        return _Large.from_sorted(merge_sorted(ordered, fresh), self._kind)

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
        rows, present = (self._unmapped or self._large).rows(codes)
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
                # The large segment's codes are immutable, and the bitmap is replaced, never
                # changed: the merge reads both as they are now without copying them.
                deleted = self._deleted if self._hidden else None
                parts = [([(self._large.codes, deleted)], self._fresh.codes(), self.label)]
                self._pending = []
                merger = self._merger = threading.Thread(
                    target=self._build_and_swap, args=(parts,), name="hashfed-merge", daemon=True
                )
                merger.start()
        if wait:
            merger.join()

    def _build_and_swap(
        self, parts: list[tuple[list[tuple[Codes, npt.NDArray[np.bool_] | None]], Codes, int]]
    ) -> None:
        # Taken out of the list so the inputs can be freed once the segment is built.
        old, fresh, label = parts.pop()
        started = time.perf_counter()
        large = self._build_large(old, fresh)
        del old, fresh
        unmapped = UnmappedRows(large.segment) if large.segment is not None else None
        if unmapped is not None:
            unmapped.fence()  # read before taking the lock
        with self._lock:
            pending = self._pending or []
            self._large = large
            self._unmapped = unmapped
            self._deleted = np.zeros(len(large.codes), dtype=np.bool_)
            self._hidden = 0
            self._fresh = self._new_fresh(self.signal)
            for listed, raw in pending:
                self._apply(listed, raw)
            self._unmapped = None
            self._pending = None
            self._merger = None
            self.merged_label = label
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
            self._unmapped = None  # in service: the mapping is being read now anyway
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

    @property
    def unmerged(self) -> int:
        """Changes a merge would fold in: hashes in the fresh segment plus rows hidden in the large one."""
        with self._lock:
            return len(self._fresh) + self._hidden

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
            large=MihKind(),
            distance_limit=signal.bits,
            **options,  # type: ignore[arg-type]
        )

    @classmethod
    def l2(cls, signal: CodeFormat, codes: Codes | None = None, **options: object) -> SegmentedIndex:
        """Squared Euclidean radius: FAISS float flat (re-ranked) for fresh codes, a pruned exact search for the large."""
        return cls(
            signal,
            codes,
            fresh=FlatL2Index,
            large=PrunedKind(),
            distance_limit=signal.byte_length * 255 * 255,
            **options,  # type: ignore[arg-type]
        )
