"""Replicas of one hub over one PostgreSQL database: what each must learn from the others.

Every replica appends to the shared log (the database serialises appends per
collection), so each one must

- refuse a request signature that any replica has seen, and charge a key's
  requests to one rate limit budget whichever replica answers them
  (:class:`DatabaseRequestGuard`);
- see every entry another replica acknowledged: a search compares the log
  size with its index first (``external_poll`` 0), and :func:`follow_replicas`
  applies the others' appends as their notifications arrive, so that the
  search seldom has anything left to catch up.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

from ..httpsig import MAX_CLOCK_SKEW, VerifiedRequest, replayed
from ..node import Node
from ..store.postgres import PostgresStore
from .limits import RateLimited

log = logging.getLogger("hashfed.hub")


class DatabaseRequestGuard:
    """Replay protection and rate limits kept in the shared database (a ``Guard``).

    Every replica, and every worker of each, refuses a signature any of them
    has seen, and charges a key's requests to the one bucket they share
    (``rate`` 0: no rate limit). A batch costs one statement for the
    signatures and, with a rate limit, one for the buckets.
    """

    def __init__(
        self, store: PostgresStore, rate: float = 0.0, burst: int = 1, *, window: int = 2 * MAX_CLOCK_SKEW
    ) -> None:
        self.store = store
        self.rate = rate
        self.burst = burst
        self.window = window

    def admit(self, verified: VerifiedRequest, now: int) -> None:
        refusal = self.admit_many([verified], now)[0]
        if refusal is not None:
            raise refusal

    def admit_many(self, verified: Sequence[VerifiedRequest], now: int) -> list[Exception | None]:
        """Every request's admission: replays first (a replay costs its key nothing), then the rate."""
        firsts = self.store.first_uses([request.signature for request in verified], now, now + self.window)
        refusals: list[Exception | None] = [
            None if seen is None else replayed(max(0, now - (seen - self.window))) for seen in firsts
        ]
        if self.rate <= 0:
            return refusals
        charged: dict[str, list[int]] = {}  # key id -> positions of its new requests, in order
        for position, (request, refusal) in enumerate(zip(verified, refusals, strict=True)):
            if refusal is None:
                charged.setdefault(request.key_id, []).append(position)
        asked = [(key_id, len(positions)) for key_id, positions in charged.items()]
        for (key_id, positions), (granted, tokens) in zip(
            charged.items(), self.store.take_tokens(asked, self.rate, self.burst), strict=True
        ):
            retry_after = max(1, math.ceil((1 - tokens) / self.rate))
            for position in positions[granted:]:
                refusals[position] = RateLimited(key_id, self.rate, retry_after)
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
