"""Replicas of one hub over one PostgreSQL database: what each must learn from the others.

Every replica appends to the shared log (the database serialises appends per
collection), so each one must

- refuse a request signature that any replica has seen (:class:`DatabaseReplayGuard`);
- see every entry another replica acknowledged: a search compares the log
  size with its index first (``external_poll`` 0), and :func:`follow_replicas`
  applies the others' appends as their notifications arrive, so that the
  search seldom has anything left to catch up.

Rate limits stay per process: give each replica its share of a key's rate.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from ..httpsig import MAX_CLOCK_SKEW, VerifiedRequest, replayed
from ..node import Node
from ..store.postgres import PostgresStore
from .limits import RateLimited, RateLimiter

log = logging.getLogger("hashfed.hub")


class DatabaseReplayGuard:
    """Replay protection in the shared database; the rate limit in this process (a ``Guard``)."""

    def __init__(
        self, store: PostgresStore, rates: RateLimiter | None = None, *, window: int = 2 * MAX_CLOCK_SKEW
    ) -> None:
        self.store = store
        self.rates = rates
        self.window = window

    def admit(self, verified: VerifiedRequest, now: int) -> None:
        refusal = self.admit_many([verified], now)[0]
        if refusal is not None:
            raise refusal

    def admit_many(self, verified: Sequence[VerifiedRequest], now: int) -> list[Exception | None]:
        """Every request's admission with one round trip to the database (one per batch of lookups)."""
        firsts = self.store.first_uses([request.signature for request in verified], now, now + self.window)
        refusals: list[Exception | None] = []
        for request, seen in zip(verified, firsts, strict=True):
            if seen is not None:
                refusals.append(replayed(max(0, now - (seen - self.window))))
                continue
            try:
                if self.rates is not None:
                    self.rates.charge(request.key_id)
                refusals.append(None)
            except RateLimited as refusal:
                refusals.append(refusal)
        return refusals


def follow_replicas(node: Node, store: PostgresStore, stop: threading.Event) -> threading.Thread:
    """Start a thread that catches this replica's indexes up whenever another replica commits."""

    def changed(collection: str | None) -> None:
        names = [collection] if collection is not None else node.collections()
        for name in names:
            try:
                node.indexes.catch_up(name)
            except Exception:
                log.exception("could not apply the other replicas' entries of %s; a lookup will retry", name)

    thread = threading.Thread(target=store.watch, args=(changed, stop), name="hashfed-replicas", daemon=True)
    thread.start()
    return thread
