"""Micro-batching of concurrent lookups: many small requests, one trip to a thread, one index search.

Requests that arrive while a batch is running wait, and the next batch
answers all of them at once (the way a database commits a group of
transactions together). A request that finds nothing running starts at once,
so a lone request never waits for company; batches form only under load,
exactly when they pay.

Two halves. :class:`RequestBatches` is the event loop's: it hands whatever
queued meanwhile to a worker thread in one call, so a busy hub makes one
thread hop per batch instead of one per request (each hop costs a thread
wake-up and a round of GIL hand-offs, more than a small search does).
:class:`LookupBatcher` is the threads': plain blocking code that searches the
lookups of a batch for the same collections together, each request keeping
its own match bounds; a thread that calls :meth:`LookupBatcher.lookup` alone
(the console) joins whatever search for its collections is running.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..index.budget import DEFAULT_MAX_MATCHES_PER_ANSWER, DEFAULT_MAX_MATCHES_PER_QUERY, MatchBudget
from ..node import Match
from ..signals import Query

Search = Callable[[Sequence[str], Sequence[Query], MatchBudget], list[list[Match]]]
GroupKey = tuple[str, ...]
Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


class RequestBatches(Generic[Item, Outcome]):
    """Runs ``handle`` in ``executor`` over the items that queued while the previous batch ran.

    ``handle`` gets a list of items and gives one outcome per item, in order:
    a value, or the exception that item's caller is to raise. One batch runs
    at a time, of at most ``max_items``; call :meth:`submit` on the event loop.
    """

    def __init__(
        self,
        handle: Callable[[list[Item]], list[Outcome | BaseException]],
        executor: Executor,
        max_items: int = 64,
    ) -> None:
        if max_items < 1:
            raise ValueError("a batch holds at least one item")
        self._handle = handle
        self._executor = executor
        self.max_items = max_items
        self._waiting: list[tuple[Item, asyncio.Future[Outcome]]] = []
        self._running = False
        self.batches = 0
        self.items = 0

    async def submit(self, item: Item) -> Outcome:
        """The outcome of ``item``, handled together with whatever else is waiting."""
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if not self._running:
            self._start()
        return await future

    def _start(self) -> None:
        batch = self._waiting[: self.max_items]
        del self._waiting[: self.max_items]
        self._running = True
        self.batches += 1
        self.items += len(batch)
        items = [item for item, _ in batch]
        running = asyncio.get_running_loop().run_in_executor(self._executor, self._handle, items)
        running.add_done_callback(lambda done: self._finish(batch, done))

    def _finish(
        self,
        batch: list[tuple[Item, asyncio.Future[Outcome]]],
        done: asyncio.Future[list[Outcome | BaseException]],
    ) -> None:
        self._running = False
        try:
            outcomes: list[Outcome | BaseException] = done.result()
            if len(outcomes) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items gave {len(outcomes)} outcomes")
        except BaseException as exc:  # the whole batch failed: every caller hears why
            outcomes = [exc] * len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # its caller went away (a closed connection)
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
        if self._waiting:
            self._start()


@dataclass(frozen=True)
class Answer:
    """One request's matches per query, and the positions of the queries cut short."""

    results: list[list[Match]]
    truncated: frozenset[int]


@dataclass
class _Request:
    queries: Sequence[Query]
    done: threading.Event | None = None
    """Set when the request is answered or leads; only a caller that waits (``lookup``) needs one."""
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
        done = threading.Event()
        request = _Request(queries, done)
        with self._lock:
            self.requests += 1
            self._pending.setdefault(key, []).append(request)
            if key not in self._running:
                self._running.add(key)
                request.lead = True
        if not request.lead:
            done.wait()
            if not request.lead:
                return request.outcome()
            done.clear()
        with self._lock:
            batch = self._take(key)
        self._run(collections, batch)
        with self._lock:
            waiting = self._pending.get(key)
            if waiting:
                successor = waiting[0]
                successor.lead = True
                assert successor.done is not None  # queued only by lookup()
                successor.done.set()
            else:
                self._pending.pop(key, None)
                self._running.discard(key)
        return request.outcome()

    def lookup_many(
        self, lookups: Sequence[tuple[Sequence[str], Sequence[Query]]]
    ) -> list[Answer | BaseException]:
        """Answer several lookups from one thread: those for the same collections searched together.

        Each lookup keeps its own match bounds; a failed search fails only
        the lookups it was answering.
        """
        groups: dict[GroupKey, list[_Request]] = {}
        requests: list[_Request] = []
        for collections, queries in lookups:
            request = _Request(queries)
            requests.append(request)
            groups.setdefault(tuple(collections), []).append(request)
        with self._lock:
            self.requests += len(requests)
        for key, members in groups.items():
            chunk: list[_Request] = []
            total = 0
            for request in members:
                if chunk and total + len(request.queries) > self.max_combined:
                    self._run(key, chunk)
                    chunk, total = [], 0
                chunk.append(request)
                total += len(request.queries)
            self._run(key, chunk)
        return [request.error if request.error is not None else request.outcome() for request in requests]

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
                if request.done is not None:
                    request.done.set()
            return
        with self._lock:
            self.searches += 1
        offset = 0
        for request in batch:
            end = offset + len(request.queries)
            truncated = frozenset(p - offset for p in budget.truncated if offset <= p < end)
            request.result = Answer(results[offset:end], truncated)
            offset = end
            request.lead = False
            if request.done is not None:
                request.done.set()
