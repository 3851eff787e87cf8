"""How many matches a lookup may materialise (design §7's lookup bounds).

A lookup answers at most ``per_query`` matches per query (nearest first) and
``per_answer`` in all. The bound is enforced inside each search, before any
match becomes a Python object, so one request of 10,000 copies of a hash
with thousands of near-duplicates costs a bounded amount of memory.

Queries are judged in order: query ``i`` may keep ``min(per_query,
per_answer - kept by the queries before it in its answer)`` matches.
Several indexes (segments, collections) answer each query; each runs its own
budget (:meth:`MatchBudget.fork`) over the same queries, which keeps a
superset of what the merged answer needs: an index never spends more on the
queries before ``i`` than the merged answer does, so its room for ``i`` is
never smaller. The merge then runs the real budget over the merged matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

DEFAULT_MAX_MATCHES_PER_QUERY = 10_000
DEFAULT_MAX_MATCHES_PER_ANSWER = 100_000


class MatchBudget:
    """Per-query and per-answer match limits over a search's queries, judged in query order.

    ``answers`` gives the answer (request) each query position belongs to,
    for a search that answers several requests at once (the lookup batcher);
    by default every query belongs to one answer.
    """

    def __init__(self, per_query: int, per_answer: int, answers: Sequence[int] | None = None) -> None:
        if per_query < 0 or per_answer < 0:
            raise ValueError("match limits cannot be negative")
        self.per_query = per_query
        self.per_answer = per_answer
        self._answers = answers
        self._spent: dict[int, int] = {}
        self.truncated: set[int] = set()
        """Positions of the queries whose matches were cut short."""

    def take(self, position: int, found: int) -> int:
        """How many of the ``found`` matches of query ``position`` to keep; call in position order."""
        answer = 0 if self._answers is None else self._answers[position]
        spent = self._spent.get(answer, 0)
        kept = min(found, self.per_query, self.per_answer - spent)
        if kept < found:
            self.truncated.add(position)
        if kept:
            self._spent[answer] = spent + kept
        return kept

    def cut(self, results: Sequence[list[Any]], cut_before: Iterable[int] = ()) -> None:
        """Cut merged per-query results (each sorted nearest first) to this budget, in place.

        ``cut_before`` names the queries that the indexes merged here already
        cut short: they stay marked truncated even where this cut keeps all.
        """
        for position, matches in enumerate(results):
            del matches[self.take(position, len(matches)) :]
        self.truncated.update(cut_before)

    def fork(self) -> MatchBudget:
        """The same limits over the same queries, with nothing spent (for one of several indexes)."""
        return MatchBudget(self.per_query, self.per_answer, self._answers)

    def subset(self, positions: Sequence[int]) -> MatchBudget:
        """The same limits, nothing spent, over the queries at ``positions`` renumbered 0, 1, …"""
        answers = [0 if self._answers is None else self._answers[p] for p in positions]
        return MatchBudget(self.per_query, self.per_answer, answers)


def unlimited() -> MatchBudget:
    """A budget that never cuts (tests, benchmarks, and exact-recall comparisons)."""
    return MatchBudget(2**62, 2**62)
