"""RFC 6962 Merkle tree math over stored subtree hashes (design §6).

Every complete, aligned subtree of the log is stored once, under the key
``(level, index)``: level 0 holds leaf hashes, and the node at ``(level, i)``
covers leaves ``[i·2^level, (i+1)·2^level)``. Appending a leaf adds at most
log2(n) such nodes, and any root or proof needs only O(log n) of them (each
ragged right edge is folded from the stored complete subtrees that tile it).

The functions here plan which stored hashes they need, ask a
:class:`HashReader` for all of them in one call, and combine the answer, so a
storage backend serves each operation with one batched read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Protocol

HashKey = tuple[int, int]
"""(level, index) of a stored complete subtree."""

EMPTY_ROOT = hashlib.sha256(b"").digest()


class HashReader(Protocol):
    def read_hashes(self, keys: Sequence[HashKey]) -> list[bytes]:
        """Return the stored hash of every key, in order."""
        ...


class ProofError(ValueError):
    """A proof that does not verify, or a request for one that cannot exist."""


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _largest_power_of_two_below(n: int) -> int:
    """The k of RFC 6962: the largest power of two strictly smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def subtree_keys(lo: int, hi: int) -> list[HashKey]:
    """Tile leaves [lo, hi) with maximal aligned complete subtrees, left to right.

    For the ranges RFC 6962 recursion produces (lo aligned to the largest
    power of two within the range), folding these right to left with
    :func:`node_hash` gives the range's Merkle tree hash.
    """
    keys: list[HashKey] = []
    while lo < hi:
        level = (hi - lo).bit_length() - 1
        while lo % (1 << level):
            level -= 1
        keys.append((level, lo >> level))
        lo += 1 << level
    return keys


def fold(hashes: Sequence[bytes]) -> bytes:
    """Combine the tiles of one range (see :func:`subtree_keys`) into its hash."""
    result = hashes[-1]
    for left in reversed(hashes[:-1]):
        result = node_hash(left, result)
    return result


def append_keys(index: int) -> list[HashKey]:
    """Stored hashes needed to add leaf ``index``: the left siblings it completes."""
    keys: list[HashKey] = []
    level, position = 0, index
    while position & 1:
        keys.append((level, position - 1))
        level, position = level + 1, position >> 1
    return keys


def hashes_to_store(index: int, leaf: bytes, siblings: Sequence[bytes]) -> list[tuple[HashKey, bytes]]:
    """New stored hashes once leaf ``index`` (hash ``leaf``) is appended.

    ``siblings`` are the hashes of :func:`append_keys` for the same index.
    """
    stored: list[tuple[HashKey, bytes]] = [((0, index), leaf)]
    current, position = leaf, index
    for level, sibling in enumerate(siblings):
        current = node_hash(sibling, current)
        position >>= 1
        stored.append(((level + 1, position), current))
    return stored


def _read_ranges(reader: HashReader, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """Hash of each leaf range, with one batched read for all of them."""
    plans = [subtree_keys(lo, hi) for lo, hi in ranges]
    flat = [key for plan in plans for key in plan]
    hashes = reader.read_hashes(flat) if flat else []
    result, offset = [], 0
    for plan in plans:
        result.append(fold(hashes[offset : offset + len(plan)]))
        offset += len(plan)
    return result


def root(reader: HashReader, size: int) -> bytes:
    if size == 0:
        return EMPTY_ROOT
    return _read_ranges(reader, [(0, size)])[0]


def _inclusion_ranges(index: int, lo: int, hi: int) -> list[tuple[int, int]]:
    """Ranges whose hashes form the RFC 6962 audit path of leaf ``index`` in [lo, hi)."""
    ranges: list[tuple[int, int]] = []
    while hi - lo > 1:
        k = _largest_power_of_two_below(hi - lo)
        if index < lo + k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo = lo + k
    ranges.reverse()
    return ranges


def inclusion_proof(reader: HashReader, index: int, size: int) -> list[bytes]:
    if not 0 <= index < size:
        raise ProofError(f"index {index} is not in a tree of size {size}")
    return _read_ranges(reader, _inclusion_ranges(index, 0, size))


def _consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """Ranges of the RFC 6962 SUBPROOF(old, D[0:new], true), in proof order."""
    ranges: list[tuple[int, int]] = []
    lo, hi, complete = 0, new, True
    while True:
        if old == hi:
            if not complete:
                ranges.append((lo, hi))
            break
        k = _largest_power_of_two_below(hi - lo)
        if old - lo <= k:
            ranges.append((lo + k, hi))
            hi = lo + k
        else:
            ranges.append((lo, lo + k))
            lo, complete = lo + k, False
    ranges.reverse()
    return ranges


def consistency_proof(reader: HashReader, old: int, new: int) -> list[bytes]:
    if not 0 <= old <= new:
        raise ProofError(f"no consistency proof from size {old} to size {new}")
    if old == 0 or old == new:
        return []
    return _read_ranges(reader, _consistency_ranges(old, new))


def verify_inclusion(leaf: bytes, index: int, size: int, proof: Sequence[bytes], root_hash: bytes) -> None:
    """Check an audit path (RFC 9162 §2.1.3.2); raise ProofError if it fails."""
    if not 0 <= index < size:
        raise ProofError(f"index {index} is not in a tree of size {size}")
    fn, sn, result = index, size - 1, leaf
    for sibling in proof:
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree allows")
        if fn & 1 or fn == sn:
            result = node_hash(sibling, result)
            if not fn & 1:
                while fn and not fn & 1:
                    fn, sn = fn >> 1, sn >> 1
        else:
            result = node_hash(result, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree requires")
    if result != root_hash:
        raise ProofError("inclusion proof does not lead to the root")


def verify_consistency(old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]) -> None:
    """Check a consistency proof (RFC 9162 §2.1.4.2); raise ProofError if it fails."""
    if not 0 <= old <= new:
        raise ProofError(f"size {new} cannot extend size {old}")
    if old == 0 and old_root != EMPTY_ROOT:
        raise ProofError("the root of the empty tree is SHA-256 of nothing; this old root is not")
    if old == new:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError("two different roots for the same tree size")
        return
    if old == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("consistency proof is empty")
    path = list(proof)
    if old & (old - 1) == 0:  # old is a power of two: its root starts the path
        path.insert(0, old_root)
    fr, sr = _consistency_roots(old, new, path)
    if fr != old_root:
        raise ProofError("consistency proof does not lead to the old root")
    if sr != new_root:
        raise ProofError("consistency proof does not lead to the new root")


def proven_prefix_root(old: int, new: int, new_root: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root of the size-``old`` prefix that a consistency proof shows ``new_root``'s tree to have.

    Every hash of a consistency proof feeds the new root, and some also the
    old one, so a proof that leads to the signed ``new_root`` commits that
    tree to the prefix root it implies: if that differs from a signed
    checkpoint of size ``old``, the two checkpoints cannot both be true, and
    this proof is self-contained evidence of it. Returns None when the proof
    proves nothing (it does not lead to ``new_root``, has the wrong shape, or
    ``old`` is a power of two, where the proof takes the old root as given).
    """
    if not 0 < old < new or old & (old - 1) == 0 or not proof:
        return None
    try:
        fr, sr = _consistency_roots(old, new, proof)
    except ProofError:
        return None
    return fr if sr == new_root else None


def _consistency_roots(old: int, new: int, path: Sequence[bytes]) -> tuple[bytes, bytes]:
    """The old and new roots a consistency proof path leads to (RFC 9162 §2.1.4.2, 0 < old < new).

    ``path`` is the proof with the old root in front when ``old`` is a power
    of two. Raises ProofError when the path's length does not fit the sizes.
    """
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for element in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the trees allow")
        if fn & 1 or fn == sn:
            fr = node_hash(element, fr)
            sr = node_hash(element, sr)
            while fn and not fn & 1:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, element)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the trees require")
    return fr, sr


class Frontier:
    """The root of a growing log from its leaves alone, in O(log n) memory.

    Holds the hashes of the maximal complete subtrees (the binary digits of
    the size); a replay or a mirror uses it to recompute a root without
    trusting stored interior hashes.
    """

    def __init__(self) -> None:
        self.size = 0
        self._stack: list[tuple[int, bytes]] = []

    def append(self, leaf: bytes) -> list[tuple[HashKey, bytes]]:
        """Add a leaf; return every complete subtree it completes, as stored hashes are keyed."""
        level, current, position = 0, leaf, self.size
        completed = [((0, position), leaf)]
        while self._stack and self._stack[-1][0] == level:
            current = node_hash(self._stack.pop()[1], current)
            level, position = level + 1, position >> 1
            completed.append(((level, position), current))
        self._stack.append((level, current))
        self.size += 1
        return completed

    def root(self) -> bytes:
        if not self._stack:
            return EMPTY_ROOT
        return fold([h for _, h in self._stack])
