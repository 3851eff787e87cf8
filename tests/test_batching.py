"""Micro-batching: concurrent lookups share index searches and each gets exactly its own answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import pytest

from federation.hub.batching import LookupBatcher, RequestBatches
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


def test_lookups_of_one_batch_are_searched_together_per_collection_set_within_the_cap() -> None:
    calls: list[tuple[tuple[str, ...], int]] = []

    def search(
        collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget
    ) -> list[list[Match]]:
        calls.append((tuple(collections), len(queries)))
        return _three_each(collections, queries, budget)

    batcher = LookupBatcher(search, max_combined=6, max_matches_per_query=2, max_matches_per_answer=5)
    lookups = [(["main"], [Query(PDQ, f"{n:064x}", 31)] * 4) for n in range(3)]
    lookups.insert(1, (["other"], [Query(PDQ, "f" * 64, 31)]))
    answers = batcher.lookup_many(lookups)
    # Three lookups of 4 queries for "main" with room for 6: no two fit together.
    assert sorted(calls) == [(("main",), 4)] * 3 + [(("other",), 1)]
    for (_, queries), answer in zip(lookups, answers, strict=True):
        assert not isinstance(answer, BaseException)
        assert [len(matches) for matches in answer.results] == ([2, 2, 1, 0] if len(queries) == 4 else [2])
        assert {m.hash for matches in answer.results for m in matches} == {queries[0].hash}


def test_a_failed_search_in_a_batch_fails_only_the_lookups_it_answered() -> None:
    def search(
        collections: Sequence[str], queries: Sequence[Query], budget: MatchBudget
    ) -> list[list[Match]]:
        if collections[0] == "broken":
            raise RuntimeError("index unavailable")
        return [[] for _ in queries]

    answers = LookupBatcher(search).lookup_many(
        [(["broken"], [Query(PDQ, "0" * 64, 31)]), (["main"], [Query(PDQ, "0" * 64, 31)])]
    )
    assert isinstance(answers[0], RuntimeError)
    assert not isinstance(answers[1], BaseException) and answers[1].results == [[]]


async def test_requests_queued_while_a_batch_runs_form_the_next_batch_and_keep_their_own_outcomes() -> None:
    seen: list[list[int]] = []
    release = threading.Event()

    def handle(items: list[int]) -> list[str | BaseException]:
        seen.append(items)
        release.wait(5)
        return [ValueError(f"refused {n}") if n % 3 == 0 else f"answer {n}" for n in items]

    with ThreadPoolExecutor(max_workers=4) as pool:
        batches = RequestBatches(handle, pool, max_items=4)
        first = asyncio.ensure_future(batches.submit(1))
        await asyncio.sleep(0.05)  # the first batch is running, holding only request 1
        rest = [asyncio.ensure_future(batches.submit(n)) for n in range(2, 8)]
        await asyncio.sleep(0.05)
        release.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
    assert seen == [[1], [2, 3, 4, 5], [6, 7]]
    assert [str(outcome) for outcome in outcomes] == [
        "answer 1",
        "answer 2",
        "refused 3",
        "answer 4",
        "answer 5",
        "refused 6",
        "answer 7",
    ]
    assert isinstance(outcomes[2], ValueError) and batches.batches == 3 and batches.items == 7


async def test_a_caller_that_went_away_does_not_stop_the_batches_behind_it() -> None:
    def handle(items: list[int]) -> list[int | BaseException]:
        time.sleep(0.05)
        return [n * 10 for n in items]

    with ThreadPoolExecutor(max_workers=2) as pool:
        batches = RequestBatches(handle, pool)
        leaving = asyncio.ensure_future(batches.submit(1))
        await asyncio.sleep(0.01)
        staying = asyncio.ensure_future(batches.submit(2))
        leaving.cancel()
        assert await staying == 20
        assert await batches.submit(3) == 30
