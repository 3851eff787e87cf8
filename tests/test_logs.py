"""``hashfed serve --log-format json``: one JSON object per line, a line per request and per event,
and never a hash value or label."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp

from federation.client import HubClient
from federation.envelope import Addition
from tests.conftest import Federation
from tests.faults import free_port, start_hashfed, wait_exit, wait_until_ready
from tests.helpers import pdq


async def test_json_logs_describe_requests_and_events_without_hashes(
    federation: Federation, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_hashfed(
        "serve", str(federation.data.path), "--port", str(port), "--log-format", "json", log=log
    )
    url = f"http://127.0.0.1:{port}"
    hashes = [pdq(seed) for seed in range(5)]
    try:
        await wait_until_ready(url, proc, log)
        async with HubClient(url, federation.members["acme"], retries=0) as acme:
            submitted = await acme.submit("main", [Addition("pdq", h, ("secret-label",)) for h in hashes])
            await acme.lookup([("pdq", hashes[0])])
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/v1/collections/nope/checkpoint") as r,
        ):
            assert r.status == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert wait_exit(proc, 60) == 0
    await asyncio.sleep(0)

    text = log.read_text()
    lines: list[dict[str, Any]] = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    requests = [line for line in lines if line.get("event") == "request"]
    posted = next(line for line in requests if line["method"] == "POST" and line["status"] == 201)
    assert posted["route"] == "/v1/collections/{collection}/entries"
    assert posted["caller"] == federation.members["acme"].key_id
    assert posted["duration_seconds"] >= 0 and posted["bytes"] > 0 and posted["problem"] is None
    looked = next(line for line in requests if line["route"] == "/v1/lookup")
    assert looked["caller"] == federation.members["acme"].key_id and looked["status"] == 200
    refused = next(line for line in requests if line["status"] == 404)
    assert refused["problem"] == "unknown-collection"
    assert refused["route"] == "/v1/collections/{collection}/checkpoint"

    (appended,) = [line for line in lines if line.get("event") == "entry-appended"]
    assert appended["collection"] == "main" and appended["index"] == submitted.index
    assert appended["signer"] == federation.members["acme"].key_id
    assert (appended["additions"], appended["removals"]) == (5, 0)
    assert all(h not in text for h in hashes) and "secret-label" not in text
