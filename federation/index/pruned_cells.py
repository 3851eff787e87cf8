"""How the pruned L2 engine's cells are built (see :mod:`federation.index.pruned` for why).

A principal-component projection of a sample, k-means cells within coarser
k-means cells in that projection, each cell's pivot (its members' mean) and
each member's distance to it. None of this needs to be optimal for the
search to be exact: the search only uses bounds that hold for any grouping.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import numpy.typing as npt

Codes = npt.NDArray[np.uint8]

PCA_DIMENSIONS = 16
CHUNK = 262_144
"""Vectors handled at once, to bound the build's temporaries."""


def choose_coarse_cells(n: int) -> int:
    """About the square root of the vector count, at most 4,096."""
    return max(1, min(4096, int(math.sqrt(n))))


def kmeans_assign(
    points: npt.NDArray[np.float32], cells: int, seed: int, sample: int
) -> npt.NDArray[np.int64]:
    """Each point's cell from k-means trained on a sample (all points when few)."""
    n, dimensions = points.shape
    cells = max(1, min(cells, n))
    if cells == 1:
        return np.zeros(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    training = points if n <= sample else points[np.sort(rng.choice(n, sample, replace=False))]
    kmeans = faiss.Kmeans(dimensions, cells, niter=10, seed=seed, verbose=False, min_points_per_centroid=1)
    kmeans.train(np.ascontiguousarray(training))
    quantizer = faiss.IndexFlatL2(dimensions)
    quantizer.add(kmeans.centroids)
    assignment = np.empty(n, dtype=np.int64)
    for start in range(0, n, CHUNK):
        _, nearest = quantizer.search(np.ascontiguousarray(points[start : start + CHUNK]), 1)
        assignment[start : start + CHUNK] = nearest[:, 0]
    return assignment


def principal_directions(codes: Codes, seed: int) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The mean and the top principal directions (orthonormal columns) of a sample of the vectors."""
    n, width = codes.shape
    rng = np.random.default_rng(seed)
    sample = codes[np.sort(rng.choice(n, min(n, 100_000), replace=False))].astype(np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    _, vectors = np.linalg.eigh(centred.T @ centred)
    directions = vectors[:, ::-1][:, : min(PCA_DIMENSIONS, width)]
    return mean, np.ascontiguousarray(directions)


def assign_cells(
    reduced: npt.NDArray[np.float32], cell_size: int, coarse_cells: int, seed: int
) -> tuple[npt.NDArray[np.int64], int]:
    """Each vector's fine cell (numbered densely, coarse cell by coarse cell) and how many coarse cells hold vectors."""
    n = len(reduced)
    coarse = kmeans_assign(reduced, coarse_cells, seed, sample=coarse_cells * 64)
    by_coarse = np.argsort(coarse, kind="stable")
    bounds = np.concatenate(([0], np.cumsum(np.bincount(coarse, minlength=int(coarse.max()) + 1))))
    fine = np.empty(n, dtype=np.int64)
    next_fine = used = 0
    for cell in range(len(bounds) - 1):
        members = by_coarse[bounds[cell] : bounds[cell + 1]]
        if len(members) == 0:
            continue
        used += 1
        wanted = max(1, round(len(members) / cell_size))
        local = kmeans_assign(reduced[members], wanted, seed + cell, sample=wanted * 64)
        _, local = np.unique(local, return_inverse=True)  # number the cells used, densely
        fine[members] = next_fine + local
        next_fine += int(local.max()) + 1
    return fine, used


def cell_means(
    codes: Codes, cells: npt.NDArray[np.int64], count: int, sizes: npt.NDArray[np.int64]
) -> npt.NDArray[np.float32]:
    """Each cell's pivot: the mean of its members, in float32."""
    sums = np.zeros((count, codes.shape[1]), dtype=np.float64)
    for start in range(0, len(codes), CHUNK):
        np.add.at(sums, cells[start : start + CHUNK], codes[start : start + CHUNK].astype(np.float64))
    means: npt.NDArray[np.float32] = (sums / np.maximum(sizes, 1)[:, None]).astype(np.float32)
    return means


def projected_reach(
    scaled: npt.NDArray[np.float32],
    order: npt.NDArray[np.int64],
    fine: npt.NDArray[np.int64],
    pivot_projections: npt.NDArray[np.float32],
    offsets: npt.NDArray[np.int64],
    scale: float,
) -> npt.NDArray[np.float64]:
    """Per cell, the largest ``|P(x) - P(p)|`` of a member ``x`` (``scaled`` holds ``P(x) * scale``; ``P(p)`` as stored).

    A tighter radius than the full-space one (a projection never lengthens
    a difference), and the one the first, all-pivot bound needs: that
    bound only ever sees the projections.
    """
    radius = np.empty(len(scaled), dtype=np.float64)
    for start in range(0, len(scaled), CHUNK):
        stop = start + len(scaled[start : start + CHUNK])
        difference = scaled[start:stop].astype(np.float64) / scale
        difference -= pivot_projections[fine[start:stop]]
        radius[start:stop] = np.sqrt(np.einsum("ij,ij->i", difference, difference))
    reach: npt.NDArray[np.float64] = np.maximum.reduceat(radius[order], offsets[:-1])
    return reach


def distances_to_pivots(
    codes: Codes, pivots: npt.NDArray[np.float32], cells: npt.NDArray[np.int64]
) -> npt.NDArray[np.float64]:
    """``|x - pivot of x's cell|`` for every vector, in float64."""
    out = np.empty(len(codes), dtype=np.float64)
    for start in range(0, len(codes), CHUNK):
        stop = start + len(codes[start : start + CHUNK])
        difference = codes[start:stop].astype(np.float64) - pivots[cells[start:stop]].astype(np.float64)
        out[start:stop] = np.sqrt(np.einsum("ij,ij->i", difference, difference))
    return out
