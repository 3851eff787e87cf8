"""Opening a data directory as a node, and serving it."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from ..config import DataDir
from ..node import Node
from ..store.sqlite import SqliteStore
from .app import create_app

SWITCH_INTERVAL = 0.0005


def open_node(data: DataDir) -> Node:
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
    )


def serve(data: DataDir, host: str | None = None, port: int | None = None) -> None:
    config = data.config()
    node = open_node(data)
    # Hand the GIL between the event loop and the worker threads every 0.5 ms
    # rather than every 5 ms: with lookups in worker threads, the default
    # interval adds milliseconds of queueing to every request under load.
    sys.setswitchinterval(SWITCH_INTERVAL)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    web.run_app(
        create_app(node, config),
        host=host or config.host,
        port=port if port is not None else config.port,
        print=lambda text: logging.getLogger("hashfed.hub").info(text.strip()),
    )
