"""Exact squared-Euclidean radius search over an immutable set of byte vectors (PhotoDNA).

``PrunedL2Index`` is the large segment's engine for PhotoDNA (144-byte
vectors, distance = the sum of squared byte differences). Every vector within
the asked radius is returned and none outside it: candidates are only ever
*pruned* by a proven lower bound, and every survivor is re-ranked exactly.

How it prunes (the triangle inequality around cell pivots):

* The vectors are grouped into cells. Cells come from k-means (in a
  16-dimension PCA projection past 50,000 vectors: cheap to train and to
  assign 10 million); each
  cell's pivot is then the mean of its members in the full space. Nothing
  below needs the assignment to be the nearest pivot, so an approximate
  assignment costs no exactness.
* For a vector ``x`` of cell ``c`` the index keeps ``r(x) = |x - c|``, and
  within each cell the rows are sorted by ``r``. For a query ``q`` at
  ``d = |q - c|``, ``|q - x| >= |d - r(x)|``, so only the rows with ``r`` in
  ``[d - sqrt(R), d + sqrt(R)]`` can be within squared distance ``R``: one
  binary search bounds each cell, and cells whose whole range of ``r`` lies
  outside are skipped outright.
* Survivors are re-ranked exactly: ``|q|^2 + |x|^2 - 2 q.x`` where the dot
  product is computed in float32 (exact: every partial sum is an integer
  below 2^24 for 144 bytes) and the sum in 64-bit integers.
* Bounds are widened by :data:`SLACK` so that float rounding of the pivot
  distances can only keep extra candidates, never drop a true hit.

Where pruning cannot work (vectors spread uniformly in 144 dimensions: every
vector sits at about the same distance from every pivot) the candidates
approach the whole set; past :data:`SCAN_FRACTION` of it the query is
answered by an exact blocked scan instead, which costs what a brute-force
search costs. docs/benchmarks.md measures both corpora.

Memory beyond the codes themselves (which the segment shares): 4 B per vector
for the row order, 8 B for the sort keys and 4 B for the squared norms.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import numpy.typing as npt

from .budget import MatchBudget

Codes = npt.NDArray[np.uint8]
Result = tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]

PCA_DIMENSIONS = 16
SLACK = 0.01
"""Added to every bound on ``|q - x|`` (units of distance, not squared): float64 pivot
distances are off by far less than this."""
SCAN_FRACTION = 0.25
"""A query whose candidates exceed this share of the vectors is answered by a scan."""
_CELL_SPAN = 8192.0
"""Sort keys are ``cell * _CELL_SPAN + r``; ``r`` never exceeds sqrt(144 * 255^2) < 3060."""
_ASSIGN_CHUNK = 262_144
_DIRECT_KMEANS = 50_000
"""Up to this many vectors, cells come from k-means in the full 144 dimensions."""
_SCAN_CHUNK = 65_536


def choose_cells(n: int) -> int:
    """About two square roots of the vector count: pruning gets finer, pivot distances cost more."""
    return max(1, min(16_384, int(2 * math.sqrt(n))))


class PrunedL2Index:
    """Immutable; searched from several threads at once (numpy and FAISS release the GIL)."""

    def __init__(self, codes: Codes, *, cells: int | None = None, seed: int = 1) -> None:
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.ndim != 2:
            raise ValueError("codes must be a uint8[n, width] array")
        self._codes = codes
        n, width = codes.shape
        self._width = width
        self._limit = width * 255 * 255
        cells = cells or choose_cells(n)
        cells = max(1, min(cells, n))
        assignment = self._assign(codes, cells, seed)
        counts = np.bincount(assignment, minlength=cells)
        pivots = np.zeros((cells, width), dtype=np.float64)
        radius = np.empty(n, dtype=np.float64)
        norms = np.empty(n, dtype=np.int32)
        for start in range(0, n, _ASSIGN_CHUNK):
            chunk = codes[start : start + _ASSIGN_CHUNK].astype(np.float64)
            np.add.at(pivots, assignment[start : start + _ASSIGN_CHUNK], chunk)
        pivots /= np.maximum(counts, 1)[:, None]
        for start in range(0, n, _ASSIGN_CHUNK):
            stop = min(n, start + _ASSIGN_CHUNK)
            chunk = codes[start:stop].astype(np.float64)
            difference = chunk - pivots[assignment[start:stop]]
            radius[start:stop] = np.sqrt(np.einsum("ij,ij->i", difference, difference))
            norms[start:stop] = np.einsum("ij,ij->i", chunk, chunk).astype(np.int32)
        order = np.lexsort((radius, assignment))
        self._order = order.astype(np.uint32 if n < 2**32 else np.int64)
        self._keys = assignment[order] * _CELL_SPAN + radius[order]
        self._offsets = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        sorted_radius = radius[order]
        nonempty = counts > 0
        self._cell_min = np.where(nonempty, sorted_radius[np.minimum(self._offsets[:-1], n - 1)], np.inf)
        self._cell_max = np.where(nonempty, sorted_radius[np.maximum(self._offsets[1:] - 1, 0)], -np.inf)
        self._pivots = pivots
        self._pivot_norms = np.einsum("ij,ij->i", pivots, pivots)
        self._norms = norms

    @staticmethod
    def _assign(codes: Codes, cells: int, seed: int) -> npt.NDArray[np.int64]:
        """A cell for each vector: k-means in a PCA projection, trained on a sample."""
        n, width = codes.shape
        if cells == 1:
            return np.zeros(n, dtype=np.int64)
        rng = np.random.default_rng(seed)
        sample_size = min(n, max(cells * 40, 10_000))
        sample = codes[np.sort(rng.choice(n, sample_size, replace=False))].astype(np.float32)
        if n <= _DIRECT_KMEANS:
            project = None  # few vectors: k-means in the full space is cheap enough
            dimensions = width
        else:
            dimensions = min(PCA_DIMENSIONS, width)
            project = faiss.PCAMatrix(width, dimensions)
            project.train(sample)
            sample = project.apply(sample)
        kmeans = faiss.Kmeans(
            dimensions, cells, niter=12, seed=seed, verbose=False, min_points_per_centroid=1
        )
        kmeans.train(sample)
        quantizer = faiss.IndexFlatL2(dimensions)
        quantizer.add(kmeans.centroids)
        assignment = np.empty(n, dtype=np.int64)
        for start in range(0, n, _ASSIGN_CHUNK):
            chunk = codes[start : start + _ASSIGN_CHUNK].astype(np.float32)
            _, nearest = quantizer.search(chunk if project is None else project.apply(chunk), 1)
            assignment[start : start + len(chunk)] = nearest[:, 0]
        return assignment

    def __len__(self) -> int:
        return len(self._codes)

    @property
    def nbytes(self) -> int:
        """Bytes held, the codes included (the segment shares them)."""
        return int(
            self._codes.nbytes
            + self._order.nbytes
            + self._keys.nbytes
            + self._norms.nbytes
            + self._pivots.nbytes
            + self._offsets.nbytes
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
        found: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]] | None] = [None] * len(queries)
        if len(self._codes) == 0 or len(queries) == 0:
            return [_empty() for _ in range(len(queries))]
        reach = math.sqrt(max_distance) + SLACK
        query_norms = np.einsum("ij,ij->i", queries.astype(np.int64), queries.astype(np.int64))
        scan: list[int] = []
        for start in range(0, len(queries), 256):
            block = queries[start : start + 256]
            squared = (
                query_norms[start : start + len(block), None].astype(np.float64)
                + self._pivot_norms[None, :]
                - 2.0 * (block.astype(np.float64) @ self._pivots.T)
            )
            pivot_distances = np.sqrt(np.maximum(squared, 0.0))
            for offset in range(len(block)):
                position = start + offset
                if method == "scan":
                    scan.append(position)
                    continue
                rows = self._candidates(pivot_distances[offset], reach, method == "prune")
                if rows is None:
                    scan.append(position)
                    continue
                found[position] = self._verify(
                    queries[position], int(query_norms[position]), rows, max_distance
                )
        if scan:
            scanned = self._scan(queries[scan], query_norms[scan], max_distance)
            for position, scanned_hits in zip(scan, scanned, strict=True):
                found[position] = scanned_hits
        # The budget judges queries in order, so cuts wait until every query is answered.
        results: list[Result] = []
        for position, hits in enumerate(found):
            assert hits is not None
            results.append(_ordered(*hits, deleted, budget, position))
        return results

    def _candidates(
        self, pivot_distances: npt.NDArray[np.float64], reach: float, forced: bool
    ) -> npt.NDArray[np.int64] | None:
        """Rows whose pivot bound does not rule them out, or None when a scan is cheaper."""
        lower, upper = pivot_distances - reach, pivot_distances + reach
        cells = np.flatnonzero((lower <= self._cell_max) & (upper >= self._cell_min))
        if len(cells) == 0:
            return np.empty(0, dtype=np.int64)
        base = cells * _CELL_SPAN
        lows = np.searchsorted(self._keys, base + np.maximum(lower[cells], 0.0), side="left")
        highs = np.searchsorted(self._keys, base + upper[cells], side="right")
        lows = np.maximum(lows, self._offsets[cells])
        highs = np.minimum(highs, self._offsets[cells + 1])
        sizes = np.maximum(highs - lows, 0)
        total = int(sizes.sum())
        if not forced and total > SCAN_FRACTION * len(self._codes):
            return None
        if total == 0:
            return np.empty(0, dtype=np.int64)
        starts = np.repeat(lows - np.concatenate(([0], np.cumsum(sizes)[:-1])), sizes)
        positions = starts + np.arange(total, dtype=np.int64)
        rows: npt.NDArray[np.int64] = self._order[positions].astype(np.int64)
        return rows

    def _verify(
        self, query: Codes, query_norm: int, rows: npt.NDArray[np.int64], max_distance: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The candidate rows truly within range, with their exact distances."""
        if len(rows) == 0:
            return rows, np.empty(0, np.int64)
        dots = self._codes[rows].astype(np.float32) @ query.astype(np.float32)
        distances = query_norm + self._norms[rows].astype(np.int64) - 2 * dots.astype(np.int64)
        keep = distances <= max_distance
        return rows[keep], distances[keep]

    def _scan(
        self, queries: Codes, query_norms: npt.NDArray[np.int64], max_distance: int
    ) -> list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]:
        """Every row within range of each query, by exact blocked brute force."""
        found_rows: list[list[npt.NDArray[np.int64]]] = [[] for _ in queries]
        found_distances: list[list[npt.NDArray[np.int64]]] = [[] for _ in queries]
        query_floats = queries.astype(np.float32)
        for start in range(0, len(self._codes), _SCAN_CHUNK):
            chunk = self._codes[start : start + _SCAN_CHUNK]
            dots = (query_floats @ chunk.astype(np.float32).T).astype(np.int64)
            distances = query_norms[:, None] + self._norms[start : start + len(chunk)][None, :] - 2 * dots
            hit_query, hit_row = np.nonzero(distances <= max_distance)
            for query in np.unique(hit_query):
                mine = hit_query == query
                found_rows[query].append(hit_row[mine] + start)
                found_distances[query].append(distances[query, hit_row[mine]])
        return [
            (
                np.concatenate(rows) if rows else np.empty(0, np.int64),
                np.concatenate(distances) if distances else np.empty(0, np.int64),
            )
            for rows, distances in zip(found_rows, found_distances, strict=True)
        ]


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


def _empty() -> Result:
    return np.empty(0, np.int64), np.empty(0, np.int32)
