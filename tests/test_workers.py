"""``hashfed serve --workers N``: several processes serving one hub over one SQLite file.

Real processes on loopback. Every request below goes over a connection of
its own, so the kernel's SO_REUSEPORT spreads them over the workers; each
answer names its worker (``Hashfed-Worker``), and the tests check that
more than one answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from federation.client import HubClient
from federation.envelope import Addition
from federation.httpsig import sign_request
from federation.index.segmented import DEFAULT_FRESH_LIMIT
from federation.keys import SignerKey
from tests.faults import free_port, start_hashfed, wait_exit
from tests.sync_helpers import COLLECTION, READ, READ_WRITE, make_hub, pdq, set_config

WORKERS = 2


@dataclass
class Workers:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    members: dict[str, SignerKey]

    @contextlib.asynccontextmanager
    async def client(self, member: str) -> AsyncIterator[HubClient]:
        """A client whose every request opens a new connection (any worker may answer it)."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            yield HubClient(self.url, self.members[member], session=session, retries=0)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
        """(status, worker, body) of one GET over a new connection."""
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(self.url + path, headers=headers) as response,
        ):
            return response.status, response.headers.get("Hashfed-Worker", ""), await response.text()

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, str]:
        """(status, worker, body) of one POST over a new connection."""
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.post(self.url + path, data=body, headers=headers) as response,
        ):
            return response.status, response.headers.get("Hashfed-Worker", ""), await response.text()

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (started by multiprocessing's spawn)."""
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(pid) for pid in children if "spawn_main" in _cmdline(int(pid))]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


async def until_every_worker_is_ready(workers: Workers, count: int = WORKERS) -> None:
    ready: set[str] = set()
    for _ in range(1200):
        if workers.proc.poll() is not None:
            pytest.fail(f"the hub exited with {workers.proc.returncode}:\n{workers.log.read_text()}")
        try:
            status, worker, _ = await workers.get("/v1/ready")
        except aiohttp.ClientError:
            status, worker = 0, ""
        if status == 200:
            ready.add(worker)
            if len(ready) == count:
                return
        await asyncio.sleep(0.05)
    pytest.fail(f"only workers {sorted(ready)} became ready:\n{workers.log.read_text()}")


@pytest.fixture
async def workers(tmp_path: Path) -> AsyncIterator[Workers]:
    async with serving_workers(tmp_path) as running:
        yield running


@contextlib.asynccontextmanager
async def serving_workers(tmp_path: Path, settings: str = "") -> AsyncIterator[Workers]:
    """A hub with members acme, beta (read and write) and reader, served by ``WORKERS`` workers;
    ``settings`` are added to its hub.toml."""
    hub = make_hub(tmp_path, "hub-w", {"acme": READ_WRITE, "beta": READ_WRITE, "reader": READ})
    set_config(hub.data, settings)
    port = free_port()
    log = tmp_path / "serve.log"
    proc = start_hashfed("serve", str(hub.data.path), "--port", str(port), "--workers", str(WORKERS), log=log)
    running = Workers(f"http://127.0.0.1:{port}", proc, log, hub.members)
    try:
        await until_every_worker_is_ready(running)
        yield running
    finally:
        if proc.poll() is None:  # a test may have killed it
            proc.send_signal(signal.SIGTERM)
            assert wait_exit(proc, 60) == 0, log.read_text()


async def test_a_signature_used_at_one_worker_is_refused_at_every_other(workers: Workers) -> None:
    body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(1)}]}).encode()
    headers = sign_request(workers.members["reader"], "POST", "/v1/lookup", "", body)
    headers["Content-Type"] = "application/json"
    answers = [await workers.post("/v1/lookup", body, headers)]
    while len({worker for status, worker, _ in answers if status != 200}) < WORKERS and len(answers) < 200:
        answers.append(await workers.post("/v1/lookup", body, headers))  # until every worker was asked again
    assert [status for status, _, _ in answers].count(200) == 1
    refused = [(worker, body) for status, worker, body in answers if status != 200]
    assert all(json.loads(body)["detail"].startswith("replayed signature") for _, body in refused)
    assert len({worker for worker, _ in refused}) == WORKERS  # every worker refused it


async def test_a_write_acknowledged_by_any_worker_is_seen_by_the_next_lookup_at_every_worker(
    workers: Workers,
) -> None:
    answered_by: set[str] = set()
    async with workers.client("acme") as writer, workers.client("reader") as reader:
        for number in range(30):
            code = pdq(1000 + number)
            await writer.submit(COLLECTION, [Addition("pdq", code, ("fresh",))])
            (matches,) = await reader.lookup([("pdq", code)], max_distance=0)
            assert [m["hash"] for m in matches] == [code], (
                f"lookup {number} missed the entry just acknowledged"
            )
    for _ in range(200):
        if len(answered_by) == WORKERS:
            break
        status, worker, body = await workers.get(f"/v1/collections/{COLLECTION}/checkpoint")
        assert status == 200
        answered_by.add(worker)
        assert body.split("\n")[1] == "32"  # two membership entries and the 30 batches, whoever answers
    assert len(answered_by) == WORKERS


async def test_a_worker_asked_nothing_keeps_its_index_up_with_what_the_others_append(
    workers: Workers,
) -> None:
    """Every worker follows the log on its own, so a long import never waits to be replayed at a lookup."""
    codes = [pdq(2000 + number) for number in range(40)]
    async with HubClient(workers.url, workers.members["acme"], retries=0) as writer:  # one connection
        for start in range(0, len(codes), 10):
            await writer.submit(COLLECTION, [Addition("pdq", code) for code in codes[start : start + 10]])
    listed: dict[str, float] = {}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(listed) == WORKERS and set(listed.values()) == {40.0}):
        status, worker, body = await workers.get("/metrics")  # answers from the index as it is; no catch-up
        assert status == 200
        [line] = [
            line
            for line in body.splitlines()
            if line.startswith("hashfed_listed_hashes{") and 'signal="pdq"' in line
        ]
        listed[worker] = float(line.rsplit(" ", 1)[1])
        await asyncio.sleep(0.05)
    assert listed == {str(number): 40.0 for number in range(WORKERS)}


async def test_concurrent_submitters_leave_one_log_with_no_gap_and_unique_seqs(workers: Workers) -> None:
    async def submitter(member: str, offset: int) -> list[int]:
        indexes = []
        async with workers.client(member) as client:
            for number in range(15):
                batch = [Addition("pdq", pdq(offset + 10 * number + k)) for k in range(10)]
                indexes.append((await client.submit(COLLECTION, batch)).index)
        return indexes

    acknowledged = await asyncio.gather(submitter("acme", 10_000), submitter("beta", 20_000))
    flat = sorted(index for indexes in acknowledged for index in indexes)
    assert flat == list(range(2, 32))  # after the two membership entries: no gap, no duplicate
    async with workers.client("reader") as reader:
        listed = await reader.lookup(
            [("pdq", pdq(offset + n)) for offset in (10_000, 20_000) for n in range(150)], max_distance=0
        )
    assert all(len(matches) == 1 for matches in listed)
    notes: dict[str, str] = {}
    while len(notes) < WORKERS:  # every worker signs the same checkpoint of the one log
        status, worker, note = await workers.get(f"/v1/collections/{COLLECTION}/checkpoint")
        assert status == 200
        notes[worker] = note
    assert len(set(notes.values())) == 1 and next(iter(notes.values())).split("\n")[1] == "32"


async def test_a_killed_worker_loses_nothing_acknowledged_and_is_started_again(workers: Workers) -> None:
    pids = workers.worker_pids()
    assert len(pids) == WORKERS, pids
    victim = random.choice(pids)
    acknowledged: list[str] = []
    async with workers.client("acme") as writer:
        for number in range(20):
            code = pdq(50_000 + number)
            if number == 5:
                os.kill(victim, signal.SIGKILL)
            try:
                await writer.submit(COLLECTION, [Addition("pdq", code)])
            except Exception:  # a request the killed worker held is lost, and was never acknowledged
                continue
            acknowledged.append(code)
    assert len(acknowledged) >= 15
    await until_every_worker_is_ready(workers)
    assert victim not in workers.worker_pids()
    async with workers.client("reader") as reader:
        found = await reader.lookup([("pdq", code) for code in acknowledged], max_distance=0)
    assert all(len(matches) == 1 for matches in found)
    assert "exited with status -9; starting it again" in workers.log.read_text()


async def test_a_keys_rate_limit_is_one_budget_across_workers(tmp_path: Path) -> None:
    async with serving_workers(tmp_path, "rate_limit_per_second = 0.1\nrate_limit_burst = 4\n") as workers:
        answers = []
        number = 0
        while number < 12 or len({w for status, w, _ in answers if status == 429}) < WORKERS:
            assert number < 200, "the kernel sent every connection to one worker"
            body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(number)}]}).encode()
            headers = sign_request(workers.members["reader"], "POST", "/v1/lookup", "", body)
            headers["Content-Type"] = "application/json"
            answers.append(await workers.post("/v1/lookup", body, headers))
            number += 1
    assert [status for status, _, _ in answers].count(200) == 4  # the burst, whichever worker answered
    limited = {worker for status, worker, body in answers if status == 429 and "rate limit" in body}
    assert len(limited) == WORKERS


async def test_workers_stop_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    async with serving_workers(tmp_path) as workers:
        pids = workers.worker_pids()
        workers.proc.kill()  # SIGKILL: the supervisor cannot stop anything
        workers.proc.wait(10)
        deadline = time.monotonic() + 30
        while any(Path(f"/proc/{pid}").exists() and _cmdline(pid) for pid in pids):
            assert time.monotonic() < deadline, f"workers {pids} still run without their supervisor"
            await asyncio.sleep(0.2)
        with pytest.raises(aiohttp.ClientError):
            await workers.get("/v1/ready")
        assert (
            "the supervisor" in workers.log.read_text()
            and "is gone; this worker stops" in workers.log.read_text()
        )


def _mapped_segments(pid: int, index_dir: Path) -> set[str]:
    """The segment directories under ``index_dir`` whose files process ``pid`` maps."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split()) >= 6 else ""
        if path.startswith(f"{index_dir}/") and path.endswith(".npy"):
            found.add(Path(path).parent.name)
    return found


async def test_every_worker_maps_the_one_large_segment_the_writing_worker_published(
    workers: Workers, tmp_path: Path
) -> None:
    """Past the fresh segment's limit one worker merges into files; the others map the same files."""
    index_dir = tmp_path / "hub-w" / "index"
    codes = [pdq(200_000 + number) for number in range(DEFAULT_FRESH_LIMIT + 3_000)]
    async with workers.client("acme") as writer:
        for start in range(0, len(codes), 9_000):
            await writer.submit(COLLECTION, [Addition("pdq", code) for code in codes[start : start + 9_000]])
    published = index_dir / f"{COLLECTION}.pdq.json"
    pids = workers.worker_pids()
    sample = random.Random(5).sample(codes, 50)
    deadline = time.monotonic() + 120

    def mapped() -> dict[int, set[str]]:
        return {pid: _mapped_segments(pid, index_dir) for pid in pids}

    while not published.exists() or mapped() != {
        pid: {json.loads(published.read_text())["segment"]} for pid in pids
    }:
        assert time.monotonic() < deadline, f"published: {published.exists()}; the workers map {mapped()}"
        async with workers.client("reader") as reader:  # requests are what catch a worker up
            found = await reader.lookup([("pdq", code) for code in sample], max_distance=0)
        assert all(
            [m["hash"] for m in matches] == [code] for code, matches in zip(sample, found, strict=True)
        )
        await asyncio.sleep(0.2)
    async with workers.client("reader") as reader:
        found = await reader.lookup([("pdq", code) for code in codes[::97]], max_distance=0)
    assert all(
        [m["hash"] for m in matches] == [code] for code, matches in zip(codes[::97], found, strict=True)
    )
