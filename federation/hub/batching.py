"""Micro-batching of concurrent lookups: many small requests, one index search.

Requests for the same collections that arrive while a search
for them is running wait, and the next search answers all of them at once
(the way a database commits a group of transactions together). A request that
finds nothing running starts at once, so a lone request never waits for
company; batches form only under load, exactly when they pay.

Lookups run in worker threads, so this is plain blocking code: the first
request of a group leads (runs the search), the others wait on an event and
are either answered or promoted to lead the next search.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..index.budget import DEFAULT_MAX_MATCHES_PER_ANSWER, DEFAULT_MAX_MATCHES_PER_QUERY, MatchBudget
from ..node import Match
from ..signals import Query

Search = Callable[[Sequence[str], Sequence[Query], MatchBudget], list[list[Match]]]
GroupKey = tuple[str, ...]


@dataclass(frozen=True)
class Answer:
    """One request's matches per query, and the positions of the queries cut short."""

    results: list[list[Match]]
    truncated: frozenset[int]


@dataclass
class _Request:
    queries: Sequence[Query]
    done: threading.Event = field(default_factory=threading.Event)
    result: Answer | None = None
    error: BaseException | None = None
    lead: bool = False

    def outcome(self) -> Answer:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class LookupBatcher:
    """Combines concurrent lookups; each request keeps its own match bounds (design §7)."""

    def __init__(
        self,
        search: Search,
        max_combined: int = 1000,
        *,
        max_matches_per_query: int = DEFAULT_MAX_MATCHES_PER_QUERY,
        max_matches_per_answer: int = DEFAULT_MAX_MATCHES_PER_ANSWER,
    ) -> None:
        self._search = search
        self.max_combined = max_combined
        self.max_matches_per_query = max_matches_per_query
        self.max_matches_per_answer = max_matches_per_answer
        self._lock = threading.Lock()
        self._pending: dict[GroupKey, list[_Request]] = {}
        self._running: set[GroupKey] = set()
        self.searches = 0
        self.requests = 0

    def lookup(self, collections: Sequence[str], queries: Sequence[Query]) -> Answer:
        """Answer one lookup, possibly together with others that arrive meanwhile."""
        if len(queries) >= self.max_combined:
            budget = MatchBudget(self.max_matches_per_query, self.max_matches_per_answer)
            results = self._search(collections, queries, budget)
            return Answer(results, frozenset(budget.truncated))
        key = tuple(collections)
        request = _Request(queries)
        with self._lock:
            self.requests += 1
            self._pending.setdefault(key, []).append(request)
            if key not in self._running:
                self._running.add(key)
                request.lead = True
        if not request.lead:
            request.done.wait()
            if not request.lead:
                return request.outcome()
            request.done.clear()
        with self._lock:
            batch = self._take(key)
        self._run(collections, batch)
        with self._lock:
            waiting = self._pending.get(key)
            if waiting:
                successor = waiting[0]
                successor.lead = True
                successor.done.set()
            else:
                self._pending.pop(key, None)
                self._running.discard(key)
        return request.outcome()

    def _take(self, key: GroupKey) -> list[_Request]:
        """The leader's request (first in line) and whoever queued behind it, up to the cap."""
        waiting = self._pending[key]
        batch: list[_Request] = []
        total = 0
        while waiting and (not batch or total + len(waiting[0].queries) <= self.max_combined):
            total += len(waiting[0].queries)
            batch.append(waiting.pop(0))
        return batch

    def _run(self, collections: Sequence[str], batch: list[_Request]) -> None:
        combined = [query for request in batch for query in request.queries]
        answers = [number for number, request in enumerate(batch) for _ in request.queries]
        budget = MatchBudget(self.max_matches_per_query, self.max_matches_per_answer, answers)
        try:
            results = self._search(collections, combined, budget)
        except BaseException as exc:
            for request in batch:
                request.error = exc
                request.lead = False
                request.done.set()
            return
        self.searches += 1
        offset = 0
        for request in batch:
            end = offset + len(request.queries)
            truncated = frozenset(p - offset for p in budget.truncated if offset <= p < end)
            request.result = Answer(results[offset:end], truncated)
            offset = end
            request.lead = False
            request.done.set()
