"""Answers that cannot be held hostage by a client that stops reading.

A client that never reads its answer makes every write wait forever: the
answer stays buffered and, for a stream, its handler holds whatever it
holds. So every write here has a deadline, ``send_timeout_seconds`` plus the
time the bytes take at ``min_send_bytes_per_second``; a client that misses it
has its connection closed. Entries requests, the only answers that can be
large and long, get their own slots (:class:`StreamSlots`): a bounded number
in all and per key, apart from the admission slots every other request uses,
so stalled readers cannot starve lookups, checkpoints or probes.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager, suppress

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from .limits import OVERLOAD_RETRY_AFTER
from .problems import Problem


class SendTimeout(ConnectionError):
    """The client did not read an answer in time; its connection was closed."""


class SendDeadline:
    def __init__(self, timeout: float, min_rate: int) -> None:
        self.timeout = timeout
        self.min_rate = min_rate

    def seconds_for(self, size: int) -> float:
        return self.timeout + (size / self.min_rate if self.min_rate else 0.0)

    async def write(self, request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        """Write ``data`` (preparing the response first if need be), or close the connection and raise."""
        await self._within(request, self._write(request, response, data), len(data))

    async def finish(self, request: web.Request, response: web.StreamResponse) -> None:
        await self._within(request, response.write_eof(), 0)

    async def send(self, request: web.Request, response: web.Response) -> None:
        """Send a whole-body answer (aiohttp leaves the body out for HEAD)."""
        body = response.body
        size = len(body) if isinstance(body, bytes | bytearray) else 0
        await self._within(request, self._whole(request, response), size)

    async def _within(self, request: web.Request, step: Awaitable[None], size: int) -> None:
        # A timer that aborts the connection, not wait_for: no task per answer
        # (measured: 2.6 µs against 17 µs an answer on this machine).
        seconds = self.seconds_for(size)
        transport = request.transport
        if transport is None:  # the client is gone: whatever the step does fails at once
            await step
            return
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            transport.abort()

        timer = asyncio.get_running_loop().call_later(seconds, expire)
        try:
            await step
        except ConnectionError:
            if expired:
                raise SendTimeout(
                    f"the client read under {self.min_rate} bytes/s; its connection was closed after {seconds:g} s"
                ) from None
            raise
        finally:
            timer.cancel()

    @staticmethod
    async def _write(request: web.Request, response: web.StreamResponse, data: bytes) -> None:
        if not response.prepared:
            await response.prepare(request)
        await response.write(data)

    @staticmethod
    async def _whole(request: web.Request, response: web.Response) -> None:
        await response.prepare(request)
        await response.write_eof()


def send_deadline_middleware(deadline: SendDeadline) -> Middleware:
    """Send every whole-body answer under the deadline (outermost: it sends what the others made)."""

    @web.middleware
    async def send_within_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        if isinstance(response, web.Response) and not response.prepared:
            # aiohttp then finds the answer sent (or the connection gone) and moves on.
            with suppress(ConnectionError):
                await deadline.send(request, response)
        return response

    return send_within_deadline


class StreamSlots:
    """At most ``total`` entries requests at once, and ``per_key`` for any one key (event loop only)."""

    def __init__(self, total: int, per_key: int) -> None:
        self.total = total
        self.per_key = per_key
        self._held: Counter[str] = Counter()

    @property
    def held(self) -> int:
        return self._held.total()

    @asynccontextmanager
    async def slot(self, key_id: str) -> AsyncIterator[None]:
        if self._held[key_id] >= self.per_key:
            raise Problem(
                429,
                "too-many-streams",
                f"key {key_id} already has {self._held[key_id]} entries requests open, its limit; "
                "read them to the end (or close them) before opening more",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        if self.held >= self.total:
            raise Problem(
                503,
                "overloaded",
                f"the hub is serving {self.held} entries requests, its limit; retry shortly",
                retry_after=OVERLOAD_RETRY_AFTER,
            )
        self._held[key_id] += 1
        try:
            yield
        finally:
            self._held[key_id] -= 1
            if not self._held[key_id]:
                del self._held[key_id]
