"""Exact multi-index hashing (MIH) over an immutable set of 256-bit codes.

``MihIndex`` answers Hamming-radius lookups over PDQ codes exactly, for any
radius from 0 to 256, in plain numpy (no FAISS). It is meant for the large
immutable segment of design §2: built once from a snapshot of codes, searched
from worker threads, never mutated; deletions are a bitmap the caller passes
to :meth:`MihIndex.search`.

How it works (Norouzi, Punjani and Fleet, "Fast search in Hamming space with
multi-index hashing", CVPR 2012):

* The 256 bits are cut into ``m`` disjoint substrings (tables) of ``b_t`` bits.
  If two codes differ in at most ``R`` bits and a table ``t`` is probed at
  radius ``r_t`` (every key within ``r_t`` bits of the query's substring),
  then whenever ``sum(r_t + 1) > R`` at least one table has the other code in
  a probed bucket (pigeonhole: otherwise every substring differs in at least
  ``r_t + 1`` bits, ``sum(r_t + 1) > R`` in total). A table with ``r_t = -1``
  is not probed at all, so ``R = 0`` probes a single bucket of a single table.
* For each ``R`` the radii are chosen greedily: ``R + 1`` times, raise the
  radius of the table whose next ring of keys is cheapest to probe. The
  marginal cost ``C(b_t, r_t + 1)`` grows with ``r_t``, so greedy is optimal
  for this separable cost.
* Every candidate is verified (xor + ``np.bitwise_count``), so results are
  exact; candidates found in several tables are deduplicated after
  verification, when only true matches remain.

Layout (memory, ``n`` codes):

* ``codes``: the codes as ``uint64[n, 4]`` (32 B per code), gathered row-wise
  with ``np.take`` to verify candidates.
* ``ids``: for each table, the row numbers sorted by that table's substring
  key, all tables concatenated: ``uint32[m * n]`` (4 B per code per table).
* ``offsets``: a direct CSR offsets table per table, ``2**b_t`` entries, all
  tables concatenated into one array (``uint32``, ``int64`` only when
  ``m * n >= 2**32``). Bucket ``k`` of table ``t`` is
  ``ids[offsets[base_t + k] : offsets[base_t + k + 1]]``.

  A direct table beats "sorted keys + ``np.searchsorted``": the widths are
  chosen with ``2**b_t`` close to ``n`` (see below), so the offsets table is
  about as large as a sorted copy of the keys would be (4 B per code per
  table), but a probe costs two adjacent reads instead of two binary searches
  of ``log2(n)`` cache misses each. Tables are laid out widest first, so every
  ``base_t`` is a multiple of ``2**b_t`` and ``(key ^ mask) + base_t ==
  (key + base_t) ^ mask``: one xor per probe turns a query key into a global
  offsets position, for all tables at once.

At 10M codes the automatic layout is 11 tables (3 of 24 bits, 8 of 23):
320 MB codes + 440 MB ids + 470 MB offsets = 1.23 GB.

Choosing the layout and whether to probe or scan: :mod:`.mih_plan`.

Thread safety: the index is immutable after construction; the only mutable
state is a cache of per-radius probe plans behind a lock. Searches may run
concurrently from several threads (numpy releases the GIL in the heavy parts).
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from .budget import MatchBudget
from .mih_plan import (
    MAX_PROBE_KEYS,
    SCAN_NS,
    choose_radii,
    choose_widths,
    flip_masks,
    probe_cost_ns,
)
from .mih_tables import (
    CODE_BITS,
    CODE_WORDS,
    Codes64,
    TableFiller,
    as_codes,
    offsets_dtype,
    table_buckets,
    write_tables,
)

_CANDIDATE_BUDGET = 1 << 14
"""Candidates per sub-batch of a batched search (about 5 queries at 10M, radius 31).

Small sub-batches keep each temporary under ~1 MiB: in cache, and below the
sizes where glibc hands out fresh mmap'd memory that must be faulted in again
for every sub-batch. Measured at 10M: ~15k candidates per sub-batch gave
~7,000 lookups/s; ~20k already 25-70 page faults per query in some processes
and ~4,900 lookups/s; 2-4 times more, 3,300-5,000 lookups/s."""
_PROBE_CHUNK = 1 << 14
"""Buckets probed per pass of a single query (bounds its temporaries)."""
_SCAN_BLOCK = 1 << 15
"""Rows per block of the linear scan (1 MiB of codes: stays in cache)."""

IntArray = npt.NDArray[np.int64]
Result = tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]
Method = Literal["auto", "probe", "scan"]


def popcount_distances(xored: Codes64) -> npt.NDArray[np.uint32]:
    """Popcount of each ``uint64[k, 4]`` row (the Hamming distance when ``xored = a ^ b``)."""
    counts = np.bitwise_count(xored)  # uint8[k, 4], each <= 64
    packed = counts.view(np.uint32).reshape(-1)  # the four byte counts of a row in one word
    # Multiplying by 0x01010101 sums the four bytes into the top byte; the sum
    # only overflows it for 4 * 64 = 256 (a row of all ones), patched after.
    result: npt.NDArray[np.uint32] = (packed * np.uint32(0x01010101)) >> np.uint32(24)
    np.add(result, np.uint32(CODE_BITS), out=result, where=packed == np.uint32(0x40404040))
    return result


@dataclass(frozen=True)
class _Plan:
    """How to answer one radius: probe these global offsets positions, or scan."""

    radius: int
    scan: bool
    radii: tuple[int, ...]
    probe_table: npt.NDArray[np.intp]
    """For each probe, the table whose (base-shifted) query key it flips."""
    probe_mask: IntArray
    keys_per_query: int
    estimated_candidates: float


@dataclass(frozen=True)
class _Cut:
    """The budget's say over the queries of one step, which start at ``first``."""

    budget: MatchBudget | None
    first: int

    def keep(self, offset: int, found: int) -> int:
        return found if self.budget is None else self.budget.take(self.first + offset, found)


class MihIndex:
    """Exact Hamming-radius search over an immutable set of 256-bit codes.

    ``ids`` (optional, one int64 per code) are returned instead of row numbers.
    Duplicated codes are separate rows and are all returned.
    """

    def __init__(
        self,
        codes: npt.ArrayLike,
        ids: npt.ArrayLike | None = None,
        *,
        widths: tuple[int, ...] | None = None,
        tables: tuple[npt.NDArray[np.uint32], npt.NDArray[np.integer]] | None = None,
    ) -> None:
        """Build the tables over ``codes``, or take ``tables`` already built (a mapped segment)."""
        self._codes = as_codes(codes)
        n = len(self._codes)
        if ids is None:
            self._ids: IntArray | None = None
        else:
            external = np.ascontiguousarray(ids, dtype=np.int64)
            if external.shape != (n,):
                raise ValueError(f"ids must be one int64 per code: expected shape ({n},)")
            self._ids = external
        if n >= 1 << 32:
            raise ValueError("at most 2**32 - 1 codes per index")
        if widths is None:
            widths = choose_widths(n)
        if sum(widths) != CODE_BITS or any(not 1 <= width <= 32 for width in widths):
            raise ValueError("widths must be 1 to 32 bits each and cover exactly 256 bits")
        widths = tuple(sorted(widths, reverse=True))
        self.widths = widths
        starts = np.cumsum((0, *widths[:-1])).tolist()
        self._starts: tuple[int, ...] = tuple(int(start) for start in starts)
        # Per-table recipe for a substring key, vectorised over tables:
        # (word[lo] >> shift | (word[hi] & spill) << carry) & mask.
        words, shifts = np.divmod(np.array(self._starts, dtype=np.int64), 64)
        spills = shifts + np.array(widths, dtype=np.int64) - 64
        self._key_lo = words.astype(np.intp)
        self._key_hi = np.minimum(words + 1, CODE_WORDS - 1).astype(np.intp)
        self._key_shift = shifts.astype(np.uint64)
        self._key_spill = np.array(
            [(1 << int(spill)) - 1 if spill > 0 else 0 for spill in spills], dtype=np.uint64
        )
        self._key_carry = np.where(spills > 0, 64 - shifts, 0).astype(np.uint64)
        self._key_mask = np.array([(1 << width) - 1 for width in widths], dtype=np.uint64)
        bases = np.cumsum((0, *(1 << width for width in widths[:-1]))).tolist()
        self._bases = np.array(bases, dtype=np.int64)
        if tables is None:
            sorted_rows = TableFiller(len(widths) * n, np.uint32)
            offsets = TableFiller(table_buckets(widths) + 1, offsets_dtype(widths, n))
            write_tables(
                lambda start, stop: self._codes[start:stop], n, widths, sorted_rows.write, offsets.write
            )
            self._sorted_rows, self._offsets = sorted_rows.array, offsets.array
        else:
            self._sorted_rows, self._offsets = tables
            if self._sorted_rows.shape != (len(widths) * n,) or self._offsets.shape != (
                table_buckets(widths) + 1,
            ):
                raise ValueError("the tables given do not fit these codes and widths")
        self._plans: dict[tuple[int, str], _Plan] = {}
        self._masks: dict[tuple[int, int], IntArray] = {}
        self._lock = threading.Lock()

    def tables(self) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.integer]]:
        """The sorted rows and the offsets (what :func:`write_tables` writes, for ``tables=``)."""
        return self._sorted_rows, self._offsets

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays this index holds (codes, ids, sorted rows, offsets)."""
        held = self._codes.nbytes + self._sorted_rows.nbytes + self._offsets.nbytes
        if self._ids is not None:
            held += self._ids.nbytes
        return held

    def plan(self, max_distance: int, method: Method = "auto") -> tuple[str, tuple[int, ...]]:
        """``("probe", radii)`` or ``("scan", ())``: how a search at this radius runs."""
        chosen = self._plan(max_distance, method)
        return ("scan", ()) if chosen.scan else ("probe", chosen.radii)

    def search(
        self,
        queries: npt.ArrayLike,
        max_distance: int,
        deleted: npt.ArrayLike | None = None,
        *,
        method: Method = "auto",
        budget: MatchBudget | None = None,
    ) -> list[Result]:
        """For each query, ``(ids, distances)`` of every code within ``max_distance``.

        Exact and inclusive. Results are sorted by distance, then by row.
        ``deleted``, if given, is a bool array with one flag per row (the order
        the codes were given at build); flagged rows are never returned.
        ``method`` forces probing or scanning (for tests and benchmarks); both
        give the same answers, ``"auto"`` picks the cheaper by estimate.
        ``budget`` keeps only the nearest matches it allows of each query,
        cut before the query's result arrays are made.
        """
        if isinstance(max_distance, bool) or not isinstance(max_distance, int | np.integer):
            raise TypeError("max_distance must be an integer")
        max_distance = int(max_distance)
        if not 0 <= max_distance <= CODE_BITS:
            raise ValueError(f"max_distance must be from 0 to {CODE_BITS}")
        query_codes = as_codes(queries)
        n = len(self._codes)
        removed: npt.NDArray[np.bool_] | None = None
        if deleted is not None:
            removed = np.asarray(deleted, dtype=np.bool_)
            if removed.shape != (n,):
                raise ValueError(f"deleted must be one bool per row: expected shape ({n},)")
        if n == 0 or len(query_codes) == 0:
            return [self._empty() for _ in range(len(query_codes))]
        chosen = self._plan(max_distance, method)
        results: list[Result] = []
        if chosen.scan:
            for position, query in enumerate(query_codes):
                results.append(self._scan_one(query, max_distance, removed, _Cut(budget, position)))
            return results
        # Sub-batches hold about _CANDIDATE_BUDGET candidates: sized from the
        # uniform estimate first, then from the candidates actually met (biased
        # bits and clusters give more).
        per_query = max(chosen.estimated_candidates, chosen.keys_per_query, 1.0)
        seen = done = 0
        while done < len(query_codes):
            step = max(1, int(_CANDIDATE_BUDGET / per_query))
            chunk = query_codes[done : done + step]
            if step == 1:
                results.append(self._probe_one(chunk[0], chosen, removed, _Cut(budget, done)))
            else:
                found, candidates = self._probe_batch(chunk, chosen, removed, _Cut(budget, done))
                results.extend(found)
                seen += candidates
                per_query = max(seen / (done + len(chunk)), chosen.keys_per_query, 1.0)
            done += len(chunk)
        return results

    # -- planning ---------------------------------------------------------

    def _plan(self, radius: int, method: Method = "auto") -> _Plan:
        if method not in ("auto", "probe", "scan"):
            raise ValueError("method must be 'auto', 'probe' or 'scan'")
        cached = self._plans.get((radius, method))
        if cached is not None:
            return cached
        n = len(self._codes)
        widths = self.widths
        # sum(b_t + 1) = 256 + m > radius always, so some radii satisfy the pigeonhole rule.
        load = tuple(n / 2.0**width for width in widths)
        radii = choose_radii(widths, radius, load)
        cost, keys = probe_cost_ns(widths, radii, n)
        candidates = sum(
            sum(math.comb(width, k) for k in range(r + 1)) * n / 2.0**width
            for width, r in zip(widths, radii, strict=True)
        )
        scan = (keys > MAX_PROBE_KEYS or cost >= SCAN_NS * n) if method == "auto" else method == "scan"
        if scan:
            plan = _Plan(radius, True, (), np.empty(0, np.intp), np.empty(0, np.int64), 0, float(n))
        else:
            tables: list[npt.NDArray[np.intp]] = []
            masks: list[IntArray] = []
            for table, (width, r) in enumerate(zip(widths, radii, strict=True)):
                if r < 0:
                    continue
                flips = self._flip_masks(width, r)
                tables.append(np.full(len(flips), table, dtype=np.intp))
                masks.append(flips)
            plan = _Plan(
                radius, False, radii, np.concatenate(tables), np.concatenate(masks), keys, candidates
            )
        with self._lock:
            return self._plans.setdefault((radius, method), plan)

    def _flip_masks(self, width: int, radius: int) -> IntArray:
        cached = self._masks.get((width, radius))
        if cached is None:
            cached = flip_masks(width, radius)
            with self._lock:
                cached = self._masks.setdefault((width, radius), cached)
        return cached

    def _query_keys(self, query_codes: Codes64) -> IntArray:
        """``int64[q, m]``: each query's substring keys shifted to its table's offsets base."""
        low = np.take(query_codes, self._key_lo, axis=1) >> self._key_shift
        high = np.take(query_codes, self._key_hi, axis=1) & self._key_spill
        low |= high << self._key_carry
        low &= self._key_mask
        keys = low.view(np.int64)
        keys += self._bases
        return keys

    # -- searching ----------------------------------------------------------

    def _candidates(self, probes: IntArray) -> tuple[npt.NDArray[np.uint32], npt.NDArray[np.int64]]:
        """Rows in the probed buckets (flattened in probe order) and the running total after each probe."""
        flat = probes.reshape(-1)
        lows = np.take(self._offsets, flat)
        flat += 1  # the caller's probes are scratch
        highs = np.take(self._offsets, flat)
        counts = highs - lows
        ends = np.cumsum(counts, dtype=np.int64)
        total = int(ends[-1])
        if total == 0:
            return np.empty(0, np.uint32), ends
        # Bucket j's rows are ids[lows[j]:highs[j]] and land at [ends[j] - counts[j], ends[j])
        # of the output: position p reads ids[p + highs[j] - ends[j]].
        positions = np.arange(total, dtype=np.int64)
        positions += np.repeat(highs - ends, counts)
        return np.take(self._sorted_rows, positions), ends

    def _probe_one(
        self, query: Codes64, plan: _Plan, removed: npt.NDArray[np.bool_] | None, cut: _Cut
    ) -> Result:
        keys = self._query_keys(query.reshape(1, CODE_WORDS))[0]
        probes = np.take(keys, plan.probe_table) ^ plan.probe_mask
        found_rows: list[npt.NDArray[np.uint32]] = []
        found_distances: list[npt.NDArray[np.uint32]] = []
        # Large radii probe many buckets: chunks keep the temporaries in cache.
        for begin in range(0, len(probes), _PROBE_CHUNK):
            rows, _ = self._candidates(probes[begin : begin + _PROBE_CHUNK])
            if len(rows) == 0:
                continue
            xored = np.take(self._codes, rows, axis=0)
            xored ^= np.repeat(query.reshape(1, CODE_WORDS), len(rows), axis=0)
            distances = popcount_distances(xored)
            keep = distances <= plan.radius
            found_rows.append(rows[keep])
            found_distances.append(distances[keep])
        if not found_rows:
            return self._empty()
        if len(found_rows) == 1:
            rows, distances = found_rows[0], found_distances[0]
        else:
            rows, distances = np.concatenate(found_rows), np.concatenate(found_distances)
        if removed is not None:
            live = ~removed[rows]
            rows, distances = rows[live], distances[live]
        n = len(self._codes)
        # Sort by (distance, row); a row found through several tables collapses.
        order = np.sort(distances.astype(np.int64) * n + rows)
        if len(order) > 1:
            order = order[np.concatenate(([True], order[1:] != order[:-1]))]
        order = order[: cut.keep(0, len(order))]
        return self._result(order % n, order // n)

    def _probe_batch(
        self, query_codes: Codes64, plan: _Plan, removed: npt.NDArray[np.bool_] | None, cut: _Cut
    ) -> tuple[list[Result], int]:
        """Results of a few queries at once, and the number of candidates they met."""
        count = len(query_codes)
        keys = self._query_keys(query_codes)
        probes = np.take(keys, plan.probe_table, axis=1) ^ plan.probe_mask
        rows, ends = self._candidates(probes)
        candidates = len(rows)
        if candidates == 0:
            return [self._empty() for _ in range(count)], 0
        per_query = np.diff(ends[probes.shape[1] - 1 :: probes.shape[1]], prepend=0)
        owner = np.repeat(np.arange(count, dtype=np.int64), per_query)
        xored = np.take(self._codes, rows, axis=0)
        xored ^= np.take(query_codes, owner, axis=0)
        distances = popcount_distances(xored)
        del xored
        keep = distances <= plan.radius
        rows, distances, owner = rows[keep], distances[keep], owner[keep]
        if removed is not None:
            live = ~removed[rows]
            rows, distances, owner = rows[live], distances[live], owner[live]
        n = len(self._codes)
        # One sort key orders by (query, distance, row) and collapses a row
        # found through several tables.
        order = np.sort((owner * (CODE_BITS + 1) + distances) * n + rows)
        if len(order) > 1:
            order = order[np.concatenate(([True], order[1:] != order[:-1]))]
        found_rows = order % n
        rest = order // n
        found_distances = rest % (CODE_BITS + 1)
        bounds = np.searchsorted(rest // (CODE_BITS + 1), np.arange(count + 1))
        results = []
        for offset, (lo, hi) in enumerate(itertools.pairwise(bounds.tolist())):
            hi = lo + cut.keep(offset, hi - lo)
            results.append(self._result(found_rows[lo:hi], found_distances[lo:hi]))
        return results, candidates

    def _scan_one(
        self, query: Codes64, radius: int, removed: npt.NDArray[np.bool_] | None, cut: _Cut
    ) -> Result:
        found_rows: list[IntArray] = []
        found_distances: list[npt.NDArray[np.uint32]] = []
        for begin in range(0, len(self._codes), _SCAN_BLOCK):
            distances = popcount_distances(self._codes[begin : begin + _SCAN_BLOCK] ^ query)
            hits = np.flatnonzero(distances <= radius)
            if len(hits):
                found_rows.append(hits + begin)
                found_distances.append(distances[hits])
        if not found_rows:
            return self._empty()
        rows = np.concatenate(found_rows)
        distances = np.concatenate(found_distances)
        if removed is not None:
            live = ~removed[rows]
            rows, distances = rows[live], distances[live]
        order = np.argsort(distances, kind="stable")[: cut.keep(0, len(rows))]
        return self._result(rows[order], distances[order])

    def _result(self, rows: npt.NDArray[np.integer], distances: npt.NDArray[np.integer]) -> Result:
        row_ids = rows.astype(np.int64)
        ids = row_ids if self._ids is None else np.take(self._ids, row_ids)
        return ids, distances.astype(np.int32)

    @staticmethod
    def _empty() -> Result:
        return np.empty(0, np.int64), np.empty(0, np.int32)
