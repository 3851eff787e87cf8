"""Micro-batching: concurrent lookups share index searches and each gets exactly its own answer."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import pytest

from federation.hub.batching import LookupBatcher
from federation.index.budget import MatchBudget
from federation.node import Match
from federation.signals import PDQ, Query


def _echo(collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget) -> list[list[Match]]:
    """A stand-in search: one match per query, carrying the query's own hash back."""
    time.sleep(0.01)  # long enough for others to queue behind a running search
    return [[Match(collections[0], "pdq", q.hash, q.max_distance, (), (), 0, 0, 0)] for q in queries]


def _three_each(
    collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget
) -> list[list[Match]]:
    """A stand-in search that finds three matches for every query, within the budget it is given."""
    time.sleep(0.01)
    return [
        [Match("main", "pdq", h, d, (), (), 0, 0, 0) for d in range(budget.take(position, 3))]
        for position, h in enumerate(q.hash for q in queries)
    ]


def test_each_request_in_a_batch_keeps_its_own_match_bounds() -> None:
    batcher = LookupBatcher(_three_each, max_matches_per_query=2, max_matches_per_answer=5)
    answers: dict[int, object] = {}

    def ask(n: int) -> None:
        answers[n] = batcher.lookup(["main"], [Query(PDQ, f"{n:064x}", 31)] * 4)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batcher.searches < batcher.requests == 20
    for answer in answers.values():
        # Two per query, five in all: 2 + 2 + 1 + 0, every one of them cut short.
        assert [len(matches) for matches in answer.results] == [2, 2, 1, 0]  # type: ignore[attr-defined]
        assert answer.truncated == {0, 1, 2, 3}  # type: ignore[attr-defined]


def test_concurrent_requests_share_searches_and_get_their_own_answers() -> None:
    batcher = LookupBatcher(_echo)
    answers: dict[int, list[list[Match]]] = {}

    def ask(n: int) -> None:
        distance = 31 if n % 2 else 20
        queries = [Query(PDQ, f"{n:064x}", distance), Query(PDQ, f"{n + 1000:064x}", distance)]
        answers[n] = batcher.lookup(["main"], queries).results

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, answer in answers.items():
        assert [[m.hash for m in matches] for matches in answer] == [[f"{n:064x}"], [f"{n + 1000:064x}"]]
        assert {m.distance for matches in answer for m in matches} == {31 if n % 2 else 20}
    assert len(answers) == 40
    assert batcher.searches < batcher.requests == 40


def test_a_lone_request_runs_at_once_and_large_ones_go_alone() -> None:
    calls: list[int] = []

    def search(
        collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget
    ) -> list[list[Match]]:
        calls.append(len(queries))
        return [[] for _ in queries]

    batcher = LookupBatcher(search, max_combined=10)
    assert batcher.lookup(["main"], [Query(PDQ, "0" * 64, 31)]).results == [[]]
    assert batcher.lookup(["main"], [Query(PDQ, "0" * 64, 31)] * 12).results == [[]] * 12
    assert calls == [1, 12]


def test_a_failed_search_fails_every_request_in_its_batch_and_the_next_ones_still_run() -> None:
    failing = threading.Event()
    failing.set()

    def search(
        collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget
    ) -> list[list[Match]]:
        if failing.is_set():
            raise RuntimeError("index unavailable")
        return [[] for _ in queries]

    batcher = LookupBatcher(search)
    with pytest.raises(RuntimeError, match="index unavailable"):
        batcher.lookup(["main"], [Query(PDQ, "0" * 64, 31)])
    failing.clear()
    assert batcher.lookup(["main"], [Query(PDQ, "0" * 64, 31)]).results == [[]]
