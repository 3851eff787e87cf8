"""The aiohttp application: state shared by the handlers, startup and shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from ..config import HubConfig
from ..console.access import ConsoleAccess
from ..index.live import FOLLOW_SECONDS
from ..node import Node
from ..sync.peering import Peering
from .batching import LookupBatcher, RequestBatches
from .limits import ADMISSION, Admission, Guard, RequestGuard, handler_args, limit_middlewares, rate_limiter
from .metrics import METRICS, HubMetrics, metrics_middleware
from .problems import MAX_BODY, problem_middleware
from .sending import SendDeadline, StreamSlots, send_deadline_middleware

T = TypeVar("T")
READER_THREADS = 32
WORKER_HEADER = "Hashfed-Worker"
LOAD_RETRY_SECONDS = (1.0, 60.0)
"""First and longest wait before loading the indexes again after a failure (doubling in between)."""
SNAPSHOT_RETRY_SECONDS = 60.0
"""How often index snapshots that could not be written (a full or read-only disk) are tried again."""
log = logging.getLogger("hashfed.hub")


@dataclass
class HubRuntime:
    """Everything a handler needs, created once per application."""

    node: Node
    config: HubConfig
    guard: Guard = field(default_factory=RequestGuard)
    """Refuses replayed signatures and, when configured, keys over their rate limit."""
    writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="hashfed-writer")
    )
    readers: ThreadPoolExecutor = field(
        # Many threads, few cores: most of them wait for SQLite; lookups take
        # one thread per batch (see .batching).
        default_factory=lambda: ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix="hashfed-reader"
        )
    )
    batcher: LookupBatcher | None = None
    lookups: RequestBatches[Any, bytes] | None = None
    """Small lookups queued for the next batch (set with the routes)."""
    large_lookups: RequestBatches[Any, bytes] | None = None
    """Large lookups, queued to run one at a time (set with the routes)."""
    streams: StreamSlots = field(init=False)
    """Slots for entries requests, apart from admission (see :mod:`.sending`)."""
    deadline: SendDeadline = field(init=False)
    """How long a client may take to read an answer."""
    ready: bool = False
    peering: Peering | None = None
    """Background mirroring of the peers named in hub.toml (None: no peers)."""
    metrics: HubMetrics | None = None
    started: float = field(default_factory=time.monotonic)
    """When the application was made (the console shows uptime)."""

    def __post_init__(self) -> None:
        self.streams = StreamSlots(self.config.max_streams, self.config.max_streams_per_key)
        self.deadline = SendDeadline(self.config.send_timeout_seconds, self.config.min_send_bytes_per_second)
        if self.batcher is None:
            self.batcher = LookupBatcher(
                self.node.lookup,
                max_matches_per_query=self.config.max_matches_per_query,
                max_matches_per_answer=self.config.max_matches_per_answer,
            )

    async def read(self, fn: Callable[[], T]) -> T:
        """Run store reads and index searches off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.readers, fn)

    async def write(self, fn: Callable[[], T]) -> T:
        """Run appends one at a time, in arrival order, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, fn)


RUNTIME = web.AppKey("runtime", HubRuntime)


def create_app(
    node: Node,
    config: HubConfig,
    console: ConsoleAccess | None = None,
    *,
    guard: Guard | None = None,
    pulls_peers: bool = True,
    worker: int | None = None,
) -> web.Application:
    """The hub's application; with ``console``, the operator's console under ``/console/`` too.

    Several workers of one hub (:mod:`.workers`) pass the ``guard`` they
    share, and only one of them ``pulls_peers``; each names itself in a
    ``Hashfed-Worker`` header on its answers, for operators and tests.
    """
    from .routes import add_routes

    if node.store.shared:  # replicas on PostgreSQL: any of them may append at any time
        node.indexes.external_poll = 0.0
    runtime = HubRuntime(node, config, guard=guard if guard is not None else default_guard(node, config))
    # Limits (docs/operations.md): answers sent under a deadline; bodies read
    # only once their headers pass, against a deadline; then admission and
    # rate-limit answers; problem_middleware renders whatever they refuse.
    admission = Admission(config.max_inflight, config.max_queued, config.queue_timeout_seconds)
    app = web.Application(
        middlewares=[
            metrics_middleware,
            send_deadline_middleware(runtime.deadline),
            problem_middleware,
            *limit_middlewares(config, admission, _authenticate_headers),
        ],
        client_max_size=config.max_body_bytes,
        handler_args=handler_args(config),
    )
    app[ADMISSION] = admission
    if config.peers and pulls_peers:  # member keys are read now: a bad peer configuration stops the start
        runtime.peering = Peering(node, config.peers)
    app[RUNTIME] = runtime
    app[MAX_BODY] = config.max_body_bytes
    metrics = app[METRICS] = HubMetrics(
        node, lambda: runtime.peering.status() if runtime.peering is not None else [], config.metrics_allow
    )
    runtime.metrics = metrics
    node.indexes.on_merge = metrics.merged
    if console is not None:
        from ..console.web import add_console

        add_console(app, console, config.console_allow)
    add_routes(app)
    if worker is not None:
        name = str(worker)

        async def name_worker(request: web.Request, response: web.StreamResponse) -> None:
            response.headers[WORKER_HEADER] = name

        app.on_response_prepare.append(name_worker)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(runtime))
        following = threading.Event()
        if node.store.shared:
            from ..store.postgres import PostgresStore
            from .replicas import follow_replicas

            assert isinstance(node.store, PostgresStore)
            follower = follow_replicas(node, node.store, following)
        retrier = asyncio.create_task(_retry_snapshots(runtime))
        # Workers over one SQLite file learn of each other's appends only by looking;
        # replicas on PostgreSQL are told (follow_replicas).
        tracker = (
            asyncio.create_task(_follow_log(runtime))
            if worker is not None and not node.store.shared
            else None
        )
        if runtime.peering is not None:
            await runtime.peering.start()
        yield
        loader.cancel()
        retrier.cancel()
        if tracker is not None:
            tracker.cancel()
        following.set()
        if node.store.shared:
            await asyncio.get_running_loop().run_in_executor(None, follower.join)
        if runtime.peering is not None:
            await runtime.peering.stop()
        if runtime.ready:  # failures are logged: a snapshot is an optimisation, never a reason to fail
            await runtime.read(node.indexes.retry_snapshots)
        node.indexes.close()
        runtime.writer.shutdown(wait=True)
        runtime.readers.shutdown(wait=True)
        node.store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def default_guard(node: Node, config: HubConfig) -> Guard:
    """This process's own replay memory and rate limits, or, for replicas on PostgreSQL, the database's."""
    if node.store.shared:
        from ..store.postgres import PostgresStore
        from .replicas import DatabaseRequestGuard

        assert isinstance(node.store, PostgresStore)
        return DatabaseRequestGuard(node.store, config.rate_limit_per_second, config.burst)
    return RequestGuard(rate_limiter(config))


async def _authenticate_headers(request: web.Request) -> None:
    """Authenticate a request whose body is still arriving, before a byte of it is buffered.

    An outsider's body is then never read: a bad, unknown, stale or replayed
    signature is refused on the headers alone, and the body's digest is
    checked against the signed Content-Digest once it has arrived.
    """
    from .auth import CALLER, SignedRequest, authenticate

    runtime = request.app[RUNTIME]
    signed = SignedRequest.of(request)
    request[CALLER] = await runtime.read(
        lambda: authenticate(runtime.node, runtime.guard, signed, None, has_body=True)
    )


async def _load(runtime: HubRuntime) -> None:
    """Load the indexes, trying again with growing pauses until it works; then the hub is ready."""
    pause, longest = LOAD_RETRY_SECONDS
    while True:
        try:
            await runtime.read(runtime.node.load)
            break
        except Exception:
            log.exception(
                "loading the indexes failed; not ready (GET /v1/ready answers 503); trying again in %.0f s",
                pause,
            )
        await asyncio.sleep(pause)
        pause = min(pause * 2, longest)
    runtime.ready = True
    log.info("indexes loaded for %d collection(s); ready", len(runtime.node.collections()))


async def _follow_log(runtime: HubRuntime) -> None:
    """Keep this worker's indexes up with what the other workers append, requests or not."""
    while True:
        await asyncio.sleep(FOLLOW_SECONDS)
        if not runtime.ready:
            continue
        try:
            await runtime.read(runtime.node.indexes.follow)
        except Exception:
            log.exception("could not catch the indexes up with the log; the next lookup will retry")


async def _retry_snapshots(runtime: HubRuntime) -> None:
    while True:
        await asyncio.sleep(SNAPSHOT_RETRY_SECONDS)
        await runtime.read(runtime.node.indexes.retry_snapshots)
