"""Search engines behind lookups (design §2, §4, §4.1).

An index holds the current hashes of one signal type in one collection and
answers batched lookups. Which engine serves which type is the signal type's
choice (:mod:`federation.signals`); the engines know only fixed-width codes:

* :class:`FaissBinaryIndex`: Hamming radius over binary codes (PDQ), FAISS flat.
* :class:`FlatL2Index`: squared Euclidean radius over byte vectors (PhotoDNA),
  FAISS flat in float32 for candidates, re-ranked exactly in integers.
* :class:`ExactIndex`: identity, for cryptographic hashes.

Every engine is called from worker threads, never from the event loop. Each
holds a lock so a search never sees a half-applied add or remove.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import faiss
import numpy as np
import numpy.typing as npt

from federation.signals.base import SignalError

from .budget import MatchBudget

Codes = npt.NDArray[np.uint8]
Match = tuple[str, int]

COMPACT_MIN_DELETED = 1024
"""Deleted ids tolerated before a compaction is even considered."""

_INITIAL_CAPACITY = 64


class CodeFormat(Protocol):
    """What an engine needs to know of a signal type: its name and the width of its codes."""

    @property
    def name(self) -> str: ...
    @property
    def hex_length(self) -> int: ...
    @property
    def byte_length(self) -> int: ...
    @property
    def bits(self) -> int: ...


class SearchIndex(Protocol):
    signal: CodeFormat

    def add(self, hashes: Sequence[str]) -> None:
        """Add normalised hex hashes; a hash already present is ignored."""
        ...

    def remove(self, hashes: Sequence[str]) -> None:
        """Remove hashes; a hash not present is ignored."""
        ...

    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]:
        """One list per query, in order, of (hash, distance) sorted by (distance, hash).

        Every present hash within ``max_distance`` (inclusive) is returned, or
        as many of the nearest as ``budget`` allows (it records the cut). Exact
        signal types ignore ``max_distance`` and match identical hashes only.
        """
        ...

    def __len__(self) -> int: ...

    def __contains__(self, hash_hex: object) -> bool: ...


def decode_hashes(signal: CodeFormat, hashes: Sequence[str]) -> bytes:
    """Concatenated raw bytes of a batch of hex hashes, decoded in one call.

    Lengths are checked first so that one malformed hash cannot shift the
    others; the total is checked after because ``bytes.fromhex`` skips spaces.
    """
    for text in hashes:
        if not isinstance(text, str) or len(text) != signal.hex_length:
            raise SignalError(f"{signal.name} hash must be {signal.hex_length} hex digits: {text!r}")
    try:
        raw = bytes.fromhex("".join(hashes))
    except ValueError as exc:
        raise SignalError(f"{signal.name} hashes must be hex digits") from exc
    if len(raw) != len(hashes) * signal.byte_length:
        raise SignalError(f"{signal.name} hashes must be hex digits without spaces")
    return raw


def _key(signal: CodeFormat, hash_hex: object) -> bytes | None:
    """Raw bytes of one hash, or None when it is not a valid hash of this type."""
    try:
        return decode_hashes(signal, [hash_hex.lower()]) if isinstance(hash_hex, str) else None
    except SignalError:
        return None


def check_max_distance(limit: int, max_distance: int) -> None:
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or not 0 <= max_distance <= limit:
        raise ValueError(f"max_distance must be an integer from 0 to {limit}")


class _FlatFaissIndex(ABC):
    """A FAISS flat index of fixed-width codes that takes adds and removes at once.

    FAISS assigns ids sequentially and a flat index cannot drop a code
    cheaply, so removal only sets a bit in a deletion bitmap that searches
    filter on. Once deleted ids outnumber live ones (and at least
    ``compact_min`` are deleted), the index is rebuilt from the live codes.
    A copy of every stored code is kept beside FAISS to rebuild from, to
    re-rank against and to turn ids back into hex. Subclasses choose the
    FAISS index and how its range search becomes exact distances.
    """

    distance_limit: int

    def __init__(self, signal: CodeFormat, *, compact_min: int = COMPACT_MIN_DELETED) -> None:
        if compact_min < 0:
            raise ValueError("compact_min must not be negative")
        self.signal = signal
        self._compact_min = compact_min
        self._lock = threading.Lock()
        self._width = signal.byte_length
        self._faiss = self._new_faiss()
        self._codes: Codes = np.zeros((_INITIAL_CAPACITY, self._width), dtype=np.uint8)
        self._deleted = np.zeros(_INITIAL_CAPACITY, dtype=np.bool_)
        self._stored = 0
        self._ids: dict[bytes, int] = {}

    @abstractmethod
    def _new_faiss(self) -> Any:
        """A new, empty FAISS index for these codes."""

    def _faiss_add(self, index: Any, codes: Codes) -> None:
        index.add(codes)

    @abstractmethod
    def _within(
        self, batch: Codes, max_distance: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """``(lims, distances, ids)`` of every stored id within ``max_distance`` (lock held)."""

    @property
    def stored(self) -> int:
        """Ids in use, deleted ones included; it drops back on compaction."""
        return self._stored

    def add(self, hashes: Sequence[str]) -> None:
        raw = decode_hashes(self.signal, hashes)
        width = self._width
        with self._lock:
            fresh: dict[bytes, int] = {}
            for row in range(len(hashes)):
                key = raw[row * width : (row + 1) * width]
                if key not in self._ids and key not in fresh:
                    fresh[key] = row
            if not fresh:
                return
            batch = np.frombuffer(raw, dtype=np.uint8).reshape(-1, width)
            new_codes = batch[np.fromiter(fresh.values(), dtype=np.int64, count=len(fresh))]
            start = self._stored
            end = start + len(fresh)
            self._reserve(end)
            self._codes[start:end] = new_codes
            self._deleted[start:end] = False
            self._faiss_add(self._faiss, new_codes)
            self._ids.update(zip(fresh, range(start, end), strict=True))
            self._stored = end

    def remove(self, hashes: Sequence[str]) -> None:
        raw = decode_hashes(self.signal, hashes)
        width = self._width
        with self._lock:
            for row in range(len(hashes)):
                internal = self._ids.pop(raw[row * width : (row + 1) * width], None)
                if internal is not None:
                    self._deleted[internal] = True
            deleted = self._stored - len(self._ids)
            if deleted >= max(self._compact_min, 1) and 2 * deleted > self._stored:
                self._compact()

    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]:
        check_max_distance(self.distance_limit, max_distance)
        raw = decode_hashes(self.signal, queries)
        if not queries:
            return []
        batch = np.frombuffer(raw, dtype=np.uint8).reshape(-1, self._width)
        with self._lock:
            if not self._ids:
                return [[] for _ in queries]
            lims, distances, labels = self._within(batch, max_distance)
            live = ~self._deleted[labels]
            found = self._codes[labels[live]]
        kept = np.concatenate(([0], np.cumsum(live))).astype(np.int64)[lims]
        dists = distances[live]
        results: list[list[Match]] = []
        for query in range(len(queries)):
            lo, hi = int(kept[query]), int(kept[query + 1])
            if lo == hi:  # most queries of a batch: nothing to sort or cut
                results.append([])
                continue
            # Nearest first, ties by hash: the codes' bytes order as their hex does.
            order = np.lexsort((found[lo:hi].view(f"V{self._width}").ravel(), dists[lo:hi]))
            if budget is not None:
                order = order[: budget.take(query, len(order))]
            codes, near = found[lo:hi][order], dists[lo:hi][order].tolist()
            results.append([(code.tobytes().hex(), d) for code, d in zip(codes, near, strict=True)])
        return results

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, hash_hex: object) -> bool:
        key = _key(self.signal, hash_hex)
        return key is not None and key in self._ids

    def codes(self) -> Codes:
        """A copy of the live codes, ``uint8[n, bytes]``."""
        with self._lock:
            return self._codes[: self._stored][~self._deleted[: self._stored]].copy()

    def _reserve(self, size: int) -> None:
        """Grow the code and bitmap arrays geometrically so adds stay amortised O(1)."""
        capacity = len(self._codes)
        if size <= capacity:
            return
        while capacity < size:
            capacity *= 2
        codes: Codes = np.zeros((capacity, self._width), dtype=np.uint8)
        codes[: self._stored] = self._codes[: self._stored]
        deleted = np.zeros(capacity, dtype=np.bool_)
        deleted[: self._stored] = self._deleted[: self._stored]
        self._codes, self._deleted = codes, deleted

    def _compact(self) -> None:
        """Rebuild FAISS from the live codes and renumber ids (lock held)."""
        live = np.flatnonzero(~self._deleted[: self._stored])
        renumber = np.full(self._stored, -1, dtype=np.int64)
        renumber[live] = np.arange(len(live), dtype=np.int64)
        capacity = max(_INITIAL_CAPACITY, 2 * len(live))
        codes: Codes = np.zeros((capacity, self._width), dtype=np.uint8)
        codes[: len(live)] = self._codes[live]
        rebuilt = self._new_faiss()
        if len(live):
            self._faiss_add(rebuilt, codes[: len(live)])
        keys = list(self._ids)
        old = np.fromiter(self._ids.values(), dtype=np.int64, count=len(keys))
        self._ids = dict(zip(keys, renumber[old].tolist(), strict=True))
        self._faiss = rebuilt
        self._codes = codes
        self._deleted = np.zeros(capacity, dtype=np.bool_)
        self._stored = len(live)


class FaissBinaryIndex(_FlatFaissIndex):
    """Hamming-radius search over fixed-width binary codes (PDQ frames and images)."""

    def __init__(self, signal: CodeFormat, *, compact_min: int = COMPACT_MIN_DELETED) -> None:
        if signal.bits % 8:
            raise ValueError(f"{signal.name} codes are not whole bytes")
        self.distance_limit = signal.bits
        super().__init__(signal, compact_min=compact_min)

    def _new_faiss(self) -> Any:
        return faiss.IndexBinaryFlat(self.signal.bits)

    def _within(
        self, batch: Codes, max_distance: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        # FAISS keeps a binary hit only when distance < radius (strict; checked
        # empirically against faiss-cpu 1.15), so ask for one more bit.
        lims, distances, labels = self._faiss.range_search(batch, max_distance + 1)
        return lims.astype(np.int64), distances.astype(np.int64), labels.astype(np.int64)


L2_MARGIN = 64.0
"""Extra radius asked of FAISS so float rounding never drops a true hit (they are re-ranked exactly).

Byte vectors of 144 dimensions have integer squared distances up to
9,363,600; FAISS's batched path computes ``|x|^2 + |y|^2 - 2 x.y`` in float32,
whose rounding at sums up to 18.7 million is a few units at most."""


def squared_distances(queries: Codes, codes: Codes) -> npt.NDArray[np.int64]:
    """Exact squared Euclidean distance of each row of ``queries`` to the row of ``codes`` beside it."""
    difference = queries.astype(np.int32) - codes.astype(np.int32)
    distances: npt.NDArray[np.int64] = np.einsum("ij,ij->i", difference, difference).astype(np.int64)
    return distances


class FlatL2Index(_FlatFaissIndex):
    """Squared Euclidean radius over byte vectors (PhotoDNA), exact.

    FAISS's float32 flat index finds candidates within the radius plus
    :data:`L2_MARGIN`; each candidate's distance is then recomputed in
    integers and kept only when within the radius.
    """

    def __init__(self, signal: CodeFormat, *, compact_min: int = COMPACT_MIN_DELETED) -> None:
        self.distance_limit = signal.byte_length * 255 * 255
        super().__init__(signal, compact_min=compact_min)

    def _new_faiss(self) -> Any:
        return faiss.IndexFlatL2(self._width)

    def _faiss_add(self, index: Any, codes: Codes) -> None:
        index.add(codes.astype(np.float32))

    def _within(
        self, batch: Codes, max_distance: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        lims, _, labels = self._faiss.range_search(batch.astype(np.float32), max_distance + L2_MARGIN)
        lims, labels = lims.astype(np.int64), labels.astype(np.int64)
        owners = np.repeat(np.arange(len(batch)), np.diff(lims))
        exact = squared_distances(batch[owners], self._codes[labels])
        keep = exact <= max_distance
        counts = np.bincount(owners[keep], minlength=len(batch))
        return np.concatenate(([0], np.cumsum(counts))).astype(np.int64), exact[keep], labels[keep]


class ExactIndex:
    """Identity matching for cryptographic hashes (MD5, SHA-1, SHA-256)."""

    def __init__(self, signal: CodeFormat) -> None:
        self.signal = signal
        self._lock = threading.Lock()
        self._present: set[bytes] = set()

    def add(self, hashes: Sequence[str]) -> None:
        keys = self._keys(hashes)
        with self._lock:
            self._present.update(keys)

    def remove(self, hashes: Sequence[str]) -> None:
        keys = self._keys(hashes)
        with self._lock:
            self._present.difference_update(keys)

    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]:
        keys = self._keys(queries)
        with self._lock:
            found = [key in self._present for key in keys]
        return [
            [(key.hex(), 0)] if present and (budget is None or budget.take(position, 1)) else []
            for position, (key, present) in enumerate(zip(keys, found, strict=True))
        ]

    def __len__(self) -> int:
        return len(self._present)

    def __contains__(self, hash_hex: object) -> bool:
        key = _key(self.signal, hash_hex)
        return key is not None and key in self._present

    def _keys(self, hashes: Sequence[str]) -> list[bytes]:
        raw = decode_hashes(self.signal, hashes)
        width = self.signal.byte_length
        return [raw[row * width : (row + 1) * width] for row in range(len(hashes))]
