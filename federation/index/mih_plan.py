"""Choosing a :class:`~federation.index.mih.MihIndex`'s table layout, and how each radius is searched.

Choosing the layout (``choose_widths``): for ``m`` tables of ``256/m`` bits
(rounded, widest first) the expected cost of one lookup at radius 31 (the PDQ
default) is ``sum_t keys_t * (PROBE_NS + CANDIDATE_NS * n / 2**b_t)`` where
``keys_t = sum_{k <= r_t} C(b_t, k)`` is the number of probed buckets and
``n / 2**b_t`` the expected bucket size for uniform codes. The ``m`` with the
least cost wins, among widths from 10 to 24 bits (24 bits caps an offsets
table at 64 MiB). That gives 11 tables of 23-24 bits at 10M, 13 of 19-20
bits at 1M, 16 of 16 bits at 100k. At 10M the model prefers 11 tables to 12
(measured 156 us against 218 us a lookup; 12 tables would save 280 MB) and
to 10 (26-bit tables: 2.7 GB). Real PDQ codes have biased bits and
clusters, so buckets are fuller than the uniform estimate; the benchmark
(docs/benchmarks.md) measures both.

Probe or scan: for a radius ``R`` the same model estimates the probing cost,
and a vectorised linear scan costs ``SCAN_NS * n``. The cheaper one runs; the
scan also runs when probing would enumerate more than ``MAX_PROBE_KEYS``
buckets per query. The constants were fitted to single lookups on the
development machine (AMD EPYC, 2 cores, AVX-512, numpy 2.4) at 10M codes
with 10-13 tables: a probed bucket costs about 25 ns, a candidate about
19 ns, a lookup 31 us of fixed numpy overhead, a scanned code about 7 ns.
With them the scan takes over from radius 75 at 10M codes, 69 at 1M, 64 at
100k and 43 at 10k, so every radius the API allows (0-63) probes from 100k
codes up. Measured crossovers agree (1M: probing 3.0 ms against scanning
6.5 ms at radius 63, 13 ms against 6.8 ms at 70; 10M: 18.6 ms against 68 ms
at 63, 95 ms against 75 ms at 75).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import numpy.typing as npt

from .mih_tables import CODE_BITS

PROBE_NS = 25.0
"""Measured cost of probing one bucket (key xor, offsets gather, range expansion)."""
CANDIDATE_NS = 19.0
"""Measured cost of one candidate (ids gather, code gather, xor, popcount, compare)."""
SCAN_NS = 7.0
"""Measured cost per code of the linear scan (xor, popcount, compare)."""
QUERY_NS = 31_000.0
"""Fixed numpy call overhead of one probed lookup; only matters for tiny indexes."""
MAX_PROBE_KEYS = 1 << 21
"""Above this many probed buckets per query the scan runs whatever the estimate says."""
MIN_WIDTH = 10
MAX_WIDTH = 24
LAYOUT_RADIUS = 31
"""The radius the layout is optimised for (PDQ's default match threshold)."""


def split_widths(tables: int) -> tuple[int, ...]:
    """Widths of ``tables`` disjoint substrings covering all 256 bits, widest first."""
    if not 1 <= tables <= CODE_BITS:
        raise ValueError("tables must be from 1 to 256")
    narrow, wide = divmod(CODE_BITS, tables)
    return (narrow + 1,) * wide + (narrow,) * (tables - wide)


def choose_radii(widths: tuple[int, ...], radius: int, bucket_load: tuple[float, ...]) -> tuple[int, ...]:
    """Per-table probe radii with ``sum(r_t + 1) > radius`` at the least estimated cost.

    ``-1`` means the table is not probed. ``bucket_load[t]`` is the expected
    number of codes per bucket of table ``t``.
    """
    if radius >= sum(width + 1 for width in widths):
        raise ValueError("radius too large for these widths")
    radii = [-1] * len(widths)
    for _ in range(radius + 1):
        best = -1
        best_cost = math.inf
        for table, width in enumerate(widths):
            if radii[table] >= width:
                continue
            ring = math.comb(width, radii[table] + 1)
            cost = ring * (PROBE_NS + CANDIDATE_NS * bucket_load[table])
            if cost < best_cost:
                best, best_cost = table, cost
        radii[best] += 1
    return tuple(radii)


def probe_cost_ns(widths: tuple[int, ...], radii: tuple[int, ...], n: int) -> tuple[float, int]:
    """Estimated nanoseconds and probed buckets of one lookup with these radii."""
    cost = QUERY_NS
    keys_total = 0
    for width, radius in zip(widths, radii, strict=True):
        keys = sum(math.comb(width, k) for k in range(radius + 1))
        keys_total += keys
        cost += keys * (PROBE_NS + CANDIDATE_NS * n / 2.0**width)
    return cost, keys_total


def choose_widths(n: int) -> tuple[int, ...]:
    """The table layout with the least estimated lookup cost at radius 31 for ``n`` codes."""
    best: tuple[int, ...] = split_widths(math.ceil(CODE_BITS / MAX_WIDTH))
    best_cost = math.inf
    for tables in range(math.ceil(CODE_BITS / MAX_WIDTH), CODE_BITS // MIN_WIDTH + 1):
        widths = split_widths(tables)
        load = tuple(n / 2.0**width for width in widths)
        radii = choose_radii(widths, LAYOUT_RADIUS, load)
        cost, _ = probe_cost_ns(widths, radii, n)
        if cost < best_cost:
            best, best_cost = widths, cost
    return best


def flip_masks(width: int, radius: int) -> npt.NDArray[np.int64]:
    """Every ``width``-bit mask with at most ``radius`` bits set, by popcount."""
    masks = [0]
    bits = [1 << position for position in range(width)]
    for count in range(1, radius + 1):
        masks.extend(sum(combo) for combo in itertools.combinations(bits, count))
    return np.array(masks, dtype=np.int64)
