"""Synthetic PDQ corpora and query sets for the index benchmarks.

Two kinds of corpus, both ``uint64[n, 4]`` (the 32 PDQ bytes, viewed as words):

* ``uniform``: every bit independent and fair. The easy case for multi-index
  hashing: buckets hold ``n / 2**b`` codes on average.
* ``realistic``: what a hash-sharing hub actually holds.

  - Per-bit biases: bit ``j`` is set with probability ``p_j``, the ``p_j``
    spread evenly over 0.39-0.62 (the range measured on real PDQ hashes) and
    shuffled over the 256 positions; quantised to 1/256 (see
    :func:`biased_codes`).
  - Near-duplicate clusters: 60% of the rows are distinct "images"; the other
    40% are variants of one of them (re-encodes, crops, watermarks submitted
    by other members). The source image of a variant is picked with a heavy
    tail (``index = floor(images * u**2)``, ``u`` uniform), so a few images
    have thousands of variants (at 10M: the most popular ~1,600) while most
    have none.
  - A variant differs from its source image in exactly ``d`` bits: ``d = 0``
    (an exact duplicate, the same hash submitted by another member) for 15%
    of variants, otherwise ``d = ceil(40 * u**1.5)``, 1-40, skewed towards
    small distances.
  - Rows are shuffled, so clusters are not contiguous.

Queries (:func:`make_queries`): half are planted near neighbours (a random
corpus row with exactly ``d`` bits flipped, ``d`` uniform in 0-32), half are
random misses drawn like the corpus's distinct images. Their order is
shuffled.

Everything is seeded and vectorised; rows are generated in chunks so 10M codes
take a few seconds and little more memory than the result (320 MB).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

Codes = npt.NDArray[np.uint64]
CorpusKind = Literal["uniform", "realistic"]

CODE_BITS = 256
WORDS = 4
CHUNK = 1 << 18
BIAS_LOW = 0.39
BIAS_HIGH = 0.62
VARIANT_SHARE = 0.40
EXACT_DUPLICATE_SHARE = 0.15
MAX_VARIANT_DISTANCE = 40
MAX_PLANTED_DISTANCE = 32


def bit_thresholds(seed: int) -> npt.NDArray[np.int64]:
    """Per-bit thresholds ``t_j`` (bit ``j`` is set with probability ``t_j / 256``)."""
    rng = np.random.default_rng([seed, 1])
    spread = np.linspace(BIAS_LOW, BIAS_HIGH, CODE_BITS)
    return np.asarray(np.round(rng.permutation(spread) * 256), dtype=np.int64)


def uniform_codes(rng: np.random.Generator, count: int) -> Codes:
    """``count`` codes with independent fair bits."""
    return rng.bit_generator.random_raw((count, WORDS)).astype(np.uint64, copy=False)


def biased_codes(rng: np.random.Generator, count: int, thresholds: npt.NDArray[np.int64]) -> Codes:
    """``count`` codes whose bit ``j`` is set with probability ``thresholds[j] / 256``.

    Each bit lane compares an 8-bit random number (one bit from each of eight
    random words) with its threshold, most significant bit first, entirely in
    bitwise operations on whole words: 64 lanes per operation.
    """
    out = np.empty((count, WORDS), dtype=np.uint64)
    lanes = thresholds.reshape(WORDS, 64)
    weights = np.uint64(1) << np.arange(64, dtype=np.uint64)
    for begin in range(0, count, CHUNK):
        rows = min(CHUNK, count - begin)
        for word in range(WORDS):
            less = np.zeros(rows, dtype=np.uint64)
            equal = np.full(rows, np.uint64(~np.uint64(0)))
            for bit in range(7, -1, -1):
                threshold = np.uint64(int(np.sum(weights[((lanes[word] >> bit) & 1) == 1])))
                random = rng.bit_generator.random_raw(rows).astype(np.uint64, copy=False)
                less |= equal & ~random & threshold
                equal &= ~(random ^ threshold)
            out[begin : begin + rows, word] = less
    return out


def flip_masks(rng: np.random.Generator, distances: npt.NDArray[np.int64]) -> Codes:
    """One mask per entry of ``distances`` with exactly that many random bits set."""
    count = len(distances)
    masks = np.empty((count, WORDS), dtype=np.uint64)
    for begin in range(0, count, CHUNK):
        wanted = distances[begin : begin + CHUNK]
        bits = np.zeros((len(wanted), CODE_BITS), dtype=np.bool_)
        missing = wanted.copy()
        # Draw with replacement, then top up the rows where draws collided.
        while True:
            short = np.flatnonzero(missing > 0)
            if len(short) == 0:
                break
            rows = np.repeat(short, missing[short])
            bits[rows, rng.integers(0, CODE_BITS, len(rows))] = True
            missing[short] = wanted[short] - bits[short].sum(axis=1)
        packed = np.packbits(bits, axis=1, bitorder="little")
        masks[begin : begin + len(wanted)] = packed.view(np.uint64)
    return masks


def realistic_codes(rng: np.random.Generator, count: int, thresholds: npt.NDArray[np.int64]) -> Codes:
    """``count`` codes with biased bits, near-duplicate clusters and exact duplicates."""
    variants = int(count * VARIANT_SHARE)
    images = count - variants
    if images == 0:
        return biased_codes(rng, count, thresholds)
    codes = np.empty((count, WORDS), dtype=np.uint64)
    codes[:images] = biased_codes(rng, images, thresholds)
    for begin in range(images, count, CHUNK):
        rows = min(CHUNK, count - begin)
        sources = np.minimum((images * rng.random(rows) ** 2).astype(np.int64), images - 1)
        distances = np.ceil(MAX_VARIANT_DISTANCE * rng.random(rows) ** 1.5).astype(np.int64)
        distances[rng.random(rows) < EXACT_DUPLICATE_SHARE] = 0
        codes[begin : begin + rows] = np.take(codes, sources, axis=0) ^ flip_masks(rng, distances)
    return np.take(codes, rng.permutation(count), axis=0)


def make_corpus(kind: CorpusKind, count: int, seed: int = 0) -> Codes:
    rng = np.random.default_rng([seed, count, 2])
    if kind == "uniform":
        return uniform_codes(rng, count)
    if kind == "realistic":
        return realistic_codes(rng, count, bit_thresholds(seed))
    raise ValueError(f"unknown corpus kind {kind!r}")


@dataclass(frozen=True)
class Queries:
    codes: Codes
    planted_rows: npt.NDArray[np.int64]
    """The corpus row each query was planted near, or -1 for a random miss."""
    planted_distances: npt.NDArray[np.int64]
    """Bits flipped from the planted row (-1 for a random miss)."""


def make_queries(kind: CorpusKind, corpus: Codes, count: int, seed: int = 0) -> Queries:
    """Half planted near neighbours at distance 0-32, half random misses, shuffled."""
    rng = np.random.default_rng([seed, len(corpus), count, 3])
    planted = math.ceil(count / 2) if len(corpus) else 0
    rows = rng.integers(0, max(len(corpus), 1), planted)
    distances = rng.integers(0, MAX_PLANTED_DISTANCE + 1, planted)
    near = np.take(corpus, rows, axis=0) ^ flip_masks(rng, distances)
    misses = count - planted
    far = uniform_codes(rng, misses) if kind == "uniform" else biased_codes(rng, misses, bit_thresholds(seed))
    order = rng.permutation(count)
    codes = np.concatenate((near, far))[order]
    planted_rows = np.concatenate((rows, np.full(misses, -1)))[order]
    planted_distances = np.concatenate((distances, np.full(misses, -1)))[order]
    return Queries(codes, planted_rows.astype(np.int64), planted_distances.astype(np.int64))
