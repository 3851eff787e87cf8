"""The PhotoDNA and vPDQ indexes equal brute force, at every radius, through updates, merges and restarts."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.config import DataDir
from federation.hub import open_node
from federation.index.budget import MatchBudget, unlimited
from federation.index.engines import FlatL2Index
from federation.index.pruned import PrunedL2Index
from federation.index.segment_files import _sealed
from federation.index.segmented import SegmentedIndex
from federation.signals import PHOTODNA, VPDQ, LookupDefaults, Query
from federation.signals.vpdq import VideoQuery
from tests.conftest import Federation
from tests.helpers import batch_doc, envelope

WIDTH = 144


def clustered(rng: np.random.Generator, n: int, families: int, spread: int) -> npt.NDArray[np.uint8]:
    """Vectors in a few families of near-duplicates, so that small radii find several."""
    centers = rng.integers(0, 256, (families, WIDTH))
    noise = rng.integers(-spread, spread + 1, (n, WIDTH))
    return np.clip(centers[rng.integers(0, families, n)] + noise, 0, 255).astype(np.uint8)


def brute_l2(present: list[bytes], queries: list[bytes], radius: int) -> list[list[tuple[str, int]]]:
    out = []
    for query in queries:
        q = np.frombuffer(query, np.uint8).astype(np.int64)
        found = []
        for code in present:
            d = int(((np.frombuffer(code, np.uint8).astype(np.int64) - q) ** 2).sum())
            if d <= radius:
                found.append((d, code.hex()))
        out.append([(h, d) for d, h in sorted(found)])
    return out


RADII = st.sampled_from([0, 1, 2_000, 30_000, 120_000, 600_000, 9_363_600])


@dataclass
class L2Scenario:
    codes: list[bytes]
    queries: list[bytes]
    ops: list[tuple[str, list[int]]]
    radii: list[int]


@st.composite
def l2_scenarios(draw: st.DrawFn) -> L2Scenario:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    n = draw(st.integers(1, 60))
    codes = [
        row.tobytes()
        for row in clustered(rng, n, draw(st.integers(1, 4)), draw(st.sampled_from([3, 15, 40])))
    ]
    queries = codes[: draw(st.integers(0, 5))] + [
        row.tobytes() for row in clustered(rng, draw(st.integers(1, 5)), 2, 20)
    ]
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["add", "add", "remove"]), st.lists(st.integers(0, n - 1), max_size=20)
            ),
            min_size=1,
            max_size=6,
        )
    )
    return L2Scenario(codes, queries, ops, draw(st.lists(RADII, min_size=1, max_size=3)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(l2_scenarios(), st.integers(1, 8))
def test_photodna_segmented_search_equals_brute_force_across_merges_and_restarts(
    scenario: L2Scenario, fresh_limit: int
) -> None:
    index = SegmentedIndex.l2(PHOTODNA, fresh_limit=fresh_limit, background_merge=False)
    present: set[bytes] = set()
    queries = [q.hex() for q in scenario.queries]
    for kind, picks in scenario.ops:
        batch = [scenario.codes[i] for i in picks]
        if kind == "add":
            index.add([c.hex() for c in batch])
            present.update(batch)
        else:
            index.remove([c.hex() for c in batch])
            present.difference_update(batch)
        assert len(index) == len(present)
        for radius in scenario.radii:
            assert index.search(queries, radius) == brute_l2(sorted(present), scenario.queries, radius)
    index.merge()
    restarted = SegmentedIndex.l2(PHOTODNA, index.live_codes())  # what a snapshot restores
    for radius in scenario.radii:
        expected = brute_l2(sorted(present), scenario.queries, radius)
        assert index.search(queries, radius) == expected
        assert restarted.search(queries, radius) == expected


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), RADII, st.integers(1, 40), st.integers(1, 50), st.booleans())
def test_pruned_engine_prunes_and_scans_exactly(
    seed: int, radius: int, coarse: int, cell_size: int, deletions: bool
) -> None:
    rng = np.random.default_rng(seed)
    codes = np.unique(
        clustered(rng, 300, 6, 25), axis=0
    )  # sorted and unique, as the large segment keeps them
    engine = PrunedL2Index(codes, coarse_cells=coarse, cell_size=cell_size)
    queries = np.concatenate([codes[:3], clustered(rng, 4, 3, 25)])
    deleted = rng.random(len(codes)) < 0.3 if deletions else None
    expected = []
    for query in queries:
        d = ((codes.astype(np.int64) - query.astype(np.int64)) ** 2).sum(axis=1)
        rows = [r for r in np.flatnonzero(d <= radius) if deleted is None or not deleted[r]]
        expected.append(sorted((int(d[r]), int(r)) for r in rows))
    for method in ("prune", "scan", "auto"):
        got = engine.search(queries, radius, deleted, method=method)
        assert [sorted(zip(ds.tolist(), rows.tolist(), strict=True)) for rows, ds in got] == expected
        assert [list(zip(ds.tolist(), rows.tolist(), strict=True)) for rows, ds in got] == expected  # ordered


def test_pruned_engine_keeps_the_nearest_its_budget_allows() -> None:
    rng = np.random.default_rng(2)
    codes = np.unique(clustered(rng, 400, 2, 10), axis=0)
    engine = PrunedL2Index(codes)
    full = engine.search(codes[:4], 9_363_600, budget=unlimited())
    budget = MatchBudget(per_query=50, per_answer=120)
    cut = engine.search(codes[:4], 9_363_600, budget=budget)
    assert [len(rows) for rows, _ in cut] == [50, 50, 20, 0]
    for (rows, ds), (all_rows, all_ds) in zip(cut, full, strict=True):
        assert rows.tolist() == all_rows[: len(rows)].tolist() and ds.tolist() == all_ds[: len(ds)].tolist()
    assert budget.truncated == {0, 1, 2, 3}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_pruned_engine_finds_hits_at_exactly_the_radius_among_extreme_vectors(
    seed: int, cell_size: int
) -> None:
    """Corner vectors (every byte 0 or 255) and near copies: the largest norms and distances,
    where the float32 bounds round the most, probed at radii equal to true distances."""
    rng = np.random.default_rng(seed)
    corners = rng.choice(np.array([0, 255], dtype=np.uint8), (12, WIDTH))
    steps = rng.integers(0, 4, (48, WIDTH)) * (rng.random((48, WIDTH)) < 0.1)
    near = corners[rng.integers(0, 12, 48)].astype(np.int64)
    near = np.where(near == 0, near + steps, near - steps).astype(np.uint8)
    codes = np.unique(np.concatenate([corners, near]), axis=0)
    engine = PrunedL2Index(codes, cell_size=cell_size, coarse_cells=3)
    queries = np.concatenate([255 - corners[:3], near[:3], corners[:2]])
    for query in queries:
        distances = ((codes.astype(np.int64) - query.astype(np.int64)) ** 2).sum(axis=1)
        for radius in [*sorted(set(distances.tolist()))[:3], int(np.median(distances))]:
            expected = sorted((int(distances[r]), int(r)) for r in np.flatnonzero(distances <= radius))
            ((rows, ds),) = engine.search(query[None, :], radius, method="prune")
            assert list(zip(ds.tolist(), rows.tolist(), strict=True)) == expected


def test_flat_l2_rounding_never_loses_a_hit_at_the_radius() -> None:
    """Vectors at exactly the radius from large-norm queries, where float32 rounding is worst."""
    rng = np.random.default_rng(4)
    base = rng.integers(200, 256, (50, WIDTH)).astype(np.uint8)
    index = FlatL2Index(PHOTODNA)
    others = base.copy()
    others[:, 0] -= np.arange(50, dtype=np.uint8)  # squared distance n*n for row n
    index.add([row.tobytes().hex() for row in others])
    for n in (0, 1, 7, 49):
        got = index.search([base[n].tobytes().hex()], n * n)
        assert (others[n].tobytes().hex(), n * n) in got[0]


# ---- vPDQ ---------------------------------------------------------------------------------


def naive_identity(frames: list[str]) -> str:
    return hashlib.sha256("".join(f + "\n" for f in sorted(set(frames))).encode()).hexdigest()


def hamming(a: str, b: str) -> int:
    return bin(int(a, 16) ^ int(b, 16)).count("1")


def naive_videos(
    videos: dict[str, list[str]], query: list[str], radius: int, min_q: float, min_c: float
) -> list[tuple[str, int, float, float]]:
    q = sorted(set(query))
    out = []
    for identity, frames in videos.items():
        c = sorted(set(frames))
        nearest = {a: min(hamming(a, b) for b in c) for a in q}
        matched_q = [a for a in q if nearest[a] <= radius]
        matched_c = [b for b in c if any(hamming(a, b) <= radius for a in q)]
        qp, cp = 100 * len(matched_q) / len(q), 100 * len(matched_c) / len(c)
        if matched_q and qp >= min_q and cp >= min_c:
            out.append((identity, max(nearest[a] for a in matched_q), qp, cp))
    return sorted(out, key=lambda v: (v[1], v[0]))


def flip_bits(hex_hash: str, bits: list[int]) -> str:
    value = int(hex_hash, 16)
    for bit in bits:
        value ^= 1 << bit
    return f"{value:064x}"


@st.composite
def frame_pools(draw: st.DrawFn) -> list[str]:
    """A few base frames and near copies of them, so frames match across videos at small radii."""
    bases = [f"{draw(st.integers(0, 2**256 - 1)):064x}" for _ in range(draw(st.integers(1, 4)))]
    pool = list(bases)
    for _ in range(draw(st.integers(0, 8))):
        base = draw(st.sampled_from(bases))
        pool.append(flip_bits(base, draw(st.lists(st.integers(0, 255), max_size=40))))
    return pool


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data(), frame_pools())
def test_video_search_equals_the_naive_rule(data: st.DataObject, pool: list[str]) -> None:
    index = VPDQ.new_index()
    videos: dict[str, list[str]] = {}
    for _ in range(data.draw(st.integers(1, 6))):
        frames = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6))
        identity = naive_identity(frames)
        if data.draw(st.booleans()) and videos:
            gone = data.draw(st.sampled_from(sorted(videos)))
            index.remove([gone])
            del videos[gone]
        if identity not in videos:
            index.add([identity], [bytes.fromhex("".join(sorted(set(frames))))])  # type: ignore[call-arg]
            videos[identity] = frames
    query = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=6))
    radius = data.draw(st.sampled_from([0, 5, 31, 63]))
    min_q, min_c = data.draw(st.sampled_from([0, 50, 80, 100])), data.draw(st.sampled_from([0, 50, 100]))
    detail = VideoQuery(tuple(sorted(set(query))), float(min_q), float(min_c))
    got = VPDQ.search(index, [Query(VPDQ, naive_identity(query), radius, detail)], None)[0]
    expected = naive_videos(videos, query, radius, min_q, min_c)
    assert [(h.hash, h.distance) for h in got] == [(e[0], e[1]) for e in expected]
    for hit, want in zip(got, expected, strict=True):
        fields = dict(hit.fields)
        assert abs(fields["query_match_percent"] - want[2]) < 1e-9
        assert abs(fields["compared_match_percent"] - want[3]) < 1e-9
    assert len(index) == len(videos)


# ---- through the log: restart and rebuild give the same answers -----------------------------


def test_photodna_and_video_answers_survive_a_restart(federation: Federation) -> None:
    rng = np.random.default_rng(8)
    vectors = clustered(rng, 40, 3, 20)
    frames = [f"{int(x):064x}" for x in rng.integers(1, 2**62, 12)]
    videos = [frames[:5], frames[3:9], frames[8:]]
    add = [{"type": "photodna", "hash": v.tobytes().hex(), "labels": []} for v in vectors]
    add += [
        {
            "type": "vpdq",
            "hash": naive_identity(v),
            "labels": [],
            "frames": [{"pdq": f, "quality": 80} for f in v],
        }
        for v in videos
    ]
    node = open_node(federation.data)
    node.load()
    node.submit("main", envelope(federation.members["acme"], batch_doc("acme", add)))
    node.indexes.snapshot_all()
    removed = [("photodna", vectors[0].tobytes().hex()), ("vpdq", naive_identity(videos[0]))]
    node.submit("main", envelope(federation.members["acme"], batch_doc("acme", [], removed)))
    defaults = LookupDefaults()
    queries = [
        PHOTODNA.parse_query(
            {"type": "photodna", "hash": v.tobytes().hex(), "max_distance": 60_000}, None, defaults
        )
        for v in vectors[:6]
    ]
    queries.append(
        VPDQ.parse_query(
            {
                "type": "vpdq",
                "frames": [{"pdq": f, "quality": 90} for f in frames[2:10]],
                "min_query_match_percent": 0,
            },
            None,
            defaults,
        )
    )

    def answers(serving: object) -> list[list[tuple[str, int, tuple[tuple[str, float], ...]]]]:
        return [[(m.hash, m.distance, m.fields) for m in ms] for ms in serving.lookup(["main"], queries)]  # type: ignore[attr-defined]

    expected = answers(node)
    assert expected[-1] and naive_identity(videos[0]) not in [m[0] for m in expected[-1]]
    assert all(m[0] != vectors[0].tobytes().hex() for ms in expected for m in ms)
    node.store.close()
    assert (federation.data.index_dir / "main.photodna.json").exists()  # the restart maps its segment
    reopened = open_node(DataDir(federation.data.path))
    reopened.load()
    assert answers(reopened) == expected
    reopened.store.close()


def test_a_photodna_snapshot_an_older_engine_wrote_is_rebuilt_from_the_log(
    federation: Federation, caplog: pytest.LogCaptureFixture
) -> None:
    """A sound segment whose engine arrays this version cannot open: answers come from the log."""
    rng = np.random.default_rng(9)
    vectors = clustered(rng, 30, 2, 20)
    add = [{"type": "photodna", "hash": v.tobytes().hex(), "labels": []} for v in vectors]
    node = open_node(federation.data)
    node.load()
    node.submit("main", envelope(federation.members["acme"], batch_doc("acme", add)))
    node.indexes.snapshot_all()
    query = [
        PHOTODNA.parse_query({"type": "photodna", "hash": vectors[0].tobytes().hex()}, None, LookupDefaults())
    ]
    expected = [[m.hash for m in ms] for ms in node.lookup(["main"], query)]
    node.store.close()
    assert expected[0]
    meta_path = federation.data.index_dir / "main.photodna.json"
    meta = json.loads(meta_path.read_text())
    meta["files"].pop("fine_reach")  # what a segment written before that array existed lists
    meta_path.write_text(json.dumps(_sealed(meta)))
    (federation.data.index_dir / meta["segment"] / "fine_reach.npy").unlink()

    reopened = open_node(DataDir(federation.data.path))
    reopened.load()
    assert [[m.hash for m in ms] for ms in reopened.lookup(["main"], query)] == expected
    assert "cannot open" in caplog.text and "fine_reach" in caplog.text
    reopened.store.close()
