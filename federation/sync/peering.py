"""Hub peering: mirror the collections of the peers named in hub.toml, in the background.

Each peer gets one asyncio task that runs a :class:`Puller` per collection,
then sleeps (``interval`` while in step; after failures the delay doubles,
up to 32 times ``interval`` and at most :data:`MAX_BACKOFF`). All
verification and applying runs in one dedicated worker thread, never on the
event loop and never in the hub's reader pool, and every request to a peer
has a deadline: a peer that is down, slow or answers garbage costs lookups
nothing, and its next round starts again from the local log's size.

After each round the hub also fetches the peer's ``GET /v1/sources`` and
compares every checkpoint the peer says it verified with its own copy of
that log (:meth:`Puller.compare`): a hub that shows different peers
different histories is caught where two of them meet.

:meth:`Peering.status` is what ``GET /v1/peers`` answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..client import HubClient, HubError
from ..config import ConfigError, PeerConfig
from ..envelope import utc_now
from ..keys import load_signer_file, parse_key_chain
from ..node import Node
from ..tls import ClientTls
from .puller import ByteCounter, Puller, SourceSpec, SyncProgress, new_session
from .verify import ForkDetected
from .wire import checkpoint_summary

T = TypeVar("T")
log = logging.getLogger("hashfed.sync")

MAX_BACKOFF = 300.0
BACKOFF_DOUBLINGS = 5
"""After failures the delay doubles, up to 32 times the interval and at most MAX_BACKOFF seconds."""


@dataclass
class SourceState:
    """What ``GET /v1/peers`` shows for one mirrored collection."""

    spec: SourceSpec
    state: str = "starting"
    """starting, syncing (applying entries), ok, error, or forked (stopped by fork evidence)."""
    checkpoint: dict[str, Any] | None = None
    log_size: int = 0
    source_size: int | None = None
    last_sync: str | None = None
    last_error: str | None = None
    last_error_at: str | None = None
    next_attempt: str | None = None

    def progress(self, progress: SyncProgress) -> None:
        """Called after each span is applied: the state shows a catch-up as it happens."""
        self.state = "syncing"
        self.log_size = progress.size
        self.source_size = max(self.source_size or 0, progress.goal)

    def to_json(self) -> dict[str, Any]:
        origin = self.spec.origin
        lag = None if self.source_size is None else max(self.source_size - self.log_size, 0)
        return {
            "name": self.spec.name,
            "hub": origin.hub,
            "collection": origin.collection,
            "remote": self.spec.remote,
            "state": self.state,
            "checkpoint": self.checkpoint,
            "log_size": self.log_size,
            "source_size": self.source_size,
            "lag": lag,
            "last_sync": self.last_sync,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "next_attempt": self.next_attempt,
        }


@dataclass
class _Peer:
    config: PeerConfig
    client: HubClient
    counter: ByteCounter
    pullers: list[Puller]
    states: list[SourceState]
    failures: int = 0
    task: asyncio.Task[None] | None = field(default=None, repr=False)


def _describe(exc: BaseException) -> str:
    """A summary for the public ``/v1/peers``: no entry details, which the hub's log keeps.

    A refused span's message can quote member key ids or hashes of the peer's
    log; anyone may read ``/v1/peers``, so it names only the kind of failure.
    """
    if isinstance(exc, HubError):
        if exc.status == 0:
            timed_out = "timeout" in exc.detail.lower()
            return (
                "the peer did not answer in time (timeout)" if timed_out else "the peer could not be reached"
            )
        reason = exc.kind.rsplit(":", 1)[-1] if exc.kind else "no problem type"
        return f"the peer answered {exc.status} ({reason})"
    return f"{type(exc).__name__} (details in the hub's log)"


class Peering:
    """The peers of one hub: their pullers, background tasks and state."""

    def __init__(self, node: Node, peers: Sequence[PeerConfig]) -> None:
        self.node = node
        self.configs = tuple(peers)
        self._peers: list[_Peer] = []
        self._executor: ThreadPoolExecutor | None = None
        for config in self.configs:
            try:
                load_signer_file(Path(config.member_key))
            except OSError as exc:
                raise ConfigError(
                    f"peer {config.url}: cannot read member_key {config.member_key}: {exc.strerror or exc}"
                ) from exc
            for collection in config.collections:
                if parse_key_chain(config.origin_key(collection))[0].key_id in {
                    key.key_id for key in node.keys.verifiers()
                }:
                    raise ConfigError(f"peer {config.url}: {collection} is this hub's own log")

    async def _run(self, fn: Callable[[], T]) -> T:
        assert self._executor is not None
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def start(self) -> None:
        """Open a session per peer and start following them (call on the hub's event loop)."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hashfed-sync")
        for config in self.configs:
            counter = ByteCounter()
            session = new_session(
                config.timeout, counter, tls=ClientTls(config.ca or None, config.client_cert or None)
            )
            client = HubClient(
                config.url, load_signer_file(Path(config.member_key)), session=session, retries=0
            )
            pullers, states = [], []
            for collection in config.collections:
                spec = SourceSpec.make(config.url, parse_key_chain(config.origin_key(collection)), collection)
                state = SourceState(spec)
                pullers.append(
                    Puller(self.node, spec, client, self._run, counter=counter, on_progress=state.progress)
                )
                states.append(state)
            peer = _Peer(config, client, counter, pullers, states)
            peer.task = asyncio.create_task(self._follow(peer, session.close))
            self._peers.append(peer)

    async def stop(self) -> None:
        """Cancel the tasks and wait for any span being applied to finish or roll back."""
        tasks = [peer.task for peer in self._peers if peer.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "url": peer.config.url,
                "hub": parse_key_chain(peer.config.key)[0].name,
                "key": peer.config.key,
                "bytes_received": peer.counter.total,
                "sources": [state.to_json() for state in peer.states],
            }
            for peer in self._peers
        ]

    def _puller(self, name: str) -> Puller | None:
        for peer in self._peers:
            for puller in peer.pullers:
                if puller.spec.name == name:
                    return puller
        return None

    # ---- one peer's task ----------------------------------------------------

    async def _follow(self, peer: _Peer, close: Callable[[], Any]) -> None:
        try:
            while True:
                healthy = True
                for puller, state in zip(peer.pullers, peer.states, strict=True):
                    healthy = await self._round(puller, state) and healthy
                if healthy:
                    await self._gossip(peer)
                peer.failures = 0 if healthy else peer.failures + 1
                delay = max(
                    min(peer.config.interval * 2 ** min(peer.failures, BACKOFF_DOUBLINGS), MAX_BACKOFF),
                    peer.config.interval,
                )
                next_attempt = utc_now_plus(delay)
                for state in peer.states:
                    state.next_attempt = next_attempt
                await asyncio.sleep(delay)
        finally:
            with contextlib.suppress(Exception):
                await close()

    async def _round(self, puller: Puller, state: SourceState) -> bool:
        """One sync of one collection; False if it failed (the peer's next round backs off)."""
        ok = True
        try:
            result = await puller.sync()
        except asyncio.CancelledError:
            raise
        except ForkDetected as exc:
            if state.state != "forked":
                log.error("peer %s: %s stopped: %s", puller.spec.url, puller.spec.name, exc)
            state.state = "forked"
            state.last_error, state.last_error_at = str(exc)[:1000], utc_now()
        except Exception as exc:
            ok = False
            state.state = "error"
            state.last_error, state.last_error_at = _describe(exc), utc_now()
            log.warning("peer %s: syncing %s failed: %s", puller.spec.url, puller.spec.name, exc)
        else:
            state.state = "ok"
            state.last_sync = utc_now()
            if result.after != result.before:
                log.info(
                    "peer %s: %s verified and applied entries %d to %d",
                    puller.spec.url,
                    puller.spec.name,
                    result.before,
                    result.after - 1,
                    extra={
                        "event": "peer-sync",
                        "source": puller.spec.name,
                        "entries": result.after - result.before,
                        "log_size": result.after,
                        "checkpoint_size": result.checkpoint,
                    },
                )
        state.source_size = puller.source_size
        with contextlib.suppress(Exception):
            record, size = await self._run(lambda: self._local(puller.spec.name))
            state.log_size = size
            state.checkpoint = checkpoint_summary(record)
        return ok

    def _local(self, name: str) -> tuple[str | None, int]:
        record = self.node.store.source(name)
        if record is None:
            return None, 0
        return record.checkpoint, self.node.store.log_size(name)

    async def _gossip(self, peer: _Peer) -> None:
        """Compare the checkpoints the peer verified with ours, for every log both hold."""
        try:
            reported = await peer.client.sources()
        except Exception as exc:  # an older hub, or garbage: gossip is best effort
            log.debug("peer %s: no sources to compare: %s", peer.config.url, _describe(exc))
            return
        for item in reported:
            with contextlib.suppress(Exception):
                name, note = f"{item['hub']}:{item['collection']}", item["checkpoint"]
                puller = self._puller(str(name))
                if puller is None or not isinstance(note, str):
                    continue
                try:
                    await puller.compare(note)
                except ForkDetected as exc:
                    for state in (s for p in self._peers for s in p.states if s.spec.name == name):
                        state.state = "forked"
                        state.last_error, state.last_error_at = str(exc)[:1000], utc_now()


def utc_now_plus(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
