"""Search indexes: FAISS binary results must equal brute-force Hamming search."""

from __future__ import annotations

import random
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.index import ExactIndex, FaissBinaryIndex, SearchIndex
from federation.index.budget import MatchBudget
from federation.index.segment_files import SegmentBuilder, SnapshotFiles, UnmappedRows
from federation.index.segmented import MihKind, SegmentedIndex, merge_sorted, sorted_unique, write_segment
from federation.index.videos import VideoIndex
from federation.signals import MD5, PDQ, PHOTODNA, SHA1, SHA256, VPDQ, SignalError

# PDQ hashes of the bridge test image and its seven dihedral variants, as published
# with the PDQ reference implementation.
BRIDGE_HASHES = {
    "bridge-1-original": "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22",
    "bridge-2-rotate-90": "b0a10efd71cc3f429413d48d0ffffe12e34e0e17ada952a9d29684210aa9e5af",
    "bridge-3-rotate-180": "adad5a64b5a142e55362a09057dacd5ae63b847fc23794b766b319361fc93188",
    "bridge-4-rotate-270": "a5f4a457a48995e8c9065c275aaa5498b61ba4bdf8fcf80387c32f8b0bfc4f05",
    "bridge-5-flipx": "f8f80f31e0f417b00e37f5cd028f980fb36ed02a9662c1e233e6cc634e9c64dd",
    "bridge-6-flipy": "8dad2599b1a1bd1853625f6553da32a1e63b7280c2374b4866b366c91bc9ce77",
    "bridge-7-flip-plus-1": "f0a1f102f1dcc0bd9c5309720fff018de34ef1e8ada9a956d2967ade0ea91a50",
    "bridge-8-flip-minus-1": "a5f05ba8a4896a17c106a3da5aaaab07b61b5b42f8fc07fc83c3d0740bfcb0fa",
}


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def flip(hash_hex: str, positions: list[int] | set[int]) -> str:
    value = int(hash_hex, 16)
    for bit in positions:
        value ^= 1 << bit
    return f"{value:064x}"


def brute_force(present: set[str], queries: list[str], max_distance: int) -> list[list[tuple[str, int]]]:
    results = []
    for query in queries:
        matches = [(h, hamming(query, h)) for h in present]
        results.append(sorted(((h, d) for h, d in matches if d <= max_distance), key=by_distance))
    return results


def by_distance(match: tuple[str, int]) -> tuple[int, str]:
    return match[1], match[0]


# --- property: FAISS equals brute force -------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    centers: list[str]
    pool: list[str]
    ops: list[tuple[str, list[int]]]
    distances: list[int]
    compact_min: int


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    code = st.integers(0, 2**256 - 1).map(lambda v: f"{v:064x}")
    centers = draw(st.lists(code, min_size=1, max_size=3))
    planted = st.tuples(st.sampled_from(centers), st.sets(st.integers(0, 255), max_size=64)).map(
        lambda pair: flip(pair[0], pair[1])
    )
    # Planted neighbours sit at every distance 0..64 from a query; random codes are
    # ~128 bits away from everything.
    pool = draw(st.lists(st.one_of(planted, planted, code), min_size=1, max_size=30))
    index_into_pool = st.integers(0, len(pool) - 1)
    op = st.tuples(st.sampled_from(["add", "add", "remove"]), st.lists(index_into_pool, max_size=10))
    ops = draw(st.lists(op, min_size=1, max_size=12))
    distances = draw(st.lists(st.integers(0, 63), min_size=1, max_size=4))
    compact_min = draw(st.sampled_from([0, 1, 3, 1024]))
    return Scenario(centers, pool, ops, distances, compact_min)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_faiss_search_equals_brute_force(scenario: Scenario) -> None:
    index = FaissBinaryIndex(PDQ, compact_min=scenario.compact_min)
    present: set[str] = set()
    removed: set[str] = set()
    queries = scenario.centers + scenario.pool
    for kind, picks in scenario.ops:
        batch = [scenario.pool[i] for i in picks]
        if kind == "add":
            index.add(batch)
            present.update(batch)
            removed.difference_update(batch)
        else:
            index.remove(batch)
            removed.update(h for h in batch if h in present)
            present.difference_update(batch)
        assert len(index) == len(present)
        for max_distance in scenario.distances:
            got = index.search(queries, max_distance)
            assert got == brute_force(present, queries, max_distance)
            returned = {h for matches in got for h, _ in matches}
            assert not returned & removed
    for h in scenario.pool:
        assert (h in index) == (h in present)
    # Whatever was removed comes back once added again.
    again = sorted(removed)
    index.add(again)
    assert index.search(again, 0) == [[(h, 0)] for h in again]


def test_radius_is_inclusive_at_every_distance() -> None:
    """A neighbour at exactly d is found at max_distance d and not at d - 1."""
    rng = random.Random(7)
    base = f"{rng.getrandbits(256):064x}"
    positions = rng.sample(range(256), 256)
    neighbours = {d: flip(base, positions[:d]) for d in range(257)}
    index = FaissBinaryIndex(PDQ)
    index.add(list(neighbours.values()))
    for max_distance in range(257):
        (matches,) = index.search([base], max_distance)
        assert [d for _, d in matches] == list(range(max_distance + 1))
        assert [h for h, _ in matches] == [neighbours[d] for d in range(max_distance + 1)]


def test_large_batch_equals_numpy_brute_force() -> None:
    """Thousands of codes and hundreds of queries: FAISS splits this work across threads."""
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 256, (4000, 32), dtype=np.uint8)
    queries = codes[rng.choice(4000, 300)].copy()
    bits = np.unpackbits(queries, axis=1)
    for row in range(len(queries)):  # move each query 0..70 bits away from its source
        bits[row, rng.choice(256, int(rng.integers(0, 71)), replace=False)] ^= 1
    queries = np.packbits(bits, axis=1)
    hashes = [c.tobytes().hex() for c in codes]
    query_hex = [q.tobytes().hex() for q in queries]
    index = FaissBinaryIndex(PDQ, compact_min=100)
    index.add(hashes)
    index.remove(hashes[::3])
    live = np.ones(len(codes), dtype=bool)
    live[::3] = False
    distance = np.unpackbits(queries[:, None, :] ^ codes[None, :, :], axis=2).sum(axis=2)
    for max_distance in (0, 31, 63):
        got = index.search(query_hex, max_distance)
        for row, matches in enumerate(got):
            hit = np.flatnonzero(live & (distance[row] <= max_distance))
            expected = sorted(((hashes[i], int(distance[row, i])) for i in hit), key=by_distance)
            assert matches == expected


def test_ties_sorted_by_hash() -> None:
    base = "00" * 32
    same_distance = [flip(base, {bit}) for bit in (3, 200, 17, 90)]
    index = FaissBinaryIndex(PDQ)
    index.add([*same_distance, base])
    (matches,) = index.search([base], 1)
    assert matches == [(base, 0), *sorted((h, 1) for h in same_distance)]


def test_remove_readd_and_compaction() -> None:
    rng = random.Random(3)
    hashes = [f"{rng.getrandbits(256):064x}" for _ in range(40)]
    index = FaissBinaryIndex(PDQ, compact_min=10)
    index.add(hashes)
    index.add(hashes[:5])  # already present: ignored
    assert len(index) == 40
    assert index.stored == 40

    index.remove(hashes[:15])  # 15 deleted of 40 stored: not yet half
    assert index.stored == 40
    assert index.search(hashes[:15], 0) == [[] for _ in range(15)]
    index.remove([*hashes[15:25], "ab" * 32])  # 25 of 40, and one never present
    assert index.stored == 15  # compacted down to the live codes
    assert len(index) == 15
    assert index.search(hashes, 0) == [[] if i < 25 else [(h, 0)] for i, h in enumerate(hashes)]

    index.add(hashes[:3])
    assert len(index) == 18
    assert index.search(hashes[:3], 0) == [[(h, 0)] for h in hashes[:3]]
    assert all(h in index for h in hashes[:3])
    assert hashes[3] not in index


def test_empty_index_and_empty_queries() -> None:
    for index in (PDQ.new_index(), SHA256.new_index(), MD5.new_index()):
        assert len(index) == 0
        assert index.search([], 31) == []
    pdq = PDQ.new_index()
    assert pdq.search(["00" * 32, "ff" * 32], 63) == [[], []]
    pdq.add([])
    pdq.remove([])
    pdq.remove(["00" * 32])
    assert len(pdq) == 0
    pdq.add(["00" * 32])
    pdq.remove(["00" * 32])
    assert pdq.search(["00" * 32], 63) == [[]]


@pytest.mark.parametrize("bad", [-1, 257, True, 3.0, "31"])
def test_max_distance_validated(bad: object) -> None:
    index = FaissBinaryIndex(PDQ)
    index.add(["00" * 32])
    with pytest.raises(ValueError):
        index.search(["00" * 32], bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["00" * 31, "00" * 33, "zz" * 32, "  " + "00" * 31])
def test_malformed_hashes_refused(bad: str) -> None:
    index = FaissBinaryIndex(PDQ)
    with pytest.raises(SignalError):
        index.add(["11" * 32, bad])
    assert len(index) == 0
    assert bad not in index


def test_each_signal_type_picks_its_engine() -> None:
    assert isinstance(PDQ.new_index(), SegmentedIndex)
    assert isinstance(PHOTODNA.new_index(), SegmentedIndex)
    assert isinstance(VPDQ.new_index(), VideoIndex)
    for exact in (MD5, SHA1, SHA256):
        assert isinstance(exact.new_index(), ExactIndex)
        assert exact.new_index().signal is exact


# --- PDQ reference hashes ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BRIDGE_HASHES))
def test_reference_hash_bit_flips(name: str) -> None:
    original = BRIDGE_HASHES[name]
    index = FaissBinaryIndex(PDQ)
    index.add([original])
    assert index.search([original], 0) == [[(original, 0)]]
    rng = random.Random(name)
    for k in range(33):
        query = flip(original, set(rng.sample(range(256), k)))
        assert hamming(query, original) == k
        expected = [[(original, k)]] if k <= 31 else [[]]
        assert index.search([query], 31) == expected


@pytest.mark.parametrize("max_distance", [0, 31, 63, 101, 102, 105, 118, 124, 127, 128, 256])
def test_reference_variants_pairwise(max_distance: int) -> None:
    variants = list(BRIDGE_HASHES.values())
    index = FaissBinaryIndex(PDQ)
    index.add(variants)
    got = index.search(variants, max_distance)
    for query, matches in zip(variants, got, strict=True):
        expected = sorted(
            ((h, PDQ.distance(query, h)) for h in variants if PDQ.distance(query, h) <= max_distance),
            key=by_distance,
        )
        assert matches == expected
        assert matches[0] == (query, 0)
    # The dihedral variants are 102-128 bits apart: none within the lookup limit of 63.
    if max_distance <= 63:
        assert all(len(m) == 1 for m in got)
    if max_distance >= 128:
        assert all(len(m) == len(variants) for m in got)


# --- exact index ------------------------------------------------------------------------


def test_exact_index_hits_misses_remove() -> None:
    index = SHA256.new_index()
    a, b, c = "aa" * 32, "bb" * 32, "cc" * 32
    index.add([a, b, a])
    assert len(index) == 2
    assert index.search([a, c, b], 63) == [[(a, 0)], [], [(b, 0)]]
    # A near-miss never matches an exact type, whatever the distance asked for.
    assert index.search([flip(a, {0})], 256) == [[]]
    assert a.upper() in index
    assert c not in index
    assert 42 not in index
    index.remove([a, c])
    assert len(index) == 1
    assert index.search([a, b], 0) == [[], [(b, 0)]]

    md5 = MD5.new_index()
    md5.add(["d41d8cd98f00b204e9800998ecf8427e"])
    assert md5.search(["d41d8cd98f00b204e9800998ecf8427e"], 0) == [[("d41d8cd98f00b204e9800998ecf8427e", 0)]]
    with pytest.raises(SignalError):
        md5.add(["aa" * 32])


# --- threads ----------------------------------------------------------------------------


def test_concurrent_add_remove_search_never_sees_half_a_batch() -> None:
    """Each batch is a cluster of 8 codes around one center, far from other clusters.

    A search for the center must see the whole cluster or none of it.
    """
    rng = random.Random(11)
    cluster_size = 8
    centers = [f"{rng.getrandbits(256):064x}" for _ in range(60)]
    clusters = {
        center: [center] + [flip(center, set(rng.sample(range(256), 5))) for _ in range(7)]
        for center in centers
    }
    index: SearchIndex = PDQ.new_index()
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer(mine: list[str]) -> None:
        try:
            for center in mine:
                index.add(clusters[center])
            for center in mine[::2]:
                index.remove(clusters[center])
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    def reader() -> None:
        try:
            while not stop.is_set():
                for matches in index.search(centers, 31):
                    assert len(matches) in (0, cluster_size)
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(centers[i::3],)) for i in range(3)]
    readers = [threading.Thread(target=reader) for _ in range(2)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()

    assert errors == []
    kept = {c for i in range(3) for c in centers[i::3][1::2]}
    assert len(index) == len(kept) * cluster_size
    final = index.search(centers, 31)
    for center, matches in zip(centers, final, strict=True):
        expected = brute_force(set(clusters[center]) if center in kept else set(), [center], 31)
        assert matches == expected[0]


# --- the segmented index: large MIH segment + fresh FAISS segment + deletions ------------


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 8))
def test_segmented_search_equals_brute_force_across_merges(scenario: Scenario, fresh_limit: int) -> None:
    index = SegmentedIndex.binary(PDQ, fresh_limit=fresh_limit, background_merge=False)
    present: set[str] = set()
    queries = scenario.centers + scenario.pool
    for kind, picks in scenario.ops:
        batch = [scenario.pool[i] for i in picks]
        if kind == "add":
            index.add(batch)
            present.update(batch)
        else:
            index.remove(batch)
            present.difference_update(batch)
        assert len(index) == len(present)
        for max_distance in scenario.distances:
            assert index.search(queries, max_distance) == brute_force(present, queries, max_distance)
    for h in scenario.pool:
        assert (h in index) == (h in present)
    index.merge()
    assert sorted(c.tobytes().hex() for c in index.live_codes()) == sorted(present)
    assert index.search(queries, 40) == brute_force(present, queries, 40)


def bounded_brute_force(
    exact: list[list[tuple[str, int]]], per_query: int, per_answer: int, answers: list[int]
) -> tuple[list[list[tuple[str, int]]], set[int]]:
    """Design §7's bounds applied to complete answers: nearest first, answers spent in query order."""
    spent: dict[int, int] = {}
    cut, truncated = [], set()
    for position, matches in enumerate(exact):
        room = min(per_query, per_answer - spent.get(answers[position], 0))
        cut.append(matches[:room])
        spent[answers[position]] = spent.get(answers[position], 0) + len(cut[-1])
        if len(matches) > room:
            truncated.add(position)
    return cut, truncated


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 8), st.integers(0, 6), st.integers(0, 12), st.integers(1, 3))
def test_bounded_search_equals_brute_force_cut_to_the_bounds(
    scenario: Scenario, fresh_limit: int, per_query: int, per_answer: int, requests: int
) -> None:
    """Match bounds cut inside each segment give exactly the complete answer, cut afterwards."""
    index = SegmentedIndex.binary(PDQ, fresh_limit=fresh_limit, background_merge=False)
    present: set[str] = set()
    queries = (scenario.centers + scenario.pool) * 2  # repeated queries spend the budget twice
    answers = [position * requests // len(queries) for position in range(len(queries))]
    for kind, picks in scenario.ops:
        batch = [scenario.pool[i] for i in picks]
        (index.add if kind == "add" else index.remove)(batch)
        (present.update if kind == "add" else present.difference_update)(batch)
        for max_distance in scenario.distances:
            budget = MatchBudget(per_query, per_answer, answers)
            got = index.search(queries, max_distance, budget)
            exact = brute_force(present, queries, max_distance)
            assert (got, budget.truncated) == bounded_brute_force(exact, per_query, per_answer, answers)


def test_segmented_updates_during_a_background_merge_are_kept() -> None:
    rng = random.Random(5)
    first = [f"{rng.getrandbits(256):064x}" for _ in range(3000)]
    later = [f"{rng.getrandbits(256):064x}" for _ in range(500)]
    index = SegmentedIndex.binary(PDQ, fresh_limit=10**9)
    index.add(first)
    index.merge(wait=False)  # builds in the background while we keep changing things
    index.add(later)
    index.remove(first[:100] + later[:50])
    index.add(first[:10])
    index.merge()  # waits for the merge under way
    index.merge()  # folds what arrived meanwhile
    expected = (set(first) - set(first[10:100])) | (set(later) - set(later[:50]))
    assert len(index) == len(expected)
    assert index.merges == 2
    probe = first[:120] + later[:60]
    assert index.search(probe, 0) == brute_force(expected, probe, 0)


def test_segmented_index_starts_from_codes_and_removes_from_the_large_segment() -> None:
    rng = random.Random(8)
    hashes = sorted({f"{rng.getrandbits(256):064x}" for _ in range(2000)})
    codes = np.frombuffer(bytes.fromhex("".join(hashes)), dtype=np.uint8).reshape(-1, 32)
    index = SegmentedIndex.binary(PDQ, codes)
    assert len(index) == 2000
    index.remove(hashes[:5])
    assert all(h not in index for h in hashes[:5])
    assert index.search(hashes[:6], 0) == [[], [], [], [], [], [(hashes[5], 0)]]
    index.add(hashes[:1])
    assert index.search(hashes[:1], 0) == [[(hashes[0], 0)]]
    assert len(index) == 1996


def resident_kib(path: Path) -> int:
    """This process's resident pages of its mappings of ``path``, in KiB (from /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if len(head) >= 5 and "-" in head[0] and ":" in head[3]:
            inside = len(head) == 6 and head[5].removesuffix(" (deleted)") == str(path)
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_a_merge_into_files_replays_updates_without_mapping_the_new_codes(tmp_path: Path) -> None:
    """While the old segment is still mapped, the new one stays unmapped until lookups read it."""
    rng = random.Random(9)
    first = [f"{rng.getrandbits(256):064x}" for _ in range(20_000)]
    later = [f"{rng.getrandbits(256):064x}" for _ in range(300)]
    files = SnapshotFiles(tmp_path)
    index = SegmentedIndex.binary(PDQ, fresh_limit=10**9, spill=lambda: files.builder("c", "pdq"))
    index.add(first)
    index.merge()
    index.merge(wait=False)
    index.add(later)  # recorded, then replayed onto the new segment when it is swapped in
    index.remove(first[:200] + later[:20])
    index.merge()
    segment = index.segment
    assert segment is not None
    assert resident_kib(segment.path / "codes.npy") == 0
    expected = (set(first) - set(first[:200])) | (set(later) - set(later[:20]))
    assert len(index) == len(expected)
    probe = first[:300] + later
    assert index.search(probe, 0) == brute_force(expected, probe, 0)
    assert resident_kib(segment.path / "codes.npy") > 0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), min_size=1, max_size=1200, unique=True),
    st.lists(st.binary(min_size=32, max_size=32), max_size=60),
    st.integers(0, 60),
    st.sampled_from([2048, 0]),
)
def test_unmapped_rows_find_what_a_binary_search_of_the_mapping_finds(
    listed: list[bytes], others: list[bytes], known: int, few_blocks: int
) -> None:
    def codes(rows: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32)

    wanted = codes(others + listed[:known])
    with tempfile.TemporaryDirectory() as scratch:
        builder = SegmentBuilder(Path(scratch), "c.pdq")
        segment = write_segment(builder, MihKind(), [(sorted_unique(codes(listed)), None)], codes([]))
        finder = UnmappedRows(segment)
        finder.FENCE_ROWS = 7  # many blocks even in a small segment
        finder.FEW_BLOCKS = few_blocks  # 0: always read spans of blocks
        finder.SPAN_BLOCKS = 3
        rows, present = finder.rows(wanted)
        keys = [bytes(row) for row in segment.codes]
    for code, row, found in zip(wanted, rows.tolist(), present.tolist(), strict=True):
        assert found == (bytes(code) in keys)
        if found:
            assert keys[row] == bytes(code)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.binary(min_size=32, max_size=32), max_size=40),
    st.lists(st.binary(min_size=32, max_size=32), max_size=40),
)
def test_merge_sorted_equals_sorting_everything(first: list[bytes], second: list[bytes]) -> None:
    def codes(rows: list[bytes]) -> np.ndarray:
        return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(-1, 32)

    ordered = sorted_unique(codes(first))
    merged = merge_sorted(ordered, codes(second + first[:3]))
    assert merged.tobytes() == sorted_unique(codes(first + second)).tobytes()
