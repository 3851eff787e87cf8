"""Opening a data directory as a node, and serving it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from ..config import DataDir, HubConfig
from ..node import Node
from ..store.sqlite import SqliteStore
from .app import create_app
from .limits import ConnectionLimiter, LimitedTCPSite

SWITCH_INTERVAL = 0.0005


def open_node(data: DataDir, *, searchable: bool = True) -> Node:
    """A node on a hub data directory; ``searchable=False`` for writers that never look up."""
    config = data.config()
    signer = data.signer()
    return Node(
        SqliteStore(data.database),
        name=config.name,
        federation=config.federation,
        hub_key=signer.verifier,
        signer=signer,
        limits=config.limits,
        index_dir=data.index_dir,
        searchable=searchable,
    )


def serve(data: DataDir, host: str | None = None, port: int | None = None) -> None:
    config = data.config()
    node = open_node(data)
    # Hand the GIL between the event loop and the worker threads every 0.5 ms
    # rather than every 5 ms: with lookups in worker threads, the default
    # interval adds milliseconds of queueing to every request under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(node, config)
    asyncio.run(
        _serve_until_signalled(app, config, host or config.host, port if port is not None else config.port)
    )


async def start_server(
    app: web.Application, config: HubConfig, host: str, port: int
) -> tuple[web.AppRunner, LimitedTCPSite]:
    """Serve ``app`` on ``host:port`` (0: any free port) with the configured connection limit.

    aiohttp's own ``run_app`` cannot limit connections; this is what it does
    otherwise, with a site that counts them (:class:`LimitedTCPSite`). Stop
    with ``runner.cleanup()``.
    """
    runner = web.AppRunner(app)
    await runner.setup()
    site = LimitedTCPSite(runner, host, port, ConnectionLimiter(config.max_connections))
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def _serve_until_signalled(app: web.Application, config: HubConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then finish requests in progress and close everything."""
    log = logging.getLogger("hashfed.hub")
    runner, site = await start_server(app, config, host, port)
    log.info("serving on %s (at most %d connections)", site.name, config.max_connections)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("stopping: finishing requests in progress")
        await runner.cleanup()
