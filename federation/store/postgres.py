"""PostgreSQL storage: one log shared by hub replicas on several machines.

The queries are :mod:`.sql_store`'s, shared with SQLite. What differs:

- Connections come from a psycopg pool (psycopg 3 is synchronous, like the
  core; the hub calls the store from worker threads, never the event loop).
- A write locks its collection's row (``SELECT … FOR UPDATE``) and reads the
  log size there: log indexes are assigned inside the append transaction,
  one after another, whichever replica appends. No sequence is used, since
  a sequence leaves gaps when a transaction rolls back.
- Every write transaction sends ``NOTIFY hashfed_log`` with the collection's
  name when it commits; :meth:`PostgresStore.watch` wakes the other replicas
  with it (they also poll, in case a notification is lost).
- The schema is kept by numbered migrations (:mod:`.postgres_schema`),
  applied when a store opens.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import ConnectionPool, PoolTimeout

from .base import StorageUnavailable, StoreError
from .opening import redact
from .postgres_schema import migrate
from .sql_store import SqlStore
from .sql_txn import Connection, Cursor

log = logging.getLogger("hashfed.store")

CHANNEL = "hashfed_log"
"""The notification channel every write transaction notifies, with the collection's name."""
ANALYZE_MIN_ROWS = 5_000
"""Rows written by this process before the first ANALYZE (then a fifth of what was analyzed)."""
ANALYZED_TABLES = ("listings", "contents", "opinions", "changes", "entries", "tree", "seqs")
DEFAULT_POOL_SIZE = 8
CONNECTION_WAIT_SECONDS = 5.0
"""The longest a query waits for a pooled connection, and a new connection for the server.

A request that needs the database while it cannot be reached is answered
503 ``storage-failed`` after this long, instead of holding its slot (and its
client) for psycopg's default of 30 s."""
RECONNECT_SECONDS = 10.0
"""How long the pool keeps retrying one connection, with growing pauses, before it gives up.

A request that finds no connection then starts a new attempt at once. With
psycopg's default of 300 s the pauses grew to a minute and more during a
long outage, and the hub went on answering 503 that long after the server
was back (17 s after an outage of 40 s, measured); with 10 s it is back
within seconds."""
READINESS_CHECK_SECONDS = 1.0
"""How long one readiness check of the database is reused (probes may come often)."""


def _placeholders(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConnection:
    """A psycopg connection that takes the shared SQL's ``?`` placeholders (implements ``Connection``)."""

    def __init__(self, conn: psycopg.Connection[Any], translated: dict[str, str]) -> None:
        self._conn = conn
        self._translated = translated

    def _sql(self, sql: str) -> str:
        text = self._translated.get(sql)
        if text is None:
            text = self._translated[sql] = _placeholders(sql)
        return text

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self._conn.execute(self._sql(sql), parameters)

    def executemany(self, sql: str, parameters: Sequence[Sequence[Any]], /) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(self._sql(sql), parameters)


def storage_fault(exc: BaseException, url: str) -> StorageUnavailable | None:
    """The :class:`StorageUnavailable` a PostgreSQL error stands for, or None if it is not about storage."""
    where = redact(url)
    if isinstance(exc, pg_errors.DiskFull):
        return StorageUnavailable(
            "full", f"the database server's disk is full ({where}); nothing was written"
        )
    if isinstance(exc, pg_errors.ReadOnlySqlTransaction):
        return StorageUnavailable(
            "read-only", f"the database ({where}) takes no writes (a standby?); nothing was written"
        )
    reason = unreachable(exc, url)
    if reason is not None:
        return StorageUnavailable("io-error", f"{reason}; nothing was written")
    return None


def unreachable(exc: BaseException, url: str) -> str | None:
    """What a PostgreSQL error says when it means the database cannot be reached now, else None."""
    if isinstance(exc, PoolTimeout):
        return (
            f"no connection to the database ({redact(url)}) within {CONNECTION_WAIT_SECONDS:g} s: "
            "the server cannot be reached, or every pooled connection is busy"
        )
    if isinstance(exc, psycopg.OperationalError):
        return f"the database server cannot be reached ({redact(url)}: {exc})"
    return None


def _connect_pool(url: str, size: int) -> ConnectionPool[Any]:
    """A pool of connections to ``url``, or a :class:`StoreError` saying why the server cannot be used.

    One connection is made first, on its own: if it fails, its error (refused,
    no such host, bad password) is the one reported, at once, rather than the
    pool's retries logged until its timeout.
    """
    try:
        psycopg.connect(url, connect_timeout=math.ceil(CONNECTION_WAIT_SECONDS)).close()
    except psycopg.Error as exc:
        said = " ".join(str(exc).split())
        raise StoreError(f"cannot connect to the database {redact(url)}: {said}") from exc
    pool: ConnectionPool[Any] = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        kwargs={"autocommit": True, "connect_timeout": math.ceil(CONNECTION_WAIT_SECONDS)},
        name="hashfed",
        open=False,
        timeout=CONNECTION_WAIT_SECONDS,
        reconnect_timeout=RECONNECT_SECONDS,
    )
    try:
        pool.open(wait=True, timeout=10.0)
    except PoolTimeout as exc:
        pool.close()
        raise StoreError(f"cannot connect to the database {redact(url)}: {exc}") from exc
    return pool


class PostgresStore(SqlStore):
    """The hub's storage in a PostgreSQL database (implements ``HubStore``)."""

    shared = True

    def __init__(self, url: str, *, pool_size: int = DEFAULT_POOL_SIZE) -> None:
        super().__init__()
        self.url = url
        self._translated: dict[str, str] = {}
        self._analyze_lock = threading.Lock()
        self._health_lock = threading.Lock()
        self._health: tuple[float, str | None] = (-math.inf, None)
        self._analyzed = 0
        self._unanalyzed = 0
        self._pool = _connect_pool(url, pool_size)
        try:
            with self._pool.connection() as conn:
                for migration in migrate(conn):
                    log.info(
                        "database %s: applied migration %d (%s)",
                        redact(url),
                        migration.version,
                        migration.name,
                    )
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def _faults(self) -> Iterator[None]:
        """Errors that mean the database cannot be used now, as :class:`StorageUnavailable` (503, 507)."""
        try:
            yield
        except (psycopg.Error, PoolTimeout) as exc:
            fault = storage_fault(exc, self.url)
            if fault is None:
                raise
            reason = unreachable(exc, self.url)
            if reason is not None:  # readiness says so at once, not after its cached answer
                with self._health_lock:
                    self._health = (time.monotonic(), reason)
            raise fault from exc

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        with self._faults(), self._pool.connection() as conn:
            yield _PgConnection(conn, self._translated)

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        with self._faults(), self._pool.connection() as conn:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            try:
                yield _PgConnection(conn, self._translated)
            finally:
                if not conn.closed:
                    conn.execute("ROLLBACK")

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """A write transaction; a full, read-only or unreachable database raises :class:`StorageUnavailable`."""
        with self._faults(), self._pool.connection() as conn, conn.transaction():
            yield _PgConnection(conn, self._translated)

    def unavailable(self) -> str | None:
        """Why the database cannot be used now, or None: for readiness (one check a second at most)."""
        with self._health_lock:
            checked, reason = self._health
        if time.monotonic() - checked < READINESS_CHECK_SECONDS:
            return reason
        reason = None
        try:
            with self._pool.connection() as conn:
                conn.execute("SELECT 1")
        except (psycopg.Error, PoolTimeout) as exc:
            reason = unreachable(exc, self.url) or f"the database refused a check ({redact(self.url)}: {exc})"
        with self._health_lock:
            self._health = (time.monotonic(), reason)
        return reason

    def _lock_collection(self, conn: Connection, collection: str) -> int | None:
        """Lock the collection's row until the transaction ends: appends to it wait in turn."""
        row = conn.execute("SELECT size FROM collections WHERE name = ? FOR UPDATE", (collection,)).fetchone()
        return None if row is None else int(row[0])

    def _written(self, conn: Connection, collection: str) -> None:
        conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, collection))

    def _committed(self, rows: int) -> None:
        """ANALYZE the projection's tables once they have grown by a fifth since the last time.

        The per-hash reads of an append (``hash IN (…)`` on a collection and
        type) need the planner to know the tables are large: with the
        statistics of an empty table it filters the hashes along the whole
        (collection, type) range instead of looking each up, and a bulk
        import slows down with every batch (10,000 items: 1.2 s at first,
        20 s by the fifth batch, before this). Autovacuum analyzes too, but a
        minute or more late.
        """
        with self._analyze_lock:
            self._unanalyzed += rows
            if self._unanalyzed < max(ANALYZE_MIN_ROWS, self._analyzed // 5):
                return
            self._analyzed += self._unanalyzed
            self._unanalyzed = 0
        try:
            with self._connection() as conn:
                conn.execute(f"ANALYZE {', '.join(ANALYZED_TABLES)}")
        except (psycopg.Error, StorageUnavailable) as exc:
            log.warning("could not update the planner's statistics of %s: %s", redact(self.url), exc)

    # ---- replicas --------------------------------------------------------------

    def watch(self, changed: Callable[[str | None], None], stop: threading.Event, poll: float = 1.0) -> None:
        """Call ``changed(collection)`` when another process commits to it, until ``stop`` is set.

        Blocks: run it in a thread. ``changed(None)`` comes every ``poll``
        seconds without news, and after the listening connection was lost
        and made again (notifications sent meanwhile are lost): then the
        caller checks every collection.
        """
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    changed(None)
                    while not stop.is_set():
                        names = sorted({note.payload for note in conn.notifies(timeout=poll, stop_after=1)})
                        if not names:
                            changed(None)
                        for name in names:
                            changed(name)
            except psycopg.Error as exc:
                log.warning("lost the database's notifications (%s); listening again in 1 s", exc)
                stop.wait(1.0)

    # ---- replay protection and rate limits across replicas -------------------

    def first_uses(self, signatures: Sequence[bytes], now: int, expires: int) -> list[int | None]:
        """Record request signatures until ``expires``: for each, None if new, else the expiry it was seen with.

        One statement for all, atomic across replicas: of two replicas given
        the same signature at once, exactly one gets None. A signature given
        twice here is new at most the first time.
        """
        distinct = list(dict.fromkeys(signatures))
        if not distinct:
            return []
        with self._connection() as conn:
            recorded = {
                bytes(row[0])
                for row in conn.execute(
                    "INSERT INTO seen_signatures (signature, expires) SELECT s, ? FROM unnest(?::bytea[]) AS s "
                    "ON CONFLICT (signature) DO UPDATE SET expires = excluded.expires "
                    "WHERE seen_signatures.expires < ? RETURNING signature",
                    (expires, distinct, now),
                ).fetchall()
            }
            if any(signature[0] == 0 for signature in recorded):  # about one in 256 forgets the expired ones
                conn.execute("DELETE FROM seen_signatures WHERE expires < ?", (now,))
            again = [signature for signature in distinct if signature not in recorded]
            rows = (
                conn.execute(
                    "SELECT signature, expires FROM seen_signatures WHERE signature = ANY(?)", (again,)
                ).fetchall()
                if again
                else []
            )
        seen = {bytes(row[0]): int(row[1]) for row in rows}
        firsts: list[int | None] = []
        for signature in signatures:
            if signature in recorded:
                recorded.discard(signature)
                firsts.append(None)
            else:
                firsts.append(seen.get(signature, expires))
        return firsts

    def take_tokens(
        self, asked: Sequence[tuple[str, int]], rate: float, burst: int
    ) -> list[tuple[int, float]]:
        """Charge each ``(key id, requests)`` against the key's token bucket, which every replica shares.

        A bucket holds at most ``burst`` tokens and refills at ``rate`` per
        second, by the database server's clock (the one clock all replicas
        share). Returns, for each key in order, how many of its requests were
        granted (its first ones; the rest are over its rate) and the tokens
        left. One statement for all, atomic across replicas: the upsert locks
        each key's row, so of two replicas charging one key at once the second
        sees the first's charge. Each key must appear once.
        """
        if not asked:
            return []
        ordered = sorted(asked)  # rows locked in one order by every replica: no deadlock
        refilled = "LEAST(?::float8, b.tokens + GREATEST(0, excluded.counted - b.counted) * ?::float8)"
        with self._connection() as conn:
            rows = conn.execute(
                "INSERT INTO rate_buckets AS b (key_id, tokens, counted, asked, granted) "
                "SELECT w.key_id, ?::float8 - LEAST(w.asked, floor(?::float8)), "
                "extract(epoch FROM clock_timestamp())::float8, w.asked, LEAST(w.asked, floor(?::float8)) "
                "FROM unnest(?::text[], ?::int[]) AS w(key_id, asked) "
                "ON CONFLICT (key_id) DO UPDATE SET "
                f"tokens = {refilled} - LEAST(excluded.asked, floor({refilled})), "
                f"granted = LEAST(excluded.asked, floor({refilled})), "
                "asked = excluded.asked, counted = excluded.counted "
                "RETURNING key_id, granted, tokens",
                (
                    burst, burst, burst,
                    [key_id for key_id, _ in ordered], [count for _, count in ordered],
                    burst, rate, burst, rate, burst, rate,
                ),
            ).fetchall()  # fmt: skip
        charged = {str(row[0]): (int(row[1]), float(row[2])) for row in rows}
        return [charged[key_id] for key_id, _ in asked]
