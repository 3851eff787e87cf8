"""Prometheus metrics at ``GET /metrics``, through prometheus-client.

Each application has its own registry (no process-global state): counters
and histograms for what happens (requests, refusals, lookups, merges), and a
collector that reads what *is* at scrape time (log sizes, listed hashes,
index segments, peers) from the node. Label values are bounded: routes are
route patterns, never raw paths; collections, signal types, problem kinds
and sources are finite sets the operator controls. No hash or label of a
member ever appears.

Who may scrape is ``metrics_allow`` in hub.toml: networks, loopback only by
default. Behind a reverse proxy every caller is the proxy: restrict
``/metrics`` there too.
"""

from __future__ import annotations

import collections
import ipaddress
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from ..config import parse_networks
from ..node import Node
from ..signals import SIGNAL_TYPES
from .problems import PROBLEM_CONTENT_TYPE, PROBLEM_TYPE_PREFIX, Problem

NAMESPACE = "hashfed"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MERGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
UNMATCHED_ROUTE = "unmatched"
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""Set by a supervisor of several workers: prometheus-client's multiprocess mode (see HubMetrics)."""
RECENT_SECONDS = 3600.0
RECENT_LIMIT = 100_000
"""Refusals remembered for the console's last-hour view, at most (a flood keeps the newest)."""


class HubMetrics:
    """The hub's metrics and their registry; one per application.

    With several worker processes serving one hub, the supervisor sets
    ``PROMETHEUS_MULTIPROC_DIR`` before they start: prometheus-client then
    keeps each worker's counters and histograms in files there, and a scrape
    answered by any worker merges them (its multiprocess mode). The state
    gauges are read from the shared store by whichever worker answers.
    """

    def __init__(self, node: Node, peer_states: Callable[[], list[dict[str, Any]]], allow: str) -> None:
        self.registry = CollectorRegistry()
        self.allowed = parse_networks(allow)
        self._multiprocess_dir = os.environ.get(MULTIPROCESS_ENV)
        if self._multiprocess_dir is None:  # per-process figures mean nothing summed over workers
            ProcessCollector(namespace="", registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._state = _StateCollector(node, peer_states)
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route pattern, method and status.",
            ["route", "method", "status"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "http_request_duration_seconds",
            "Time from a request's arrival to its answer, by route pattern.",
            ["route"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.refusals = Counter(
            "refusals",
            "Requests refused, by RFC 9457 problem kind.",
            ["kind"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.lookup_queries = Counter(
            "lookup_queries",
            "Lookup queries answered, by signal type.",
            ["signal"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.lookup_matches = Counter(
            "lookup_matches",
            "Matches returned by lookups, by signal type.",
            ["signal"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.merges = Counter(
            "index_merges",
            "Large index segment merges finished.",
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.merge_seconds = Histogram(
            "index_merge_duration_seconds",
            "Time one merge of a large index segment took.",
            namespace=NAMESPACE,
            buckets=MERGE_BUCKETS,
            registry=self.registry,
        )
        for signal in SIGNAL_TYPES:  # every type shows up at 0 before its first lookup
            self.lookup_queries.labels(signal)
            self.lookup_matches.labels(signal)
        if self._multiprocess_dir is None:
            self.registry.register(self._state)
        self._recent: collections.deque[tuple[float, str]] = collections.deque(maxlen=RECENT_LIMIT)

    def refused(self, kind: str) -> None:
        self.refusals.labels(kind).inc()
        now = time.monotonic()
        self._recent.append((now, kind))
        while self._recent and self._recent[0][0] < now - RECENT_SECONDS:
            self._recent.popleft()

    def refusals_last_hour(self) -> dict[str, int]:
        """Refusals by kind over the last hour (the console's refusals page)."""
        cutoff = time.monotonic() - RECENT_SECONDS
        counts: dict[str, int] = {}
        for when, kind in self._recent:
            if when >= cutoff:
                counts[kind] = counts.get(kind, 0) + 1
        return counts

    def merged(self, seconds: float) -> None:
        self.merges.inc()
        self.merge_seconds.observe(seconds)

    def looked_up(self, counts: Iterable[tuple[str, int]]) -> None:
        """One (signal type, matches) pair per query answered."""
        for signal, matches in counts:
            self.lookup_queries.labels(signal).inc()
            if matches:
                self.lookup_matches.labels(signal).inc(matches)

    def may_scrape(self, remote: str | None) -> bool:
        try:
            address = ipaddress.ip_address(remote or "")
        except ValueError:
            return False
        return any(address in network for network in self.allowed)

    def exposition(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        merged = CollectorRegistry()
        MultiProcessCollector(merged, self._multiprocess_dir)  # type: ignore[no-untyped-call]
        merged.register(self._state)
        return generate_latest(merged)


class _StateCollector(Collector):
    """Gauges read from the node and the peering state at each scrape (they are facts, not events)."""

    def __init__(self, node: Node, peer_states: Callable[[], list[dict[str, Any]]]) -> None:
        self.node = node
        self.peer_states = peer_states

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        entries = GaugeMetricFamily(
            f"{NAMESPACE}_log_entries", "Entries in a collection's log.", labels=["collection"]
        )
        listed = GaugeMetricFamily(
            f"{NAMESPACE}_listed_hashes",
            "Hashes listed in a collection, by signal type (as the index holds them).",
            labels=["collection", "signal"],
        )
        segments = GaugeMetricFamily(
            f"{NAMESPACE}_index_segment_hashes",
            "Live hashes in each index segment (large: immutable, fresh: recent additions).",
            labels=["collection", "signal", "segment"],
        )
        for collection in self.node.collections():
            entries.add_metric([collection], self.node.store.log_size(collection))
            for signal, count in self.node.indexes.size(collection).items():
                listed.add_metric([collection, signal], count)
            for signal, parts in self.node.indexes.segments(collection).items():
                for segment, count in parts.items():
                    segments.add_metric([collection, signal, segment], count)
        yield entries
        yield listed
        yield segments
        yield from self._peers()

    def _peers(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        lag = GaugeMetricFamily(
            f"{NAMESPACE}_peer_lag_entries",
            "Entries a mirrored collection is behind its source's newest checkpoint.",
            labels=["source"],
        )
        verified = GaugeMetricFamily(
            f"{NAMESPACE}_peer_last_verified_timestamp_seconds",
            "When a mirrored collection last verified a checkpoint of its source (Unix time).",
            labels=["source"],
        )
        forks = CounterMetricFamily(
            f"{NAMESPACE}_forks_detected",
            "Fork evidence recorded against a mirrored collection's source.",
            labels=["source"],
        )
        for peer in self.peer_states():
            for state in peer.get("sources", []):
                name = str(state["name"])
                if state.get("lag") is not None:
                    lag.add_metric([name], float(state["lag"]))
                if state.get("last_sync"):
                    stamp = datetime.fromisoformat(str(state["last_sync"]).replace("Z", "+00:00"))
                    verified.add_metric([name], stamp.timestamp())
        for source in self.node.store.sources():
            forks.add_metric([source.name], len(self.node.store.evidence(source.name)))
        yield lag
        yield verified
        yield forks


METRICS = web.AppKey("metrics", HubMetrics)
PROBLEM_KIND = web.RequestKey("problem_kind", str)
"""The problem kind of a refused request, for its log line (absent when it was not refused)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def route_of(request: web.Request) -> str:
    """The route pattern that matched (``/v1/collections/{collection}/entries``), never the raw path."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    return resource.canonical if resource is not None else UNMATCHED_ROUTE


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count every request by route, method and status, and time it (outermost, so it sees problems)."""
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        kind = problem_kind(response)
        if kind is not None:
            request[PROBLEM_KIND] = kind
            request.app[METRICS].refused(kind)
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        metrics = request.app[METRICS]
        route = route_of(request)
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def problem_kind(response: web.StreamResponse) -> str | None:
    """The problem kind of a refusal (every refusal is an RFC 9457 problem with a short body)."""
    if response.status < 400 or response.content_type != PROBLEM_CONTENT_TYPE:
        return None
    body = response.body if isinstance(response, web.Response) else None
    if not isinstance(body, bytes):
        return None
    try:
        problem_type = json.loads(body).get("type", "")
    except (ValueError, AttributeError):
        return None
    if not isinstance(problem_type, str) or not problem_type.startswith(PROBLEM_TYPE_PREFIX):
        return None
    return problem_type.removeprefix(PROBLEM_TYPE_PREFIX)


async def metrics_endpoint(request: web.Request) -> web.Response:
    metrics = request.app[METRICS]
    if not metrics.may_scrape(request.remote):
        raise Problem(
            403,
            "metrics-not-allowed",
            f"{request.remote} may not read /metrics; the hub's operator allows networks in hub.toml "
            "(metrics_allow)",
        )
    body = metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
