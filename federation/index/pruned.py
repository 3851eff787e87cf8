"""Exact squared-Euclidean radius search over an immutable set of byte vectors (PhotoDNA).

``PrunedL2Index`` is the large segment's engine for PhotoDNA (144-byte
vectors, distance = the sum of squared byte differences). Every vector within
the asked radius is returned and none outside it: candidates are only ever
*pruned* by a proven lower bound, and every survivor is re-ranked exactly.

How it prunes (the triangle inequality around cell pivots, then a projection):

* The vectors are projected onto their 16 principal directions (PCA of a
  sample; the projection ``P`` is orthonormal, so ``|P(x - q)| <= |x - q|``).
* They are split into **cells** of about ``cell_size`` vectors: k-means in the
  projection, within coarser k-means cells (cheap to train and to assign 10
  million vectors). Each cell's pivot ``p`` is the mean of its members in the
  full space, and each member keeps ``r(x) = |x - p|``. Nothing below needs a
  vector to sit in the cell of its nearest pivot, so the approximate
  assignment costs no exactness.
* For a query ``q`` and radius ``R`` (a hit has ``|q - x| <= sqrt(R)``), a
  cell can hold a hit only if ``|P(q) - P(p)|`` is at most ``sqrt(R)`` plus
  the largest ``|P(x) - P(p)|`` of its members: one float32 matrix product
  per 64 queries tests that for every cell (this all-pivot pass is the fixed
  cost of a query, so cells are small but not tiny).
* In the cells left, a member can be a hit only if ``|d - r(x)| <= sqrt(R)``,
  ``d = |q - p|``. ``d`` is bounded without touching the 144 bytes of the
  pivot: with ``a`` and ``b`` the parts of ``q`` and ``p`` the projection
  leaves out, ``d^2 = |P(q - p)|^2 + |a - b|^2`` and
  ``||a| - |b|| <= |a - b| <= |a| + |b|``. Cells whose members' ``r`` all
  miss that interval are skipped; in the others each member's ``r`` is
  checked.
* Survivors are checked against their stored projection (int16, in units of
  1/8), then re-ranked exactly: ``|q|^2 + |x|^2 - 2 q.x`` with the dot product
  in float32 (exact: every partial sum is an integer below 2^24 for 144
  bytes) and the sum in 64-bit integers.
* Every bound is widened by a slack that covers its float rounding, so
  rounding can only keep extra candidates, never drop a true hit.

Where pruning cannot work (vectors spread uniformly in 144 dimensions: every
vector sits at about the same distance from every pivot) the candidates
approach the whole set; past :data:`SCAN_FRACTION` of it a query is answered
by an exact blocked scan instead, which costs about what brute force costs.
docs/benchmarks.md measures both kinds of corpus.

Memory beyond the codes themselves (which the segment shares): per vector 4 B
of row order, 8 B of sort key, 4 B of squared norm and 32 B of projection;
per cell a 16-dimension projection of its pivot and five numbers, and (for the
radius last asked) an 18-number row of the all-pivot product.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from .budget import MatchBudget
from .pruned_cells import (
    CHUNK,
    assign_cells,
    cell_means,
    choose_coarse_cells,
    distances_to_pivots,
    principal_directions,
    projected_reach,
)

Codes = npt.NDArray[np.uint8]
Result = tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]
Hits = tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]

DEFAULT_CELL_SIZE = 16
"""Vectors per fine cell, on average."""
SLACK = 0.01
"""Added to every bound on ``|q - x|`` (units of distance, not squared): float64 pivot
distances are off by far less than this."""
SCAN_FRACTION = 0.2
"""A query whose candidates exceed this share of the vectors is answered by a scan."""
CELLS_FRACTION = 0.6
"""A query whose cells left after the pivot bounds hold more than this share of the vectors is
answered by a scan without checking their members one by one."""
_CELL_SPAN = 8192.0
"""Sort keys are ``fine cell * _CELL_SPAN + r``; ``r`` never exceeds sqrt(144 * 255^2) < 3060."""
_SCAN_CHUNK = 16_384
SCAN_MARGIN = 600
"""Float32 error bound of the scan's matrix product: 146 additions whose partial sums stay
below 2 * 2 * 9,363,600 < 2^26, where float32 values are 4 apart, so each rounds by at most 2:
under 300 in all, doubled for safety."""
_QUERY_BLOCK = 64
GIVE_UP_AFTER = 16
"""After this many queries in a row that pruning could not help, the rest of the call scans."""
PROJECTION_SCALE = 8.0
"""Projections onto the principal directions are stored as int16 in units of 1/8."""
PROJECTION_SLACK = 0.5
"""Bounds from stored projections are widened by this much: rounding each of 16 coordinates
to 1/8 moves a projection by at most sqrt(16) / 16 = 0.25, and float32 sums by far less."""
PRODUCT_SLACK = 256.0
"""Added to each cell's squared limit in the one float32 matrix product that compares a block
of queries with every pivot. It sums 18 terms (16 products of coordinates below 3,060 in
magnitude, the query's squared norm, the pivot's squared norm less its limit) whose partial
sums stay below 2^27, where float32 values are 8 apart: inputs (the pivots' projections are
stored as float32), products and additions round by under 110 in all, and the slack is more
than twice that."""
PIVOT_SLACK = 0.01
"""Added to the bounds on a query's distance to a pivot (units of distance). They are computed
in float64 from the pivots' projections and residual lengths stored as float32 (values below
3,060, so each is off by under 0.0002)."""


_BUILT_ARRAYS = (
    "mean",
    "directions",
    "order",
    "keys",
    "fine_offsets",
    "fine_min",
    "fine_max",
    "pivot_projections",
    "fine_reach",
    "pivot_residuals",
    "projected",
    "norms",
)


class PrunedL2Index:
    """Immutable; searched from several threads at once (numpy and FAISS release the GIL)."""

    def __init__(
        self,
        codes: Codes,
        *,
        cell_size: int = DEFAULT_CELL_SIZE,
        coarse_cells: int | None = None,
        seed: int = 1,
    ) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2:
            raise ValueError("codes must be a uint8[n, width] array")
        self._codes = codes
        self._pivot_sides: tuple[float, npt.NDArray[np.float32]] | None = None
        n, width = codes.shape
        self._width = width
        self._limit = width * 255 * 255
        if n == 0:
            raise ValueError("an index needs at least one vector")
        self._mean, self._directions = principal_directions(codes, seed)
        scaled = np.empty((n, self._directions.shape[1]), dtype=np.float32)
        for start in range(0, n, CHUNK):
            chunk = codes[start : start + CHUNK].astype(np.float64) - self._mean
            scaled[start : start + len(chunk)] = (chunk @ self._directions) * PROJECTION_SCALE
        fine, self._coarse_count = assign_cells(
            scaled, cell_size, coarse_cells or choose_coarse_cells(n), seed
        )
        fine_count = int(fine.max()) + 1
        sizes = np.bincount(fine, minlength=fine_count)
        pivots = cell_means(codes, fine, fine_count, sizes)
        radius = distances_to_pivots(codes, pivots, fine)
        order = np.lexsort((radius, fine))
        self._order = order.astype(np.uint32 if n < 2**32 else np.int64)
        sorted_radius = radius[order]
        self._keys = fine[order] * _CELL_SPAN + sorted_radius
        self._fine_offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
        self._fine_min = sorted_radius[self._fine_offsets[:-1]]
        self._fine_max = sorted_radius[self._fine_offsets[1:] - 1]
        # Pivots are kept as their projection and the length of what the projection leaves out:
        # enough to bound a query's distance to them (see _candidates) at a ninth of the cost.
        centred = pivots.astype(np.float64) - self._mean
        projected_pivots = centred @ self._directions
        self._pivot_projections = projected_pivots.astype(np.float32)
        self._fine_reach = projected_reach(
            scaled, order, fine, self._pivot_projections, self._fine_offsets, PROJECTION_SCALE
        )
        residual = np.einsum("ij,ij->i", centred, centred) - np.einsum(
            "ij,ij->i", projected_pivots, projected_pivots
        )
        self._pivot_residuals = np.sqrt(np.maximum(residual, 0.0)).astype(np.float32)
        # |y| <= |x - mean| < 3,060 for every coordinate y, so y * 8 fits an int16 with room to spare.
        self._projected = np.rint(scaled[order]).astype(np.int16)
        del scaled
        norms = np.empty(n, dtype=np.int32)
        for start in range(0, n, CHUNK):
            chunk = codes[start : start + CHUNK].astype(np.int32)
            norms[start : start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
        self._norms = norms

    def arrays(self) -> dict[str, npt.NDArray[np.generic]]:
        """Everything built over the codes, as named arrays (a segment file keeps them beside the codes)."""
        built = {name: getattr(self, f"_{name}") for name in _BUILT_ARRAYS}
        return {**built, "coarse_count": np.array([self._coarse_count], dtype=np.int64)}

    @classmethod
    def from_arrays(cls, codes: Codes, arrays: Mapping[str, npt.NDArray[np.generic]]) -> PrunedL2Index:
        """The index over ``codes`` whose :meth:`arrays` these are (mapped from a segment file)."""
        missing = [name for name in (*_BUILT_ARRAYS, "coarse_count") if name not in arrays]
        if missing or codes.ndim != 2 or len(codes) == 0:
            raise ValueError(f"not a PhotoDNA segment: missing {missing}" if missing else "no codes")
        index = cls.__new__(cls)
        index._codes = codes
        index._width = codes.shape[1]
        index._limit = index._width * 255 * 255
        for name in _BUILT_ARRAYS:
            setattr(index, f"_{name}", arrays[name])
        index._coarse_count = int(arrays["coarse_count"][0])
        index._pivot_sides = None
        if len(index._order) != len(codes) or len(index._norms) != len(codes):
            raise ValueError("the arrays were built over other codes")
        return index

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def cells(self) -> tuple[int, int]:
        """(coarse cells, fine cells)."""
        return self._coarse_count, len(self._pivot_projections)

    @property
    def nbytes(self) -> int:
        """Bytes held, the codes included (the segment shares them)."""
        return int(
            self._codes.nbytes
            + self._order.nbytes
            + self._keys.nbytes
            + self._norms.nbytes
            + self._pivot_projections.nbytes
            + self._fine_reach.nbytes
            + self._pivot_residuals.nbytes
            + self._fine_offsets.nbytes
            + self._fine_min.nbytes
            + self._fine_max.nbytes
            + self._projected.nbytes
        )

    def search(
        self,
        queries: Codes,
        max_distance: int,
        deleted: npt.NDArray[np.bool_] | None = None,
        *,
        budget: MatchBudget | None = None,
        method: str = "auto",
    ) -> list[Result]:
        """For each query, ``(rows, distances)`` of every vector within squared distance ``max_distance``.

        Sorted by distance, then row. ``deleted`` flags rows never to return;
        ``budget`` keeps the nearest it allows of each query. ``method``
        forces ``"prune"`` or ``"scan"`` (tests, benchmarks); both are exact.
        """
        if isinstance(max_distance, bool) or not isinstance(max_distance, int | np.integer):
            raise TypeError("max_distance must be an integer")
        if not 0 <= max_distance <= self._limit:
            raise ValueError(f"max_distance must be from 0 to {self._limit}")
        queries = np.ascontiguousarray(queries, dtype=np.uint8).reshape(-1, self._width)
        if len(queries) == 0:
            return []
        reach = math.sqrt(max_distance) + SLACK
        pivot_side = self._pivot_side(reach + PIVOT_SLACK)
        products = np.empty((min(len(queries), _QUERY_BLOCK), len(pivot_side)), dtype=np.float32)
        query_norms = np.einsum("ij,ij->i", queries.astype(np.int64), queries.astype(np.int64))
        found: list[Hits | None] = [None] * len(queries)
        scan: list[int] = []
        pruned_in_vain = 0  # queries in a row whose candidates were too many: stop trying
        for start in range(0, len(queries), _QUERY_BLOCK):
            if method == "auto" and pruned_in_vain >= GIVE_UP_AFTER:
                scan.extend(range(start, len(queries)))
                break
            block = queries[start : start + _QUERY_BLOCK]
            centred = block.astype(np.float64) - self._mean
            along = centred @ self._directions
            along_norms = np.einsum("ij,ij->i", along, along)
            residuals = np.sqrt(np.maximum(np.einsum("ij,ij->i", centred, centred) - along_norms, 0.0))
            query_side = np.empty((len(block), along.shape[1] + 2), dtype=np.float32)
            query_side[:, :-2] = along
            query_side[:, -2] = along_norms
            query_side[:, -1] = 1.0
            # |P(q) - p|^2 - limit(p) for every query of the block and every pivot, in one product
            # (into one buffer: a fresh one per block, 160 MB at 10M vectors, costs as much again
            # in page faults).
            excess = np.matmul(query_side, pivot_side.T, out=products[: len(block)])
            projected = (along * PROJECTION_SCALE).astype(np.float32)
            for offset in range(len(block)):
                position = start + offset
                rows = None
                hopeless = method == "auto" and pruned_in_vain >= GIVE_UP_AFTER
                if method != "scan" and not hopeless:
                    rows = self._candidates(
                        excess[offset],
                        along[offset],
                        float(residuals[offset]),
                        projected[offset],
                        reach,
                        method == "prune",
                    )
                if rows is None:
                    scan.append(position)
                    pruned_in_vain += 1
                else:
                    pruned_in_vain = 0
                    found[position] = self._verify(
                        queries[position], int(query_norms[position]), rows, max_distance
                    )
        if scan:
            for position, hits in zip(
                scan, self._scan(queries[scan], query_norms[scan], max_distance), strict=True
            ):
                found[position] = hits
        # The budget judges queries in order, so cuts wait until every query is answered.
        results: list[Result] = []
        for position, answer in enumerate(found):
            assert answer is not None
            results.append(_ordered(*answer, deleted, budget, position))
        return results

    def _pivot_side(self, wide: float) -> npt.NDArray[np.float32]:
        """Each pivot as ``[-2 p, 1, |p|^2 - limit]``, for one product with ``[q, |q|^2, 1]``.

        A cell can hold a hit only if its pivot's projection is within
        ``wide`` plus the cell's largest member radius in the projection
        (``fine_reach``) of the query's; the limit is that squared, plus
        :data:`PRODUCT_SLACK`. Kept for the last radius asked (lookups mostly
        use the hub's default): 4.5 MB per million vectors, rebuilt in
        milliseconds when another radius is asked.
        """
        cached = self._pivot_sides
        if cached is not None and cached[0] == wide:
            return cached[1]
        limits = (self._fine_reach + wide) ** 2 + PRODUCT_SLACK
        pivots = self._pivot_projections
        side = np.empty((len(pivots), pivots.shape[1] + 2), dtype=np.float32)
        side[:, :-2] = pivots
        side[:, :-2] *= -2.0
        side[:, -2] = 1.0
        side[:, -1] = np.einsum("ij,ij->i", pivots, pivots, dtype=np.float64) - limits
        self._pivot_sides = (wide, side)
        return side

    def _candidates(
        self,
        excess: npt.NDArray[np.float32],
        along: npt.NDArray[np.float64],
        residual: float,
        projected: npt.NDArray[np.float32],
        reach: float,
        forced: bool,
    ) -> npt.NDArray[np.int64] | None:
        """Rows no bound rules out, or None when a scan is cheaper.

        ``excess`` holds, for every pivot, the squared distance between its
        projection and the query's (``along``) less the largest at which its
        cell can hold a hit (see :meth:`_pivot_side`); ``residual`` is the
        length of what the query's projection leaves out. With ``a`` and
        ``b`` the parts of query and pivot the projection leaves out,
        ``|q - p|^2 = |P(q - p)|^2 + |a - b|^2`` and
        ``||a| - |b|| <= |a - b| <= |a| + |b|``: so ``|q - p|`` lies between
        ``low`` and ``high`` below, and a member ``x`` can be a hit only if
        ``|x - p|`` is within ``reach`` of that interval.
        """
        wide = reach + PIVOT_SLACK
        fine = np.flatnonzero(excess <= 0.0)
        if len(fine) == 0:
            return np.empty(0, dtype=np.int64)
        if not forced and len(fine) > CELLS_FRACTION * len(excess):
            return None  # cells hold about as many vectors each: a scan is cheaper, as below
        # The few pivots left are measured again, in float64, for the tighter bounds below.
        offsets = np.take(self._pivot_projections, fine, axis=0).astype(np.float64)
        offsets -= along
        squared = np.einsum("ij,ij->i", offsets, offsets)
        others = self._pivot_residuals[fine].astype(np.float64)
        low = np.sqrt(squared + (residual - others) ** 2)
        high = np.sqrt(squared + (residual + others) ** 2)
        alive = (low - wide <= self._fine_max[fine]) & (high + wide >= self._fine_min[fine])
        fine, low, high = fine[alive], low[alive], high[alive]
        if len(fine) == 0:
            return np.empty(0, dtype=np.int64)
        starts, stops = self._fine_offsets[fine], self._fine_offsets[fine + 1]
        sizes = stops - starts
        if not forced and int(sizes.sum()) > CELLS_FRACTION * len(self._codes):
            return None
        # Cells are small: checking every member's stored radius beats a binary search per cell.
        positions = _ranges(starts, stops)
        base = fine * _CELL_SPAN
        keys = np.take(self._keys, positions)
        positions = positions[
            (keys >= np.repeat(base + low - wide, sizes)) & (keys <= np.repeat(base + high + wide, sizes))
        ]
        if not forced and len(positions) > SCAN_FRACTION * len(self._codes):
            return None
        # An orthonormal projection never lengthens a difference: |P(x - q)| <= |x - q|.
        # The stored projections are rounded to 1/8, so each is within PROJECTION_SLACK of the truth.
        # np.take and an in-place subtraction: fancy indexing of rows and a fresh array cost 4x.
        difference = np.take(self._projected, positions, axis=0).astype(np.float32)
        difference -= projected
        close = (
            np.einsum("ij,ij->i", difference, difference)
            <= ((reach + PROJECTION_SLACK) * PROJECTION_SCALE) ** 2
        )
        rows: npt.NDArray[np.int64] = self._order[positions[close]].astype(np.int64)
        return rows

    def _verify(self, query: Codes, query_norm: int, rows: npt.NDArray[np.int64], max_distance: int) -> Hits:
        """The candidate rows truly within range, with their exact distances."""
        if len(rows) == 0:
            return rows, np.empty(0, np.int64)
        dots = self._codes[rows].astype(np.float32) @ query.astype(np.float32)
        distances = query_norm + self._norms[rows].astype(np.int64) - 2 * dots.astype(np.int64)
        keep = distances <= max_distance
        return rows[keep], distances[keep]

    def _scan(self, queries: Codes, query_norms: npt.NDArray[np.int64], max_distance: int) -> list[Hits]:
        """Every row within range of each query, by blocked brute force in float32, verified exactly.

        One matrix product per block gives ``|q|^2 + |x|^2 - 2 q.x`` directly
        (the queries carry a 1 and their norm, the block its norms and a 1).
        Its float32 sums are off by at most :data:`SCAN_MARGIN`; candidates
        are taken with that margin and their distances recomputed in integers.
        """
        width = self._width
        augmented = np.empty((len(queries), width + 2), dtype=np.float32)
        augmented[:, :width] = queries
        augmented[:, width] = 1.0
        augmented[:, width + 1] = query_norms
        limit = np.float32(max_distance + SCAN_MARGIN)
        block = np.empty((_SCAN_CHUNK, width + 2), dtype=np.float32)
        block[:, width + 1] = 1.0
        found_queries: list[npt.NDArray[np.int64]] = []
        found_rows: list[npt.NDArray[np.int64]] = []
        for start in range(0, len(self._codes), _SCAN_CHUNK):
            chunk = self._codes[start : start + _SCAN_CHUNK]
            rows = len(chunk)
            np.multiply(chunk, -2.0, out=block[:rows, :width], casting="unsafe")
            block[:rows, width] = self._norms[start : start + rows]
            hit_query, hit_row = np.nonzero(augmented @ block[:rows].T <= limit)
            if len(hit_query):
                found_queries.append(hit_query.astype(np.int64))
                found_rows.append(hit_row.astype(np.int64) + start)
        results = []
        if found_queries:
            all_queries, all_rows = np.concatenate(found_queries), np.concatenate(found_rows)
            order = np.argsort(all_queries, kind="stable")
            all_queries, all_rows = all_queries[order], all_rows[order]
            bounds = np.searchsorted(all_queries, np.arange(len(queries) + 1))
        for query in range(len(queries)):
            rows_of = all_rows[bounds[query] : bounds[query + 1]] if found_queries else np.empty(0, np.int64)
            results.append(self._verify(queries[query], int(query_norms[query]), rows_of, max_distance))
        return results


def _ranges(starts: npt.NDArray[np.int64], stops: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """The integers of every ``[start, stop)``, concatenated."""
    sizes = stops - starts
    total = int(sizes.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = np.repeat(starts - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
    out: npt.NDArray[np.int64] = shifts + np.arange(total, dtype=np.int64)
    return out


def _ordered(
    rows: npt.NDArray[np.int64],
    distances: npt.NDArray[np.int64],
    deleted: npt.NDArray[np.bool_] | None,
    budget: MatchBudget | None,
    position: int,
) -> Result:
    if deleted is not None and len(rows):
        live = ~deleted[rows]
        rows, distances = rows[live], distances[live]
    order = np.lexsort((rows, distances))
    if budget is not None:
        order = order[: budget.take(position, len(order))]
    return rows[order].astype(np.int64), distances[order].astype(np.int32)
