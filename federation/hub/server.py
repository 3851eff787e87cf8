"""Opening a data directory as a node, and serving it."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import sys

from aiohttp import web

from ..config import ConfigError, DataDir, HubConfig
from ..console.access import ConsoleAccess
from ..dirlock import DirectoryLock
from ..node import Node
from ..store.base import StoreError
from ..store.opening import open_store
from ..store.storage_faults import free_bytes, is_read_only
from ..tls import server_context
from .app import RUNTIME, HubRuntime, create_app
from .limits import ConnectionLimiter, LimitedTCPSite
from .logs import RequestLogger, configure_logging

SWITCH_INTERVAL = 0.0005


def open_node(data: DataDir, *, searchable: bool = True) -> Node:
    """A node on a hub data directory; ``searchable=False`` for writers that never look up."""
    config = data.config()
    signer = data.signer()
    try:
        store = open_store(
            config.database,
            data.path,
            min_free_bytes=config.min_free_bytes,
            pool_size=config.database_pool_size,
        )
        owner = store.owner()
    except StoreError as exc:
        raise ConfigError(str(exc)) from exc
    if owner is not None and owner != config.name:
        store.close()
        raise ConfigError(
            f"the database hub.toml names holds hub {owner}'s log, not {config.name}'s: "
            "fix `database` in hub.toml; nothing was changed"
        )
    return Node(
        store,
        name=config.name,
        federation=config.federation,
        hub_key=signer.verifier,
        signer=signer,
        retired=data.retired_signers(),
        limits=config.limits,
        index_dir=data.index_dir,
        signed_dir=data.signed_dir,
        searchable=searchable,
    )


def serve(
    data: DataDir,
    host: str | None = None,
    port: int | None = None,
    log_format: str = "text",
    workers: int = 1,
) -> None:
    """Serve a data directory until SIGINT or SIGTERM; refuse at once, in one line, what cannot work.

    With several ``workers``, a supervisor runs that many processes on the port (:mod:`.workers`).
    """
    if workers > 1:
        from .workers import serve_workers

        serve_workers(data, host, port, workers, log_format)
        return
    config = data.config()
    check_storage_for_serving(data, config)
    lock = DirectoryLock(data.path)
    lock.acquire()
    node = open_node(data)
    node.check_signed_history()
    # Hand the GIL between the event loop and the worker threads every 0.5 ms
    # rather than every 5 ms: with lookups in worker threads, the default
    # interval adds milliseconds of queueing to every request under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    configure_logging(log_format)
    tls = tls_context(data, config)  # a bad certificate stops the start before anything runs
    app = create_app(node, config, ConsoleAccess(data.console_tokens_file))
    try:
        asyncio.run(
            _serve_until_signalled(
                app, config, host or config.host, port if port is not None else config.port, tls
            )
        )
    finally:
        lock.release()


def check_storage_for_serving(data: DataDir, config: HubConfig) -> None:
    """A hub must be able to write its log: refuse a read-only or full data directory up front."""
    if is_read_only(data.path) or not os.access(data.path, os.W_OK):
        raise ConfigError(
            f"{data.path} is read-only; the hub writes its log there: remount it read-write "
            "(or serve a copy of it); nothing was changed"
        )
    free = free_bytes(data.path)
    if free < config.min_free_bytes:
        raise ConfigError(
            f"the disk holding {data.path} has {free:,} bytes free, below the hub's reserve of "
            f"{config.min_free_bytes:,} (min_free_bytes in hub.toml): free space, or lower the reserve"
        )


def tls_context(data: DataDir, config: HubConfig) -> ssl.SSLContext | None:
    """The hub's TLS context from hub.toml (paths relative to the data directory); None for plain HTTP."""
    if not config.tls_cert:
        return None
    client_ca = data.path / config.tls_client_ca if config.tls_client_ca else None
    return server_context(data.path / config.tls_cert, data.path / config.tls_key, client_ca)


async def start_server(
    app: web.Application,
    config: HubConfig,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    *,
    reuse_port: bool = False,
) -> tuple[web.AppRunner, LimitedTCPSite]:
    """Serve ``app`` on ``host:port`` (0: any free port) with the configured connection limit.

    aiohttp's own ``run_app`` cannot limit connections; this is what it does
    otherwise, with a site that counts them (:class:`LimitedTCPSite`). Stop
    with ``runner.cleanup()``.
    """
    runner = web.AppRunner(app, access_log_class=RequestLogger)
    await runner.setup()
    site = LimitedTCPSite(
        runner,
        host,
        port,
        ConnectionLimiter(config.max_connections),
        ssl_context=ssl_context,
        reuse_port=reuse_port,
    )
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


async def _serve_until_signalled(
    app: web.Application,
    config: HubConfig,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    *,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGINT or SIGTERM, then finish requests in progress and close everything."""
    log = logging.getLogger("hashfed.hub")
    runner, site = await start_server(app, config, host, port, tls, reuse_port=reuse_port)
    log.info("serving on %s (at most %d connections)", site.name, config.max_connections)
    if tls is None:
        log.warning(
            "serving plain HTTP: fine on loopback or behind a TLS-terminating proxy; "
            "set tls_cert and tls_key in hub.toml to serve HTTPS to the open internet"
        )
    elif config.tls_client_ca:
        log.info("callers must show a client certificate issued by %s (mutual TLS)", config.tls_client_ca)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    freezing = asyncio.create_task(_freeze_heap_when_ready(app[RUNTIME]))
    try:
        await stop.wait()
    finally:
        freezing.cancel()
        log.info("stopping: finishing requests in progress")
        await runner.cleanup()


async def _freeze_heap_when_ready(runtime: HubRuntime) -> None:
    """Once the indexes are loaded, leave everything made so far out of the garbage collector's scans.

    What a serving process holds after start-up lives until it exits, yet
    every full collection walked all of it again: 18-34 ms at a time for the
    67,000 objects of a loaded hub, measured with ``gc.collect()``, a pause
    every request in flight waited through. ``gc.freeze`` moves them to a
    generation that is never scanned; only what serving makes is collected.
    Done in the serving process only: a process that makes many hubs (the
    tests) would keep each one's garbage forever.
    """
    while not runtime.ready:
        await asyncio.sleep(0.1)
    gc.collect()
    gc.freeze()
