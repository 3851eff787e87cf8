"""``GET /metrics``: Prometheus exposition of what the hub does and holds, read by a real parser."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from federation.client import HubClient
from federation.hub import create_app, open_node
from federation.index.segmented import DEFAULT_FRESH_LIMIT
from tests.conftest import Federation
from tests.faults import REPO, child_env
from tests.helpers import Hub, assert_problem, batch_doc, envelope, flip, item, open_hub, pdq

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(hub: Hub) -> tuple[str, Samples]:
    reply = await hub.call("GET", "/metrics")
    assert reply.status == 200, reply.text
    assert reply.content_type == "text/plain"
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return reply.text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def hub(
    federation: Federation, hub_server: TestServer, clients: dict[str, HubClient]
) -> AsyncIterator[Hub]:
    async with aiohttp.ClientSession() as session:
        yield await open_hub(federation, hub_server, clients, session)


async def test_metrics_count_requests_refusals_lookups_and_state(hub: Hub) -> None:
    listed = [pdq(seed) for seed in range(20)]
    await hub.submit("acme", batch_doc("acme", [item("pdq", h) for h in listed[:12]]))
    await hub.submit(
        "beta", batch_doc("beta", [item("pdq", h) for h in listed[12:]] + [item("md5", "0" * 32)])
    )
    stale = await hub.post(envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(99))], seq=1)))
    assert_problem(stale, 409, "stale-seq")
    answers = await hub.matches([("pdq", flip(listed[0], 3)), ("pdq", pdq(500)), ("md5", "0" * 32)])
    assert [len(a) for a in answers] == [1, 0, 1]

    text, samples = await scrape(hub)
    entries_route = "/v1/collections/{collection}/entries"
    assert (
        value(samples, "hashfed_http_requests_total", route=entries_route, method="POST", status="201") == 2
    )
    assert (
        value(samples, "hashfed_http_requests_total", route=entries_route, method="POST", status="409") == 1
    )
    routes = {
        dict(labels).get("route") for (name, labels) in samples if name == "hashfed_http_requests_total"
    }
    assert "/v1/collections/main/entries" not in routes and "/v1/lookup" in routes
    assert value(samples, "hashfed_http_request_duration_seconds_count", route="/v1/lookup") >= 1
    assert value(samples, "hashfed_refusals_total", kind="stale-seq") == 1

    size = await hub.size()
    assert value(samples, "hashfed_log_entries", collection="main") == size
    assert value(samples, "hashfed_listed_hashes", collection="main", signal="pdq") == 20
    assert value(samples, "hashfed_listed_hashes", collection="main", signal="md5") == 1
    segments = [
        value(samples, "hashfed_index_segment_hashes", collection="main", signal="pdq", segment=part)
        for part in ("large", "fresh")
    ]
    assert sum(segments) == 20
    assert value(samples, "hashfed_lookup_queries_total", signal="pdq") == 2
    assert value(samples, "hashfed_lookup_queries_total", signal="md5") == 1
    assert value(samples, "hashfed_lookup_matches_total", signal="pdq") == 1
    assert ("hashfed_lookup_queries_total", (("signal", "photodna"),)) in samples  # every type, from 0
    assert value(samples, "process_cpu_seconds_total") > 0
    assert all(h not in text for h in [*listed, "0" * 32])  # never a member's hash
    assert "acme" not in text  # nor who submitted


async def test_a_merge_is_counted_timed_and_logged(hub: Hub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hashfed.index")
    many = [item("pdq", pdq(seed)) for seed in range(DEFAULT_FRESH_LIMIT + 10)]
    await hub.submit("acme", batch_doc("acme", many))
    for _ in range(600):
        _, samples = await scrape(hub)
        if value(samples, "hashfed_index_merges_total") >= 1:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "hashfed_index_merges_total") == 1
    assert value(samples, "hashfed_index_merge_duration_seconds_count") == 1
    assert value(samples, "hashfed_index_merge_duration_seconds_sum") > 0
    (merge,) = [record for record in caplog.records if getattr(record, "event", None) == "index-merge"]
    assert merge.__dict__["collection"] == "main" and merge.__dict__["seconds"] >= 0


async def test_only_allowed_networks_may_scrape(federation: Federation) -> None:
    config = dataclasses.replace(federation.data.config(), metrics_allow="10.0.0.0/8")
    server = TestServer(create_app(open_node(federation.data), config), host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session, session.get(server.make_url("/metrics")) as response:
            assert response.status == 403
            body = await response.json(content_type=None)
            assert body["type"] == "urn:hashfed:problem:metrics-not-allowed"
            assert "metrics_allow" in body["detail"]
    finally:
        await server.close()


WORKER = """
import sys
from pathlib import Path
from federation.config import DataDir
from federation.hub import open_node
from federation.hub.metrics import HubMetrics

node = open_node(DataDir(Path(sys.argv[1])), searchable=False)
metrics = HubMetrics(node, lambda: [], "127.0.0.1")
for _ in range(int(sys.argv[2])):
    metrics.requests.labels("/v1/lookup", "POST", "200").inc()
    metrics.request_seconds.labels("/v1/lookup").observe(0.002)
metrics.looked_up([("pdq", 2)] * int(sys.argv[2]))
if sys.argv[3] == "scrape":
    sys.stdout.write(metrics.exposition().decode())
"""


def test_several_worker_processes_are_merged_in_one_scrape(federation: Federation, tmp_path: Path) -> None:
    """prometheus-client's multiprocess mode: what each worker counted, summed by whichever answers."""
    shared = tmp_path / "metrics"
    shared.mkdir()
    env = child_env(PROMETHEUS_MULTIPROC_DIR=str(shared))
    outputs = []
    for requests, then in ((3, "quiet"), (4, "scrape")):
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(federation.data.path), str(requests), then],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    samples: Samples = {}
    for family in text_string_to_metric_families(outputs[-1]):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    route = {"route": "/v1/lookup", "method": "POST", "status": "200"}
    assert value(samples, "hashfed_http_requests_total", **route) == 7
    assert value(samples, "hashfed_http_request_duration_seconds_count", route="/v1/lookup") == 7
    assert value(samples, "hashfed_lookup_matches_total", signal="pdq") == 14
    assert value(samples, "hashfed_log_entries", collection="main") == 2  # state, read from the store
