"""Replay protection, rate limits and console sessions shared by the workers of one hub.

With ``hashfed serve --workers N`` every worker process answers requests on
the same port, so what one worker has seen must bind the others: a signature
used at one worker is refused at every other, a key's rate is one budget
whoever answers, and a console login holds on every worker. This keeps that
state in a small SQLite file beside the log (``DIR/workers.sqlite3``): one
short write transaction per signed request (per batch of them, for lookups
answered together), serialised by SQLite across the processes. It holds nothing the log depends on; it is recreated empty at
every start of the hub (a signature's replay window is minutes long, and the
hub refuses signatures older than its clock skew anyway).

Durability is not needed, but atomicity across processes is: the file is in
WAL mode with ``synchronous=OFF``, so a commit is a few microseconds of
shared memory and page cache, never an fsync.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ..httpsig import MAX_CLOCK_SKEW, VerifiedRequest, replayed
from .limits import RateLimited

STATE_FILE = "workers.sqlite3"
PRUNE_EVERY = 1_000
"""Forget expired signatures every this many admissions."""
SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (signature BLOB PRIMARY KEY, expires INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS buckets (key_id TEXT PRIMARY KEY, tokens REAL NOT NULL, counted REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, expires REAL NOT NULL, csrf TEXT NOT NULL) WITHOUT ROWID;
"""


def create_state(path: Path) -> None:
    """Start the workers' shared state afresh (by the supervisor, before any worker runs)."""
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA)
    finally:
        conn.close()
    path.chmod(0o600)


class SharedState:
    """One worker's connection to the shared state file; thread safe (one transaction at a time).

    Transactions take an exclusive ``flock`` on a lock file before SQLite's
    own write lock: a waiting worker then sleeps in the kernel and wakes the
    moment the lock is free, where SQLite's busy handler would poll with
    sleeps of a millisecond and more.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = sqlite3.connect(path, timeout=10.0, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA synchronous=OFF")
        self._lock = threading.Lock()
        self._lock_fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)

    def transaction(self) -> _Transaction:
        return _Transaction(self)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            os.close(self._lock_fd)


class _Transaction:
    """``with state.transaction() as conn``: BEGIN IMMEDIATE .. COMMIT, or ROLLBACK on an exception."""

    def __init__(self, state: SharedState) -> None:
        self.state = state

    def __enter__(self) -> sqlite3.Connection:
        self.state._lock.acquire()
        try:
            fcntl.flock(self.state._lock_fd, fcntl.LOCK_EX)
            try:
                self.state._conn.execute("BEGIN IMMEDIATE")
            except BaseException:
                fcntl.flock(self.state._lock_fd, fcntl.LOCK_UN)
                raise
        except BaseException:
            self.state._lock.release()
            raise
        return self.state._conn

    def __exit__(self, kind: object, value: object, traceback: object) -> None:
        try:
            self.state._conn.execute("ROLLBACK" if kind is not None else "COMMIT")
        finally:
            fcntl.flock(self.state._lock_fd, fcntl.LOCK_UN)
            self.state._lock.release()


class SharedRequestGuard:
    """:class:`~federation.hub.limits.RequestGuard`'s checks, with the memory of signatures and rate
    buckets every worker shares (a :class:`~federation.hub.limits.Guard`)."""

    def __init__(
        self,
        state: SharedState,
        rate: float = 0.0,
        burst: int = 1,
        *,
        window: int = 2 * MAX_CLOCK_SKEW,
    ) -> None:
        self.state = state
        self.rate = rate
        self.burst = burst
        self.window = window
        self._admitted = 0

    def admit(self, verified: VerifiedRequest, now: int) -> None:
        refusal = self.admit_many([verified], now)[0]
        if refusal is not None:
            raise refusal

    def admit_many(self, verified: Sequence[VerifiedRequest], now: int) -> list[Exception | None]:
        """Every request's admission in one transaction (one turn of the workers' lock for a batch)."""
        refusals: list[Exception | None] = []
        if not verified:
            return refusals
        with self.state.transaction() as conn:
            for request in verified:
                self._admitted += 1
                if self._admitted % PRUNE_EVERY == 0:
                    conn.execute("DELETE FROM seen WHERE expires < ?", (now,))
                # Remembered unless seen and not yet expired: then nothing changes, and it is a replay.
                remembered = conn.execute(
                    "INSERT INTO seen (signature, expires) VALUES (?, ?) ON CONFLICT (signature) "
                    "DO UPDATE SET expires = excluded.expires WHERE seen.expires < ?",
                    (request.signature, now + self.window, now),
                ).rowcount
                if not remembered:
                    row = conn.execute("SELECT expires FROM seen WHERE signature = ?", (request.signature,))
                    expires = int(row.fetchone()[0])
                    refusals.append(replayed(now - (expires - self.window)))
                elif self.rate > 0:  # one over its rate is refused, its signature still remembered
                    refusals.append(self._charge(conn, request.key_id))
                else:
                    refusals.append(None)
        return refusals

    def _charge(self, conn: sqlite3.Connection, key_id: str) -> RateLimited | None:
        """Take one token from ``key_id``'s bucket, or return the refusal (wall-clock time: the workers
        share no monotonic clock)."""
        now = time.time()
        row = conn.execute("SELECT tokens, counted FROM buckets WHERE key_id = ?", (key_id,)).fetchone()
        tokens, counted = (float(self.burst), now) if row is None else (float(row[0]), float(row[1]))
        tokens = min(float(self.burst), tokens + max(0.0, now - counted) * self.rate)
        spent = tokens >= 1
        conn.execute(
            "INSERT INTO buckets (key_id, tokens, counted) VALUES (?, ?, ?) "
            "ON CONFLICT (key_id) DO UPDATE SET tokens = excluded.tokens, counted = excluded.counted",
            (key_id, tokens - 1 if spent else tokens, now),
        )
        if spent:
            return None
        return RateLimited(key_id, self.rate, max(1, math.ceil((1 - tokens) / self.rate)))
