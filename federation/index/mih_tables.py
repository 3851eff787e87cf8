"""Building the tables of a :class:`~federation.index.mih.MihIndex`, in memory or into files.

The tables are the rows of the codes sorted by each substring key, all
tables concatenated, and a direct offsets table per table (see the layout in
:mod:`federation.index.mih`). :func:`write_tables` builds them one table at
a time and hands them out front to back, so the same code fills arrays in
memory (:class:`TableFiller`) or streams a large segment into its files
while the old one still serves (:mod:`federation.index.segment_files`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

CODE_BITS = 256
CODE_WORDS = CODE_BITS // 64
Codes64 = npt.NDArray[np.uint64]


def as_codes(codes: npt.ArrayLike) -> Codes64:
    """256-bit codes as a C-contiguous ``uint64[n, 4]`` array (a view when possible).

    Accepts ``uint8[n, 32]`` (the raw PDQ bytes) or ``uint64[n, 4]``; a single
    code (``uint8[32]`` or ``uint64[4]``) becomes one row. Distances do not
    depend on how bytes are grouped into words, and queries go through the same
    conversion as the indexed codes, so the host's byte order does not matter.
    """
    array = np.asarray(codes)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    if array.ndim != 2:
        raise ValueError(f"codes must be a 2-d array, got shape {array.shape}")
    if array.dtype == np.uint8 and array.shape[1] == CODE_BITS // 8:
        return np.ascontiguousarray(array).view(np.uint64)
    if array.dtype == np.uint64 and array.shape[1] == CODE_WORDS:
        return np.ascontiguousarray(array)
    raise ValueError(f"codes must be uint8[n, 32] or uint64[n, 4], got {array.dtype}{list(array.shape)}")


def _substring_keys(codes: Codes64, start: int, width: int) -> npt.NDArray[np.uint64]:
    """Bits ``[start, start + width)`` of each code (bit ``p`` is bit ``p % 64`` of word ``p // 64``)."""
    word, shift = divmod(start, 64)
    low = codes[:, word] >> np.uint64(shift)
    spill = shift + width - 64
    if spill > 0:
        high = codes[:, word + 1] & np.uint64((1 << spill) - 1)
        low = low | (high << np.uint64(64 - shift))
    keys: npt.NDArray[np.uint64] = low & np.uint64((1 << width) - 1)
    return keys


def table_buckets(widths: tuple[int, ...]) -> int:
    """Entries of the concatenated offsets table, less the final one."""
    return sum(1 << width for width in widths)


def offsets_dtype(widths: tuple[int, ...], n: int) -> type[np.unsignedinteger] | type[np.signedinteger]:
    return np.uint32 if len(widths) * n < 1 << 32 else np.int64


class TableFiller:
    """An array filled front to back by successive writes (the in-memory sink of :func:`write_tables`)."""

    def __init__(self, size: int, dtype: npt.DTypeLike) -> None:
        self.array = np.empty(size, dtype=dtype)
        self._at = 0

    def write(self, chunk: npt.NDArray[np.generic]) -> None:
        self.array[self._at : self._at + len(chunk)] = chunk
        self._at += len(chunk)


_BUILD_ROWS = 1 << 18
"""Codes read, and sorted rows written, per step of a table build (bounds its temporaries)."""
_BUILD_BUCKETS = 1 << 18
"""Buckets counted per step of a table build."""


def write_tables(
    read: Callable[[int, int], npt.NDArray[np.generic]],
    n: int,
    widths: tuple[int, ...],
    write_rows: Callable[[npt.NDArray[np.generic]], None],
    write_offsets: Callable[[npt.NDArray[np.generic]], None],
) -> None:
    """Build the tables of an index over ``n`` codes and write them out front to back.

    ``read(start, stop)`` gives codes ``[start, stop)`` (``uint8[k, 32]`` or
    ``uint64[k, 4]``); the sorted rows of every table, then the offsets of
    every table, are passed to the writers in order. The working memory is
    one ``uint64`` per code (the table being sorted) plus chunks of
    ``_BUILD_ROWS`` entries, so a merge can write a new segment into files while the
    old one still serves, without holding a second one in memory.
    """
    widths = tuple(sorted(widths, reverse=True))
    starts = np.cumsum((0, *widths[:-1])).tolist()
    dtype = offsets_dtype(widths, n)
    low_half = 0 if sys.byteorder == "little" else 1
    packed = np.empty(n, dtype=np.uint64)
    for table, (start, width) in enumerate(zip(starts, widths, strict=True)):
        for begin in range(0, n, _BUILD_ROWS):
            chunk = as_codes(read(begin, begin + _BUILD_ROWS))
            keys = _substring_keys(chunk, int(start), width)
            keys <<= np.uint64(32)
            keys |= np.arange(begin, begin + len(chunk), dtype=np.uint64)
            packed[begin : begin + len(chunk)] = keys
        # Sort (key, row) pairs packed in one uint64: numpy's SIMD sort is
        # ~10x faster than an argsort, and ties stay in row order.
        packed.sort()
        halves = packed.view(np.uint32).reshape(-1, 2)
        for begin in range(0, n, _BUILD_ROWS):
            write_rows(np.ascontiguousarray(halves[begin : begin + _BUILD_ROWS, low_half]))
        del halves
        packed >>= np.uint64(32)  # now the sorted keys
        # Bucket k of table t: offsets[base_t + k] is t * n plus the codes with a smaller key.
        if table == 0:
            write_offsets(np.zeros(1, dtype=dtype))
        for low in range(0, 1 << width, _BUILD_BUCKETS):
            high = min(low + _BUILD_BUCKETS, 1 << width)
            edges = np.searchsorted(packed, np.array([low, high], dtype=np.uint64))
            counts = np.bincount(
                (packed[edges[0] : edges[1]] - np.uint64(low)).astype(np.intp), minlength=high - low
            )
            ends = np.cumsum(counts) + (table * n + int(edges[0]))
            write_offsets(ends.astype(dtype))
