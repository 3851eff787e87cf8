"""What keeps the hub standing under load and abuse: every limit is a hub.toml setting.

The hub sheds work it cannot do rather than queue it without bound, and says
when to come back: a shed request is an RFC 9457 problem with ``Retry-After``,
which :class:`federation.client.HubClient` honours.

* **Connections** (:class:`ConnectionLimiter`, :class:`LimitedTCPSite`): at
  most ``max_connections`` open at once. The count is taken when a connection
  is made, before aiohttp sees it; one over the limit is answered ``503
  too-many-connections`` and closed. This bounds file descriptors and the
  per-connection buffers.
* **Slow clients**: aiohttp closes a connection that sends no complete request
  headers within ``keepalive_timeout_seconds`` (idle keep-alive connections
  likewise); :func:`read_body` gives a body ``request_timeout_seconds`` in all
  and cuts one averaging under ``min_body_bytes_per_second`` (after
  :data:`BODY_GRACE_SECONDS`) with ``408 request-timeout`` and a closed
  connection. Bodies are read before admission, so a slow sender holds a
  connection, never a handling slot.
* **Admission** (:class:`Admission`): at most ``max_inflight`` requests handled
  at once and ``max_queued`` waiting, each for at most
  ``queue_timeout_seconds``; beyond that ``503 overloaded``. Memory held by
  requests is therefore bounded by the slots and the queue, not by the
  offered load. Liveness and readiness probes are exempt, so an overloaded
  hub is not mistaken for a dead one.
* **Per-member rate limits** (:class:`RateLimiter`, :class:`RequestGuard`): a
  token bucket per key id, charged once a request's signature has verified
  and is not a replay, so nobody can spend another member's budget by
  naming its key; over it, ``429 rate-limited``. Public endpoints carry no
  key and are not rate limited (admission still bounds them): a per-address
  bucket would throttle every member behind one reverse proxy or NAT alike.
"""

from __future__ import annotations

import asyncio
import collections
import json
import math
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from types import MappingProxyType
from typing import Protocol, cast

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from ..config import HubConfig
from ..httpsig import ReplayGuard, SignatureRefused, VerifiedRequest
from .problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, Problem, problem_request_handlers

EXEMPT_PATHS = frozenset({"/v1/health", "/v1/ready"})
"""Probes answer even when every slot is taken: they do no work worth shedding."""
OVERLOAD_RETRY_AFTER = 1
"""Seconds a shed request is told to wait: slots free in milliseconds, queues drain in seconds."""
BODY_GRACE_SECONDS = 2.0
"""A body's average rate is judged only after this long: TCP slow start and a busy
client should not count against it."""
MAX_RATE_KEYS = 100_000
"""Token buckets kept at most; past it the least recently used is forgotten (it
starts again full, which errs towards the member)."""
REFUSED_CONNECTION_LINGER = 1.0
"""Seconds a connection over the limit is kept open after its 503, so the answer is
read before the socket closes (closing over unread data resets the connection)."""

_TITLES = MappingProxyType({408: "Request timeout", 429: "Too many requests", 503: "Overloaded"})


def _problem_body(status: int, kind: str, detail: str) -> bytes:
    document = {
        "type": PROBLEM_TYPE_PREFIX + kind,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return json.dumps(document).encode()


def shed_response(status: int, kind: str, detail: str, retry_after: int | None) -> web.Response:
    """A problem response, with ``Retry-After`` (whole seconds) when the client should come back."""
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(
        status=status,
        body=_problem_body(status, kind, detail),
        content_type=PROBLEM_CONTENT_TYPE,
        headers=headers,
    )


# ---- per-member rate limits ------------------------------------------------------------


class RateLimited(Problem):
    """A key spent its budget; ``retry_after`` is when its bucket holds a token again."""

    def __init__(self, key_id: str, rate: float, retry_after: int) -> None:
        super().__init__(
            429,
            "rate-limited",
            f"key {key_id} is over its rate limit of {rate:g} requests per second; "
            f"retry after {retry_after} s",
        )
        self.retry_after = retry_after


class RateLimiter:
    """Token buckets by key id: ``burst`` requests at once, refilled at ``rate`` per second.

    Thread safe: signatures are checked in worker threads. Memory is bounded by
    ``max_keys`` buckets, and a bucket that has refilled completely is
    forgotten, since a missing bucket means exactly that.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_keys: int = MAX_RATE_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("rate must be positive, burst and max_keys at least 1")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key id -> (tokens, when counted); least recently charged first.
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)

    def charge(self, key_id: str) -> None:
        """Take one token from ``key_id``'s bucket, or raise :class:`RateLimited`."""
        now = self._clock()
        with self._lock:
            self._forget_full(now)
            tokens, counted = self._buckets.pop(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - counted) * self.rate)
            if tokens < 1:
                self._buckets[key_id] = (tokens, now)
                raise RateLimited(key_id, self.rate, max(1, math.ceil((1 - tokens) / self.rate)))
            self._buckets[key_id] = (tokens - 1, now)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)

    def _forget_full(self, now: float) -> None:
        # Buckets are in the order they were last charged; one untouched for
        # burst / rate seconds is full again whatever it held.
        refill = self.burst / self.rate
        while self._buckets:
            _, counted = next(iter(self._buckets.values()))
            if now - counted < refill:
                return
            self._buckets.popitem(last=False)


class Guard(Protocol):
    """What a request whose signature verified must still pass before it is handled.

    :class:`RequestGuard` in one process; the workers of one hub share a
    :class:`~federation.hub.shared_guard.SharedRequestGuard`.
    """

    def admit(self, verified: VerifiedRequest, now: int) -> None: ...

    def admit_many(self, verified: Sequence[VerifiedRequest], now: int) -> list[Exception | None]:
        """:meth:`admit` for several requests in order: each one's refusal, or None (never raises one)."""
        ...


class RequestGuard(ReplayGuard):
    """What a request whose signature verified must still pass: not a replay, and within its key's rate.

    The replay check comes first, so a replayed request costs its key nothing;
    the rate check follows, so only the key's holder can spend its budget.
    """

    def __init__(self, rates: RateLimiter | None = None) -> None:
        super().__init__()
        self.rates = rates

    def admit(self, verified: VerifiedRequest, now: int) -> None:
        self.check_and_remember(verified.signature, now)
        if self.rates is not None:
            self.rates.charge(verified.key_id)

    def admit_many(self, verified: Sequence[VerifiedRequest], now: int) -> list[Exception | None]:
        refusals: list[Exception | None] = []
        for request in verified:
            try:
                self.admit(request, now)
            except (SignatureRefused, RateLimited) as refusal:
                refusals.append(refusal)
            else:
                refusals.append(None)
        return refusals


def rate_limiter(config: HubConfig) -> RateLimiter | None:
    """The configured per-key rate limiter, or None when ``rate_limit_per_second`` is 0."""
    if config.rate_limit_per_second <= 0:
        return None
    return RateLimiter(config.rate_limit_per_second, config.burst)


# ---- admission -------------------------------------------------------------------------


class Admission:
    """At most ``max_inflight`` requests handled at once, ``max_queued`` waiting in arrival order.

    Lives on the event loop (no locks). A finishing request hands its slot
    straight to the longest waiter, so a newcomer cannot overtake the queue.
    """

    def __init__(self, max_inflight: int, max_queued: int, queue_timeout: float) -> None:
        self.max_inflight = max_inflight
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.inflight = 0
        self.shed = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> bool:
        """Take a slot, waiting in the queue if need be; False when the request must be shed."""
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return True
        if len(self._waiters) >= self.max_queued:
            self.shed += 1
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, self.queue_timeout)
        except TimeoutError:
            self.shed += 1
            return False
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as this request was cancelled
            raise
        finally:
            with suppress(ValueError):
                self._waiters.remove(waiter)
        return True

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on; inflight is unchanged
                return
        self.inflight -= 1


# ---- slow bodies -----------------------------------------------------------------------


class BodyTimeout(Exception):
    """A request body took too long, or arrived too slowly."""


async def read_body(request: web.Request, timeout: float, min_rate: int) -> None:
    """Read (and so cache) the request body within ``timeout`` and at ``min_rate`` bytes/s on average.

    Handlers then get it from ``request.read()`` at once. Size is still
    limited by aiohttp's ``client_max_size`` (413). Raises :class:`BodyTimeout`.
    """
    content = request.content
    if content.is_eof():  # all of it arrived with the headers: nothing to wait for
        await request.read()
        return
    loop = asyncio.get_running_loop()
    started = loop.time()
    reading = asyncio.ensure_future(request.read())
    try:
        while True:
            # Sleep until the body would be too late, or (at the rate it came
            # so far) too slow; then judge, or wake on the body's last byte.
            due = started + timeout
            if min_rate:
                due = min(due, started + max(BODY_GRACE_SECONDS, content.total_bytes / min_rate))
            done, _ = await asyncio.wait({reading}, timeout=max(due - loop.time(), 0.01))
            if done:
                reading.result()
                return
            elapsed = loop.time() - started
            if elapsed >= timeout:
                raise BodyTimeout(
                    f"the request body did not arrive within {timeout:g} s "
                    f"({content.total_bytes} bytes received); send it at once, or in smaller requests"
                )
            if min_rate and elapsed >= BODY_GRACE_SECONDS and content.total_bytes / elapsed < min_rate:
                raise BodyTimeout(
                    f"the request body arrived at {content.total_bytes / elapsed:.0f} bytes/s, under "
                    f"the hub's minimum of {min_rate} bytes/s"
                )
    finally:
        if not reading.done():
            reading.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await reading


async def _timed_out(request: web.Request, detail: str) -> web.StreamResponse:
    """Answer 408 and close the connection at once, not after aiohttp drains the rest of the body."""
    response = shed_response(408, "request-timeout", detail, None)
    response.force_close()
    with suppress(ConnectionError):  # the client left: there is no one to answer
        await response.prepare(request)
        await response.write_eof()
    request.protocol.force_close()
    return response


# ---- the middlewares -------------------------------------------------------------------


ADMISSION = web.AppKey("admission", Admission)

HeaderCheck = Callable[[web.Request], Awaitable[None]]
"""Authenticates a request from its headers alone (before its body is read), or raises a Problem."""


class PendingBodies:
    """Bytes of request bodies buffered at once across the hub, at most ``limit`` (event loop only)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def reserve(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def release(self, size: int) -> None:
        self.held -= size


def _takes_body(request: web.Request) -> bool:
    """Only the API's POST routes read a body; any other is never buffered."""
    return request.method == "POST" and request.match_info.http_exception is None


def limit_middlewares(
    config: HubConfig, admission: Admission, check_headers: HeaderCheck | None = None
) -> list[Middleware]:
    """Middlewares to run inside ``problem_middleware``: bodies, admission, rate-limit answers.

    A body is read only for a route that takes one, only in the API's own
    content coding (identity: a compressed body is refused, never inflated),
    only after the headers have been authenticated when it has not fully
    arrived with them (``check_headers``), and only while the bytes buffered
    hub-wide stay under ``max_pending_body_bytes``.
    """
    pending = PendingBodies(config.max_pending_body_bytes)

    @web.middleware
    async def body_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.body_exists or not _takes_body(request):
            return await handler(request)
        coding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise Problem(
                415,
                "unsupported-content-encoding",
                f"request bodies are accepted in the identity coding only, not {coding!r}; "
                "send the JSON as is (Content-Digest covers the bytes as sent)",
            )
        declared = request.content_length
        if declared is not None and declared > config.max_body_bytes:
            # Refused from its length alone, as aiohttp refuses one found too long while reading.
            raise web.HTTPRequestEntityTooLarge(max_size=config.max_body_bytes, actual_size=declared)
        if check_headers is not None and not request.content.is_eof():
            await check_headers(request)
        size = declared if declared is not None else config.max_body_bytes
        if not pending.reserve(size):
            raise Problem(
                503,
                "overloaded",
                f"the hub holds {pending.held} bytes of request bodies, its limit; retry shortly",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        try:
            try:
                await read_body(request, config.request_timeout_seconds, config.min_body_bytes_per_second)
            except BodyTimeout as exc:
                return await _timed_out(request, str(exc))
            return await handler(request)
        finally:
            pending.release(size)

    @web.middleware
    async def admit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in EXEMPT_PATHS or _is_entries_read(request):
            # Probes do no work worth shedding; entries requests have slots of their own.
            return await handler(request)
        if not await admission.acquire():
            return shed_response(
                503,
                "overloaded",
                f"the hub is handling {admission.inflight} requests with {admission.queued} waiting, "
                "its limit; retry later",
                OVERLOAD_RETRY_AFTER,
            )
        try:
            return await handler(request)
        finally:
            admission.release()

    @web.middleware
    async def rate_limited(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RateLimited as exc:
            return shed_response(exc.status, exc.kind, exc.detail, exc.retry_after)

    return [body_limits, admit, rate_limited]


def _is_entries_read(request: web.Request) -> bool:
    route = request.match_info.route
    resource = route.resource
    return (
        request.method == "GET"
        and resource is not None
        and resource.canonical == "/v1/collections/{collection}/entries"
    )


def handler_args(config: HubConfig) -> dict[str, float | bool]:
    """aiohttp connection settings (``web.Application(handler_args=…)``) from the configuration.

    Request bodies are never decompressed: the API takes identity bodies only,
    and inflating before authentication would let anyone make the hub buffer
    far more than it received.
    """
    return {"keepalive_timeout": config.keepalive_timeout_seconds, "auto_decompress": False}


# ---- connections -----------------------------------------------------------------------


ProtocolFactory = Callable[[], asyncio.Protocol]


class ConnectionLimiter:
    """Counts open connections and refuses those over ``limit``.

    Its :meth:`protocol` is the factory handed to ``loop.create_server``: each
    connection gets a :class:`_Connection`, which either takes a place and
    passes everything to the real (aiohttp) protocol, or answers 503 and closes.
    Counted when the connection is made and released when it is lost, so the
    count is exact whatever happens between accept and first byte.
    """

    def __init__(self, limit: int, factory: ProtocolFactory | None = None) -> None:
        self.limit = limit
        self.factory = factory
        self.open = 0
        self.refused = 0

    def protocol(self) -> asyncio.Protocol:
        return _Connection(self)


_REFUSAL_BODY = _problem_body(
    503, "too-many-connections", "the hub has as many open connections as it allows; retry shortly"
)
_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: " + PROBLEM_CONTENT_TYPE.encode() + b"\r\n"
    b"Content-Length: " + str(len(_REFUSAL_BODY)).encode() + b"\r\n"
    b"Retry-After: " + str(OVERLOAD_RETRY_AFTER).encode() + b"\r\n"
    b"Connection: close\r\n\r\n" + _REFUSAL_BODY
)


class _Connection(asyncio.Protocol):
    def __init__(self, limiter: ConnectionLimiter) -> None:
        self._limiter = limiter
        self._inner: asyncio.Protocol | None = None
        self._closer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        limiter = self._limiter
        if limiter.open >= limiter.limit or limiter.factory is None:
            limiter.refused += 1
            stream = cast(asyncio.Transport, transport)
            stream.write(_REFUSAL)
            if stream.can_write_eof():
                stream.write_eof()
            self._closer = asyncio.get_running_loop().call_later(REFUSED_CONNECTION_LINGER, stream.close)
            return
        limiter.open += 1
        self._inner = limiter.factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closer is not None:
            self._closer.cancel()
        if self._inner is not None:
            self._limiter.open -= 1
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class LimitedTCPSite(web.BaseSite):
    """aiohttp's TCP site with every connection passed through a :class:`ConnectionLimiter`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        limiter: ConnectionLimiter,
        *,
        backlog: int = 128,
        ssl_context: ssl.SSLContext | None = None,
        reuse_port: bool = False,
    ) -> None:
        super().__init__(runner, backlog=backlog, ssl_context=ssl_context)
        self._hub_runner = runner
        self._host = host
        self._port = port
        self._reuse_port = reuse_port
        self.limiter = limiter

    @property
    def port(self) -> int:
        """The port listened on (the one chosen, once started on port 0)."""
        if self._server is not None and self._server.sockets:  # type: ignore[attr-defined]
            return int(self._server.sockets[0].getsockname()[1])  # type: ignore[attr-defined]
        return self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context is not None else "http"
        return f"{scheme}://{self._host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._hub_runner.server
        assert server is not None  # BaseSite refuses a runner that is not set up
        self.limiter.factory = problem_request_handlers(server)
        self._server = await asyncio.get_running_loop().create_server(
            self.limiter.protocol,
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
            reuse_port=self._reuse_port or None,
            ssl=self._ssl_context,
        )
