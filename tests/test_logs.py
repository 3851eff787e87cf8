"""``hashfed serve --log-format json``: one JSON object per line, a line per request and per event,
and never a hash value or label."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import select
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp

from federation.client import HubClient
from federation.envelope import Addition
from federation.hub.logs import BatchedStreamHandler
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


class _Writes(io.StringIO):
    """A stream that remembers each write it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def test_request_lines_are_written_together_in_whole_lines_and_none_is_lost_at_close() -> None:
    stream = _Writes()
    handler = BatchedStreamHandler(stream, delay=0.2)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.Logger("requests-under-test")
    logger.addHandler(handler)
    for n in range(200):
        logger.info("request %d %s", n, "x" * 60)
    deadline = time.monotonic() + 5
    while not stream.writes and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == [str(n) for n in range(200)]  # written without a flush
    assert 1 < len(stream.writes) < 200  # together, yet each write within what a pipe writes at once
    assert all(text.endswith("\n") and len(text) <= select.PIPE_BUF for text in stream.writes)
    logger.info("the last one")
    handler.close()
    assert stream.getvalue().endswith("the last one\n")
