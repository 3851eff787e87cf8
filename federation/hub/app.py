"""The aiohttp application: state shared by the handlers, startup and shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from aiohttp import web

from ..config import HubConfig
from ..node import Node
from ..sync.peering import Peering
from .batching import LookupBatcher
from .limits import ADMISSION, Admission, RequestGuard, handler_args, limit_middlewares, rate_limiter
from .problems import MAX_BODY, problem_middleware

T = TypeVar("T")
READER_THREADS = 32
log = logging.getLogger("hashfed.hub")


@dataclass
class HubRuntime:
    """Everything a handler needs, created once per application."""

    node: Node
    config: HubConfig
    guard: RequestGuard = field(default_factory=RequestGuard)
    """Refuses replayed signatures and, when configured, keys over their rate limit."""
    writer: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="hashfed-writer")
    )
    readers: ThreadPoolExecutor = field(
        # Many threads, few cores: most of them wait, either for SQLite or in the
        # lookup batcher for a search that answers several requests at once.
        default_factory=lambda: ThreadPoolExecutor(
            max_workers=READER_THREADS, thread_name_prefix="hashfed-reader"
        )
    )
    batcher: LookupBatcher | None = None
    ready: bool = False
    peering: Peering | None = None
    """Background mirroring of the peers named in hub.toml (None: no peers)."""

    def __post_init__(self) -> None:
        if self.batcher is None:
            self.batcher = LookupBatcher(self.node.lookup)

    async def read(self, fn: Callable[[], T]) -> T:
        """Run store reads and index searches off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.readers, fn)

    async def write(self, fn: Callable[[], T]) -> T:
        """Run appends one at a time, in arrival order, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.writer, fn)


RUNTIME = web.AppKey("runtime", HubRuntime)


def create_app(node: Node, config: HubConfig) -> web.Application:
    from .routes import add_routes

    # Limits (docs/operations.md): bodies read against a deadline, then admission,
    # then rate-limit answers; problem_middleware renders whatever they refuse.
    admission = Admission(config.max_inflight, config.max_queued, config.queue_timeout_seconds)
    app = web.Application(
        middlewares=[problem_middleware, *limit_middlewares(config, admission)],
        client_max_size=config.max_body_bytes,
        handler_args=handler_args(config),
    )
    app[ADMISSION] = admission
    runtime = HubRuntime(node, config, guard=RequestGuard(rate_limiter(config)))
    if config.peers:  # member keys are read now: a bad peer configuration stops the start
        runtime.peering = Peering(node, config.peers)
    app[RUNTIME] = runtime
    app[MAX_BODY] = config.max_body_bytes
    add_routes(app)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loader = asyncio.create_task(_load(runtime))
        if runtime.peering is not None:
            await runtime.peering.start()
        yield
        loader.cancel()
        if runtime.peering is not None:
            await runtime.peering.stop()
        if runtime.ready:
            await runtime.read(node.indexes.snapshot_all)
        runtime.writer.shutdown(wait=True)
        runtime.readers.shutdown(wait=True)
        node.store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


async def _load(runtime: HubRuntime) -> None:
    try:
        await runtime.read(runtime.node.load)
    except Exception:
        log.exception("loading the indexes failed; the hub stays not ready (GET /v1/ready answers 503)")
        return
    runtime.ready = True
    log.info("indexes loaded for %d collection(s); ready", len(runtime.node.collections()))
