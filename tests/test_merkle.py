"""RFC 6962 Merkle math (federation.merkle) against a naive reference implementation.

The reference below is RFC 6962 §2.1 transcribed: MTH, PATH, PROOF/SUBPROOF,
recursing on "the largest power of two smaller than n". It works on ranges of
one global list of leaves (``D[lo:hi]``) so that MTH can be memoised; that is
the only liberty taken. The code under test works from stored subtree hashes
(built here with ``append_keys``/``hashes_to_store``) and must agree byte for
byte, and its verifiers must accept exactly the right proofs.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation import merkle
from federation.merkle import ProofError

BIG = 100_000
LEAVES: list[bytes] = [b"" if i == 0 else b"leaf %d" % i for i in range(BIG)]


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def split(n: int) -> int:
    """RFC 6962: the largest power of two smaller than n (n > 1)."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


# ---- the naive reference: RFC 6962 §2.1 over D[lo:hi] of LEAVES ----------


@functools.cache
def mth(lo: int, hi: int) -> bytes:
    n = hi - lo
    if n == 0:
        return sha256(b"")
    if n == 1:
        return sha256(b"\x00" + LEAVES[lo])
    k = split(n)
    return sha256(b"\x01" + mth(lo, lo + k) + mth(lo + k, hi))


def path(m: int, lo: int, hi: int) -> list[bytes]:
    """PATH(m, D[lo:hi]), m relative to lo."""
    n = hi - lo
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*path(m, lo, lo + k), mth(lo + k, hi)]
    return [*path(m - k, lo + k, hi), mth(lo, lo + k)]


def subproof(m: int, lo: int, hi: int, b: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b)."""
    n = hi - lo
    if m == n:
        return [] if b else [mth(lo, hi)]
    k = split(n)
    if m <= k:
        return [*subproof(m, lo, lo + k, b), mth(lo + k, hi)]
    return [*subproof(m - k, lo + k, hi, False), mth(lo, lo + k)]


def proof(m: int, n: int) -> list[bytes]:
    """PROOF(m, D[0:n]); RFC 6962 defines it for 0 < m < n, and it is empty otherwise."""
    if m == 0 or m == n:
        return []
    return subproof(m, 0, n, True)


def directions(m: int, n: int) -> list[bool]:
    """For PATH(m, D[n]), bottom up: True when the proof element is the right sibling."""
    if n == 1:
        return []
    k = split(n)
    if m < k:
        return [*directions(m, k), True]
    return [*directions(m - k, n - k), False]


def iterative_root(leaves: Sequence[bytes]) -> bytes:
    """A second, independent root: hash level by level, promoting an odd last node."""
    if not leaves:
        return sha256(b"")
    level = [sha256(b"\x00" + leaf) for leaf in leaves]
    while len(level) > 1:
        nxt = [sha256(b"\x01" + level[i] + level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


# ---- stored hashes, as a store keeps them -----------------------------------


class MemoryTree:
    """Stored subtree hashes built only through merkle.append_keys / hashes_to_store."""

    def __init__(self) -> None:
        self.stored: dict[merkle.HashKey, bytes] = {}
        self.size = 0

    def append(self, data: bytes) -> None:
        siblings = [self.stored[key] for key in merkle.append_keys(self.size)]
        for key, value in merkle.hashes_to_store(self.size, merkle.leaf_hash(data), siblings):
            assert key not in self.stored, f"hash {key} stored twice"
            self.stored[key] = value
        self.size += 1


class View:
    """A HashReader onto a MemoryTree as it was at ``size`` leaves; records every read."""

    def __init__(self, tree: MemoryTree, size: int) -> None:
        assert size <= tree.size
        self.tree = tree
        self.size = size
        self.calls: list[list[merkle.HashKey]] = []

    def read_hashes(self, keys: Sequence[merkle.HashKey]) -> list[bytes]:
        self.calls.append(list(keys))
        for level, index in keys:
            assert (index + 1) << level <= self.size, f"key {(level, index)} is not in a tree of {self.size}"
        return [self.tree.stored[key] for key in keys]


@functools.cache
def tree_of(size: int) -> MemoryTree:
    tree = MemoryTree()
    for data in LEAVES[:size]:
        tree.append(data)
    return tree


def small() -> MemoryTree:
    return tree_of(300)


def big() -> MemoryTree:
    return tree_of(BIG)


def flip(value: bytes, bit: int) -> bytes:
    out = bytearray(value)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def leaf(index: int) -> bytes:
    return merkle.leaf_hash(LEAVES[index])


# ---- the reference itself: RFC 6962 test vectors (certificate-transparency) -----

VECTOR_LEAVES = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
VECTOR_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_rfc6962_vectors() -> None:
    tree = MemoryTree()
    h = bytes.fromhex
    for n, (data, expected) in enumerate(zip(VECTOR_LEAVES, VECTOR_ROOTS, strict=True), start=1):
        tree.append(h(data))
        assert merkle.root(View(tree, n), n).hex() == expected
        assert iterative_root([h(x) for x in VECTOR_LEAVES[:n]]).hex() == expected
    assert merkle.root(View(tree, 0), 0) == sha256(b"") == merkle.EMPTY_ROOT
    # Published audit path of leaf 5 in the 8-leaf tree, and consistency proofs.
    audit = ["bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
             "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
             "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]  # fmt: skip
    assert [x.hex() for x in merkle.inclusion_proof(View(tree, 8), 5, 8)] == audit
    merkle.verify_inclusion(
        merkle.leaf_hash(h(VECTOR_LEAVES[5])), 5, 8, [h(x) for x in audit], h(VECTOR_ROOTS[7])
    )
    six_eight = ["0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                 "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                 "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7"]  # fmt: skip
    assert [x.hex() for x in merkle.consistency_proof(View(tree, 8), 6, 8)] == six_eight
    two_five = ["5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b"]  # fmt: skip
    assert [x.hex() for x in merkle.consistency_proof(View(tree, 5), 2, 5)] == two_five


def test_leaf_and_node_hash_definitions() -> None:
    assert merkle.leaf_hash(b"abc") == sha256(b"\x00abc")
    assert merkle.node_hash(b"L" * 32, b"R" * 32) == sha256(b"\x01" + b"L" * 32 + b"R" * 32)


# ---- exhaustive small trees --------------------------------------------------


def test_stored_hashes_are_the_complete_subtrees() -> None:
    tree = small()
    expected = {
        (level, i): mth(i << level, (i + 1) << level) for level in range(9) for i in range(300 >> level)
    }
    assert tree.stored == expected


@pytest.mark.parametrize("size", range(301))
def test_root_every_size(size: int) -> None:
    view = View(small(), size)
    assert merkle.root(view, size) == mth(0, size)
    assert len(view.calls) == (1 if size else 0)
    if size:
        assert len(view.calls[0]) == size.bit_count()


def test_every_inclusion_proof_up_to_130() -> None:
    tree = small()
    for size in range(1, 131):
        root = mth(0, size)
        for index in range(size):
            view = View(tree, size)
            got = merkle.inclusion_proof(view, index, size)
            assert got == path(index, 0, size), (index, size)
            assert len(view.calls) <= 1
            merkle.verify_inclusion(leaf(index), index, size, got, root)


def test_every_consistency_proof_up_to_130() -> None:
    tree = small()
    for new in range(131):
        for old in range(new + 1):
            view = View(tree, new)
            got = merkle.consistency_proof(view, old, new)
            assert got == proof(old, new), (old, new)
            assert len(view.calls) <= 1
            merkle.verify_consistency(old, new, mth(0, old), mth(0, new), got)


def test_impossible_proof_requests() -> None:
    view = View(small(), 10)
    for index, size in [(10, 10), (11, 10), (-1, 10), (0, 0)]:
        with pytest.raises(ProofError):
            merkle.inclusion_proof(view, index, size)
        with pytest.raises(ProofError):
            merkle.verify_inclusion(leaf(0), index, size, [], mth(0, 1))
    for old, new in [(11, 10), (-1, 10), (1, 0)]:
        with pytest.raises(ProofError):
            merkle.consistency_proof(view, old, new)
        with pytest.raises(ProofError):
            merkle.verify_consistency(old, new, mth(0, 1), mth(0, 1), [])


# ---- large trees -------------------------------------------------------------


@pytest.mark.parametrize("size", [BIG, 65_536, 65_537, 99_999, 12_345])
def test_large_root_equals_iterative_computation(size: int) -> None:
    view = View(big(), size)
    expected = iterative_root(LEAVES[:size])
    assert expected == mth(0, size)
    assert merkle.root(view, size) == expected


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_large_random_trees(data: st.DataObject) -> None:
    tree = big()
    size = data.draw(st.integers(1, BIG), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    old = data.draw(st.integers(0, size), label="old")
    root = mth(0, size)
    assert merkle.root(View(tree, size), size) == root
    got = merkle.inclusion_proof(View(tree, size), index, size)
    assert got == path(index, 0, size)
    merkle.verify_inclusion(leaf(index), index, size, got, root)
    got = merkle.consistency_proof(View(tree, size), old, size)
    assert got == proof(old, size)
    merkle.verify_consistency(old, size, mth(0, old), root, got)


# ---- tampering ---------------------------------------------------------------


def inclusion_fails(leaf_hash: bytes, index: int, size: int, hashes: list[bytes], root: bytes) -> bool:
    try:
        merkle.verify_inclusion(leaf_hash, index, size, hashes, root)
    except ProofError:
        return True
    return False


def consistency_fails(old: int, new: int, old_root: bytes, new_root: bytes, hashes: list[bytes]) -> bool:
    try:
        merkle.verify_consistency(old, new, old_root, new_root, hashes)
    except ProofError:
        return True
    return False


def test_every_inclusion_element_flip_fails_up_to_64() -> None:
    for size in range(1, 65):
        root = mth(0, size)
        for index in range(size):
            good = path(index, 0, size)
            for position in range(len(good)):
                bit = (size * 31 + index * 7 + position) % 256
                bad = list(good)
                bad[position] = flip(bad[position], bit)
                assert inclusion_fails(leaf(index), index, size, bad, root), (size, index, position)
            assert inclusion_fails(flip(leaf(index), size % 256), index, size, good, root)
            assert inclusion_fails(leaf(index), index, size, good, flip(root, index % 256))


def test_every_consistency_element_flip_fails_up_to_64() -> None:
    for new in range(1, 65):
        for old in range(1, new + 1):
            good = proof(old, new)
            old_root, new_root = mth(0, old), mth(0, new)
            for position in range(len(good)):
                bad = list(good)
                bad[position] = flip(bad[position], (old * 13 + new + position) % 256)
                assert consistency_fails(old, new, old_root, new_root, bad), (old, new, position)
            assert consistency_fails(old, new, flip(old_root, new % 256), new_root, good), (old, new)
            assert consistency_fails(old, new, old_root, flip(new_root, old % 256), good), (old, new)


tamper_settings = settings(max_examples=150, deadline=None)


@tamper_settings
@given(st.data())
def test_inclusion_any_bit_flip_fails(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 300), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    good = merkle.inclusion_proof(View(small(), size), index, size)
    root, leaf_hash = mth(0, size), leaf(index)
    bit = data.draw(st.integers(0, 255), label="bit")
    target = data.draw(st.sampled_from(["leaf", "root", *range(len(good))]), label="target")
    if target == "leaf":
        leaf_hash = flip(leaf_hash, bit)
    elif target == "root":
        root = flip(root, bit)
    else:
        assert isinstance(target, int)
        good = list(good)
        good[target] = flip(good[target], bit)
    assert inclusion_fails(leaf_hash, index, size, good, root)


@tamper_settings
@given(st.data())
def test_consistency_any_bit_flip_fails(data: st.DataObject) -> None:
    new = data.draw(st.integers(1, 300), label="new")
    old = data.draw(st.integers(1, new), label="old")
    good = merkle.consistency_proof(View(small(), new), old, new)
    old_root, new_root = mth(0, old), mth(0, new)
    bit = data.draw(st.integers(0, 255), label="bit")
    target = data.draw(st.sampled_from(["old", "new", *range(len(good))]), label="target")
    if target == "old":
        old_root = flip(old_root, bit)
    elif target == "new":
        new_root = flip(new_root, bit)
    else:
        assert isinstance(target, int)
        good = list(good)
        good[target] = flip(good[target], bit)
    assert consistency_fails(old, new, old_root, new_root, good)


@tamper_settings
@given(st.data())
def test_inclusion_wrong_index_or_size(data: st.DataObject) -> None:
    """Sizes are bound only through the root: a claim passes exactly when it has the same path shape."""
    size = data.draw(st.integers(1, 300), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    good = path(index, 0, size)
    wrong_size = data.draw(st.integers(0, 302), label="wrong_size")
    wrong_index = data.draw(st.integers(0, 302), label="wrong_index")
    if (wrong_index, wrong_size) == (index, size):
        return
    fails = inclusion_fails(leaf(index), wrong_index, wrong_size, good, mth(0, size))
    same_shape = wrong_index < wrong_size and directions(wrong_index, wrong_size) == directions(index, size)
    assert fails != same_shape
    if wrong_size == size:  # another leaf position never verifies
        assert fails


def test_inclusion_wrong_index_always_fails_up_to_40() -> None:
    for size in range(1, 41):
        root = mth(0, size)
        for index in range(size):
            good = path(index, 0, size)
            for other in range(size + 1):
                if other != index:
                    assert inclusion_fails(leaf(index), other, size, good, root), (size, index, other)


@tamper_settings
@given(st.data())
def test_consistency_wrong_sizes(data: st.DataObject) -> None:
    new = data.draw(st.integers(2, 300), label="new")
    old = data.draw(st.integers(1, new - 1), label="old")
    good = proof(old, new)
    wrong_old = data.draw(st.integers(0, 302), label="wrong_old")
    wrong_new = data.draw(st.integers(0, 302), label="wrong_new")
    if (wrong_old, wrong_new) == (old, new):
        return
    valid = 0 <= wrong_old <= wrong_new
    if not valid or len(proof(wrong_old, wrong_new)) != len(good):
        assert consistency_fails(wrong_old, wrong_new, mth(0, old), mth(0, new), good)


@tamper_settings
@given(st.data())
def test_proofs_one_element_too_long_or_short(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 300), label="size")
    index = data.draw(st.integers(0, size - 1), label="index")
    old = data.draw(st.integers(1, size), label="old")
    extra = data.draw(st.binary(min_size=32, max_size=32), label="extra")
    incl = path(index, 0, size)
    cons = proof(old, size)
    root, old_root = mth(0, size), mth(0, old)
    assert inclusion_fails(leaf(index), index, size, [*incl, extra], root)
    assert inclusion_fails(leaf(index), index, size, [extra, *incl], root)
    assert consistency_fails(old, size, old_root, root, [*cons, extra])
    if incl:
        assert inclusion_fails(leaf(index), index, size, incl[:-1], root)
        assert inclusion_fails(leaf(index), index, size, incl[1:], root)
        assert inclusion_fails(leaf(index), index, size, [*incl, incl[-1]], root)
    if cons:
        assert consistency_fails(old, size, old_root, root, cons[:-1])
        assert consistency_fails(old, size, old_root, root, cons[1:])
        assert consistency_fails(old, size, old_root, root, [*cons, cons[-1]])


def test_equal_sizes_need_equal_roots_and_an_empty_proof() -> None:
    root = mth(0, 5)
    merkle.verify_consistency(5, 5, root, root, [])
    assert consistency_fails(5, 5, root, mth(0, 4), [])
    assert consistency_fails(5, 5, root, root, [root])


def test_consistency_from_the_empty_tree_checks_the_empty_root() -> None:
    """The empty tree has one root, SHA-256(""): a size-0 checkpoint with another root is bogus."""
    merkle.verify_consistency(0, 7, merkle.EMPTY_ROOT, mth(0, 7), [])
    assert consistency_fails(0, 7, flip(merkle.EMPTY_ROOT, 3), mth(0, 7), [])
    assert consistency_fails(0, 0, flip(merkle.EMPTY_ROOT, 3), flip(merkle.EMPTY_ROOT, 3), [])


# ---- O(log n): one batched read of few keys -----------------------------------


class CountingReader:
    """Answers any (valid) key with a dummy hash and records what was asked."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.calls: list[list[merkle.HashKey]] = []

    def read_hashes(self, keys: Sequence[merkle.HashKey]) -> list[bytes]:
        self.calls.append(list(keys))
        for level, index in keys:
            assert level >= 0 and index >= 0 and (index + 1) << level <= self.size
        return [sha256(b"%d/%d" % key) for key in keys]


def read_counts(size: int, operation: str, argument: int) -> int:
    reader = CountingReader(size)
    if operation == "root":
        merkle.root(reader, size)
    elif operation == "inclusion":
        merkle.inclusion_proof(reader, argument, size)
    else:
        merkle.consistency_proof(reader, argument, size)
    assert len(reader.calls) <= 1, f"{operation} read the store {len(reader.calls)} times"
    keys = reader.calls[0] if reader.calls else []
    assert len(set(keys)) == len(keys)
    return len(keys)


def bounds(size: int) -> dict[str, int]:
    """Keys needed, derived from the proof shapes (each bound is attained for some trees).

    A root tiles [0, n) with popcount(n) complete subtrees. An audit path has at
    most d = ceil(log2 n) elements, each a complete aligned subtree (one key)
    except at most one: the first right sibling taken while the range still
    ends at n, which covers [lo + k, n) with lo + k made of top bits of n, so
    it tiles into at most popcount(n) - 1 keys. A consistency proof has at most
    one element more, with the same single ragged element.
    """
    depth = math.ceil(math.log2(size)) if size > 1 else 0
    inclusion = max(depth - 1 + max(1, size.bit_count() - 1), 0)
    return {"root": size.bit_count(), "inclusion": inclusion, "consistency": inclusion + 1}


def test_key_bounds_hold_exhaustively_for_small_trees() -> None:
    attained = {"inclusion": 0, "consistency": 0}
    for size in range(1, 257):
        limit = bounds(size)
        assert read_counts(size, "root", 0) == limit["root"]
        worst = max(read_counts(size, "inclusion", index) for index in range(size))
        assert worst <= limit["inclusion"], size
        attained["inclusion"] += worst == limit["inclusion"]
        worst = max(read_counts(size, "consistency", old) for old in range(size + 1))
        assert worst <= limit["consistency"], size
        attained["consistency"] += worst == limit["consistency"]
    assert attained["inclusion"] > 100 and attained["consistency"] > 100  # the bounds are not loose


def test_ten_million_leaves_need_one_read_of_a_few_dozen_keys() -> None:
    size = 10_000_000
    limit = bounds(size)
    assert limit == {"root": 8, "inclusion": 30, "consistency": 31}  # 2·log2(n) + 2 would be 48
    assert read_counts(size, "root", 0) == 8
    rng = random.Random(6962)
    specials = [0, 1, size // 2, size - 2, size - 1, 2**23 - 1, 2**23, 2**23 + 1]
    worst = {"inclusion": 0, "consistency": 0}
    for argument in specials + [rng.randrange(size) for _ in range(300)]:
        worst["inclusion"] = max(worst["inclusion"], read_counts(size, "inclusion", argument))
        worst["consistency"] = max(worst["consistency"], read_counts(size, "consistency", argument + 1))
    assert 0 < worst["inclusion"] <= limit["inclusion"]
    assert 0 < worst["consistency"] <= limit["consistency"]
