"""MihIndex must return exactly what a numpy brute force returns, at every radius."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.index import mih
from federation.index.mih import Method, MihIndex, popcount_distances
from federation.index.mih_plan import choose_radii, choose_widths, split_widths
from federation.index.mih_tables import as_codes

Codes = npt.NDArray[np.uint64]
CORPUS_SIZE = 20_000
QUERIES = 48
RADII = range(64)
METHODS: tuple[Method, ...] = ("probe", "auto")
ALL_METHODS: tuple[Method, ...] = ("probe", "scan", "auto")


def flips(rng: np.random.Generator, distances: npt.NDArray[np.int64]) -> Codes:
    """One mask per distance with exactly that many distinct bits set."""
    bits = np.zeros((len(distances), 256), dtype=np.bool_)
    for row, distance in enumerate(distances.tolist()):
        bits[row, rng.choice(256, size=distance, replace=False)] = True
    return np.packbits(bits, axis=1, bitorder="little").view(np.uint64)


def uniform_corpus(rng: np.random.Generator, size: int) -> Codes:
    return rng.integers(0, 2**64, size=(size, 4), dtype=np.uint64)


def realistic_corpus(rng: np.random.Generator, size: int) -> Codes:
    """Biased bits (0.39-0.62), heavy near-duplicate clusters and exact duplicates."""
    bias = rng.permutation(np.linspace(0.39, 0.62, 256))
    images = size // 2
    base = np.packbits(rng.random((images, 256)) < bias, axis=1, bitorder="little").view(np.uint64)
    sources = (images * rng.random(size - images) ** 3).astype(np.int64)  # a few huge clusters
    distances = rng.integers(0, 41, size - images)
    distances[rng.random(size - images) < 0.2] = 0  # exact duplicates
    variants = base[sources] ^ flips(rng, distances)
    return np.concatenate((base, variants))[rng.permutation(size)]


def planted_queries(rng: np.random.Generator, corpus: Codes, count: int) -> Codes:
    """Corpus rows moved 0-64 bits away, plus a few random codes and a complement."""
    near = count - 4
    rows = rng.integers(0, len(corpus), near)
    queries = corpus[rows] ^ flips(rng, rng.integers(0, 65, near))
    return np.concatenate((queries, uniform_corpus(rng, 3), ~corpus[:1]))


def brute_force(corpus: Codes, query: Codes) -> npt.NDArray[np.uint32]:
    if len(corpus) == 0:
        return np.empty(0, np.uint32)
    return popcount_distances(corpus ^ query)


def assert_exact(
    results: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int32]]],
    distances: npt.NDArray[np.uint32],
    radius: int,
    deleted: npt.NDArray[np.bool_] | None = None,
) -> None:
    """``distances[q, row]`` is the brute-force distance matrix of the queries."""
    assert len(results) == len(distances)
    for query, (ids, found) in enumerate(results):
        within = distances[query] <= radius
        if deleted is not None:
            within &= ~deleted
        expected = np.flatnonzero(within)
        # Sorted by (distance, row), no row twice, distances right.
        order = np.lexsort((expected, distances[query][expected]))
        assert ids.tolist() == expected[order].tolist(), f"query {query} radius {radius}"
        assert found.tolist() == distances[query][expected[order]].tolist()


@pytest.fixture(scope="module", params=["uniform", "realistic"])
def corpus_case(request: pytest.FixtureRequest) -> tuple[Codes, Codes, npt.NDArray[np.uint32]]:
    rng = np.random.default_rng(1234)
    make = uniform_corpus if request.param == "uniform" else realistic_corpus
    corpus = make(rng, CORPUS_SIZE)
    queries = planted_queries(rng, corpus, QUERIES)
    matrix = np.stack([brute_force(corpus, query) for query in queries])
    return corpus, queries, matrix


@pytest.mark.parametrize("tables", [None, 13, 20])
def test_every_radius_matches_brute_force(
    corpus_case: tuple[Codes, Codes, npt.NDArray[np.uint32]], tables: int | None
) -> None:
    corpus, queries, matrix = corpus_case
    index = MihIndex(corpus, widths=None if tables is None else split_widths(tables))
    for radius in RADII:
        for method in METHODS:
            assert_exact(index.search(queries, radius, method=method), matrix, radius)
    # Singles take their own code path.
    for radius in (0, 1, 17, 31, 32, 47, 63):
        for query in range(0, QUERIES, 7):
            assert_exact(index.search(queries[query], radius), matrix[query : query + 1], radius)


def test_scan_matches_brute_force(corpus_case: tuple[Codes, Codes, npt.NDArray[np.uint32]]) -> None:
    corpus, queries, matrix = corpus_case
    index = MihIndex(corpus)
    for radius in (*range(0, 64, 3), 63, 128, 255, 256):
        assert_exact(index.search(queries[:12], radius, method="scan"), matrix[:12], radius)


def test_deleted_rows_are_filtered(corpus_case: tuple[Codes, Codes, npt.NDArray[np.uint32]]) -> None:
    corpus, queries, matrix = corpus_case
    deleted = np.random.default_rng(7).random(len(corpus)) < 0.3
    index = MihIndex(corpus)
    for radius in (0, 12, 31, 63):
        for method in ALL_METHODS:
            assert_exact(index.search(queries, radius, deleted, method=method), matrix, radius, deleted)
        assert_exact(index.search(queries[0], radius, deleted), matrix[:1], radius, deleted)
    everything = np.ones(len(corpus), dtype=np.bool_)
    assert all(len(ids) == 0 for ids, _ in index.search(queries, 63, everything))


def test_small_chunks_and_sub_batches(
    corpus_case: tuple[Codes, Codes, npt.NDArray[np.uint32]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queries split into one-query sub-batches and probes into many chunks give the same answers."""
    corpus, queries, matrix = corpus_case
    index = MihIndex(corpus)
    monkeypatch.setattr(mih, "_PROBE_CHUNK", 97)
    monkeypatch.setattr(mih, "_CANDIDATE_BUDGET", 1)
    for radius in (0, 31, 63):
        assert_exact(index.search(queries, radius, method="probe"), matrix, radius)
    monkeypatch.setattr(mih, "_CANDIDATE_BUDGET", 5_000)
    assert_exact(index.search(queries, 40, method="probe"), matrix, 40)


def test_duplicates_are_all_returned() -> None:
    rng = np.random.default_rng(3)
    code = uniform_corpus(rng, 1)
    corpus = np.concatenate(
        (np.repeat(code, 50, axis=0), uniform_corpus(rng, 500), np.repeat(code, 5, axis=0))
    )
    index = MihIndex(corpus, widths=split_widths(16))
    for method in ALL_METHODS[:2]:
        ((ids, distances),) = index.search(code, 0, method=method)
        assert ids.tolist() == [*range(50), *range(550, 555)]
        assert distances.tolist() == [0] * 55


def test_empty_index_and_empty_queries() -> None:
    empty = MihIndex(np.empty((0, 32), dtype=np.uint8))
    assert len(empty) == 0
    queries = uniform_corpus(np.random.default_rng(4), 3)
    for radius in (0, 31, 256):
        results = empty.search(queries, radius)
        assert [(ids.tolist(), d.tolist()) for ids, d in results] == [([], [])] * 3
    index = MihIndex(uniform_corpus(np.random.default_rng(5), 100))
    assert index.search(np.empty((0, 4), dtype=np.uint64), 31) == []


def test_external_ids_and_byte_input() -> None:
    rng = np.random.default_rng(6)
    corpus = uniform_corpus(rng, 2_000)
    ids = rng.permutation(10_000)[:2_000].astype(np.int64) + 10**12
    by_words = MihIndex(corpus, ids)
    by_bytes = MihIndex(corpus.view(np.uint8))
    queries = corpus[:20] ^ flips(rng, rng.integers(0, 32, 20))
    for (got_ids, got_d), (rows, d) in zip(
        by_words.search(queries, 31), by_bytes.search(queries.view(np.uint8), 31), strict=True
    ):
        assert got_ids.tolist() == ids[rows].tolist()
        assert got_d.tolist() == d.tolist()
        assert len(rows) >= 1


@given(
    data=st.data(),
    size=st.integers(min_value=0, max_value=300),
    duplicates=st.integers(min_value=0, max_value=20),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_hypothesis_random_layouts(data: st.DataObject, size: int, duplicates: int, seed: int) -> None:
    """Random corpora, random table layouts (1-16 bits each), random radii 0-256."""
    rng = np.random.default_rng(seed)
    corpus = uniform_corpus(rng, size)
    if size:
        corpus = np.concatenate((corpus, corpus[rng.integers(0, size, duplicates)]))
    widths: list[int] = []
    while sum(widths) < 256:
        widths.append(min(data.draw(st.integers(min_value=1, max_value=16)), 256 - sum(widths)))
    index = MihIndex(corpus, widths=tuple(widths))
    radius = data.draw(st.one_of(st.integers(0, 63), st.integers(0, 256)))
    if len(corpus):
        queries = corpus[rng.integers(0, len(corpus), 6)] ^ flips(rng, rng.integers(0, 70, 6))
    else:
        queries = uniform_corpus(rng, 6)
    matrix = np.stack([brute_force(corpus, query) for query in queries]) if len(corpus) else np.zeros((6, 0))
    deleted = rng.random(len(corpus)) < 0.2 if data.draw(st.booleans()) else None
    methods: tuple[Method, ...] = (
        ("probe", "scan")
        if index.plan(radius, "probe")[1] and _probe_keys(index, radius) < 200_000
        else ("scan",)
    )
    for method in methods:
        results = index.search(queries, radius, deleted, method=method)
        assert_exact(results, matrix.astype(np.uint32), radius, deleted)


def _probe_keys(index: MihIndex, radius: int) -> int:
    _, radii = index.plan(radius, "probe")
    return sum(
        math.comb(width, k) for width, r in zip(index.widths, radii, strict=True) for k in range(r + 1)
    )


def test_pigeonhole_radii_cover_every_distance() -> None:
    for widths in (
        split_widths(11),
        split_widths(16),
        split_widths(13),
        (24, 24, 24, 24, 20, 20, 20, 20, 20, 20, 20, 20),
    ):
        load = tuple(1.0 for _ in widths)
        for radius in range(257):
            radii = choose_radii(widths, radius, load)
            assert sum(r + 1 for r in radii) > radius
            assert all(-1 <= r <= width for r, width in zip(radii, widths, strict=True))
    # The PDQ default at 10M: ten tables at radius 2 and one at radius 1, as planned.
    widths = choose_widths(10_000_000)
    assert len(widths) == 11 and set(widths) == {23, 24}
    assert sorted(choose_radii(widths, 31, tuple(10_000_000 / 2.0**w for w in widths))) == [1] + [2] * 10


def test_layout_and_plans() -> None:
    index = MihIndex(uniform_corpus(np.random.default_rng(8), 5_000))
    assert sum(index.widths) == 256
    assert index.nbytes >= 5_000 * 32 + 5_000 * 4 * len(index.widths)
    method, radii = index.plan(0, "probe")
    assert method == "probe" and sorted(radii) == [-1] * (len(radii) - 1) + [0]  # one bucket of one table
    assert index.plan(256)[0] == "scan"
    assert index.plan(31, "scan") == ("scan", ())


def test_rejects_bad_input() -> None:
    index = MihIndex(uniform_corpus(np.random.default_rng(9), 10))
    query = uniform_corpus(np.random.default_rng(10), 1)
    for bad in (-1, 257):
        with pytest.raises(ValueError):
            index.search(query, bad)
    with pytest.raises(TypeError):
        index.search(query, True)
    with pytest.raises(ValueError):
        index.search(query, 3, np.zeros(9, dtype=np.bool_))
    with pytest.raises(ValueError):
        index.search(query, 3, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        as_codes(np.zeros((2, 31), dtype=np.uint8))
    with pytest.raises(ValueError):
        MihIndex(np.zeros((2, 4), dtype=np.uint64), widths=(128, 127))
    with pytest.raises(ValueError):
        MihIndex(np.zeros((2, 4), dtype=np.uint64), ids=[1, 2, 3])
