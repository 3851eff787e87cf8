"""Replicas of one hub on one PostgreSQL database: separate ``hashfed serve`` processes, separate
data directories (copies of one), one log.

Real processes on loopback and a real PostgreSQL server. What one replica
acknowledges, every other one shows to the next request; appends from all of
them leave one log with no gap; a signature used at one is refused at all;
killing one loses nothing it acknowledged while the others keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from federation.checkpoint import open_note
from federation.client import HubClient
from federation.envelope import Addition, Envelope
from federation.httpsig import sign_request
from federation.keys import SignerKey
from federation.merkle import leaf_hash
from federation.payloads import parse_payload
from tests.faults import free_port, start_hashfed, wait_exit
from tests.postgres_server import PostgresServer
from tests.sync_helpers import COLLECTION, READ, READ_WRITE, LiveHub, make_hub, pdq, set_config
from tests.test_merkle import iterative_root

REPLICAS = 3


@dataclass
class Replica:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


@dataclass
class Replicas:
    hub: LiveHub
    replicas: list[Replica]

    @contextlib.asynccontextmanager
    async def client(self, member: str, replica: int) -> AsyncIterator[HubClient]:
        async with HubClient(self.replicas[replica].url, self.hub.members[member], retries=0) as client:
            yield client


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_server.fresh_database() as url:
        yield url


async def wait_ready(replica: Replica) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(600):
            assert replica.proc.poll() is None, replica.log.read_text()
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(replica.url + "/v1/ready") as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    pytest.fail(f"replica {replica.url} never became ready:\n{replica.log.read_text()}")


@pytest.fixture
async def replicas(
    tmp_path: Path, postgres_database: str, request: pytest.FixtureRequest
) -> AsyncIterator[Replicas]:
    """One hub made with ``hashfed init --db``, its data directory copied once per replica, each served;
    hub.toml settings come from indirect parametrisation, if any."""
    hub = make_hub(
        tmp_path,
        "hub-r",
        {"acme": READ_WRITE, "beta": READ_WRITE, "gamma": READ_WRITE, "reader": READ},
        postgres_database,
    )
    set_config(hub.data, getattr(request, "param", ""))
    running: list[Replica] = []
    for number in range(REPLICAS):
        directory = tmp_path / f"replica-{number}"
        shutil.copytree(hub.data.path, directory)  # what an operator copies to another machine
        port = free_port()
        log = tmp_path / f"replica-{number}.log"
        proc = start_hashfed("serve", str(directory), "--port", str(port), log=log)
        running.append(Replica(f"http://127.0.0.1:{port}", proc, log))
    try:
        for replica in running:
            await wait_ready(replica)
        yield Replicas(hub, running)
    finally:
        for replica in running:
            if replica.proc.poll() is None:
                replica.proc.send_signal(signal.SIGTERM)
                assert wait_exit(replica.proc, 60) == 0, replica.log.read_text()


async def entries(url: str, reader: SignerKey) -> list[bytes]:
    """The whole log as one replica serves it, checking that its indexes run 0, 1, 2, ..."""
    async with HubClient(url, reader, retries=0) as client:
        found: list[bytes] = []
        while True:
            page, _ = await client.entries(COLLECTION, len(found))
            if not page:
                return found
            assert [index for index, _ in page] == list(range(len(found), len(found) + len(page)))
            found.extend(envelope.canonical() for _, envelope in page)


async def test_concurrent_submitters_on_every_replica_leave_one_log_that_every_replica_serves(
    replicas: Replicas,
) -> None:
    """Every acknowledged entry is seen by the next lookup at every other replica, and the log is whole."""
    missed: list[str] = []

    async def submitter(member: str, offset: int) -> list[tuple[int, str]]:
        acknowledged = []
        for number in range(12):
            at = (offset + number) % REPLICAS
            code = pdq(offset * 1000 + number)
            async with replicas.client(member, at) as writer:
                index = (await writer.submit(COLLECTION, [Addition("pdq", code)])).index
            acknowledged.append((index, code))
            for other in range(REPLICAS):  # a lookup that starts after the 2xx, at every replica
                async with replicas.client("reader", other) as reader:
                    (matches,) = await reader.lookup([("pdq", code)], max_distance=0)
                if [m["hash"] for m in matches] != [code]:
                    missed.append(f"entry {index} acknowledged by replica {at}, not seen by replica {other}")
        return acknowledged

    done = await asyncio.gather(submitter("acme", 1), submitter("beta", 2), submitter("gamma", 3))
    assert not missed, missed
    indexes = sorted(index for acknowledged in done for index, _ in acknowledged)
    assert indexes == list(range(2, 2 + 36))  # after the two membership entries: no gap, no duplicate

    reader = replicas.hub.members["reader"]
    logs = [await entries(replica.url, reader) for replica in replicas.replicas]
    assert all(log == logs[0] for log in logs) and len(logs[0]) == 38
    seqs = [(envelope.signer_key_id, parse_payload(envelope.payload_type, envelope.payload).header.seq)
            for envelope in map(Envelope.parse, logs[0])]  # fmt: skip
    assert len(set(seqs)) == len(seqs), "a signer has two entries with one seq"
    notes = []
    for replica in replicas.replicas:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{replica.url}/v1/collections/{COLLECTION}/checkpoint") as response,
        ):
            notes.append(open_note(await response.text(), replicas.hub.signer.verifier))
    assert {(note.size, note.root) for note in notes} == {(38, iterative_root(logs[0]))}
    assert [leaf_hash(entry) for entry in logs[0]] == [leaf_hash(entry) for entry in logs[1]]


async def test_a_signature_used_at_one_replica_is_refused_at_every_other(replicas: Replicas) -> None:
    body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(7)}]}).encode()
    headers = sign_request(replicas.hub.members["reader"], "POST", "/v1/lookup", "", body)
    headers["Content-Type"] = "application/json"
    answers = []
    async with aiohttp.ClientSession() as session:
        for replica in [*replicas.replicas, replicas.replicas[0]]:
            async with session.post(replica.url + "/v1/lookup", data=body, headers=headers) as response:
                answers.append((response.status, await response.text()))
    assert [status for status, _ in answers] == [200, 401, 401, 401]
    assert all("replayed signature" in json.loads(text)["detail"] for _, text in answers[1:])


@pytest.mark.parametrize("replicas", ["rate_limit_per_second = 0.01\nrate_limit_burst = 4\n"], indirect=True)
async def test_a_keys_rate_limit_is_one_budget_across_replicas(replicas: Replicas) -> None:
    answers = []
    async with aiohttp.ClientSession() as session:
        for number in range(4 * REPLICAS):  # taking turns: no replica alone sees more than the burst
            replica = replicas.replicas[number % REPLICAS]
            body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(number)}]}).encode()
            headers = sign_request(replicas.hub.members["reader"], "POST", "/v1/lookup", "", body)
            headers["Content-Type"] = "application/json"
            async with session.post(replica.url + "/v1/lookup", data=body, headers=headers) as response:
                answers.append((response.status, response.headers.get("Retry-After"), await response.text()))
        async with replicas.client("acme", 0) as other:  # another key has its own budget
            assert len(await other.lookup([("pdq", pdq(1))], max_distance=0)) == 1
    assert [status for status, _, _ in answers] == [200] * 4 + [429] * (4 * REPLICAS - 4)
    for _, retry_after, text in answers[4:]:
        assert "over its rate limit of 0.01 requests per second" in json.loads(text)["detail"]
        assert retry_after is not None and 1 <= int(retry_after) <= 100


async def test_a_killed_replica_loses_nothing_acknowledged_and_the_others_keep_serving(
    replicas: Replicas,
) -> None:
    victim = replicas.replicas[0]
    acknowledged: list[str] = []
    by_replica = [0] * REPLICAS

    async def writer(at: int, member: str, offset: int) -> None:
        # One member per writer: seqs come from each writer's clock, so two concurrent writers
        # signing as one member could reach the log out of seq order (409 stale-seq).
        for number in range(25):
            code = pdq(offset + number)
            try:
                async with replicas.client(member, at) as client:
                    await client.submit(COLLECTION, [Addition("pdq", code)])
            except Exception:  # only requests to the killed replica may fail, and none was acknowledged
                assert at == 0
                continue
            acknowledged.append(code)
            by_replica[at] += 1

    async def killer() -> None:
        await asyncio.sleep(0.3)
        victim.proc.send_signal(signal.SIGKILL)

    await asyncio.gather(
        writer(0, "acme", 10_000), writer(1, "beta", 20_000), writer(2, "gamma", 30_000), killer()
    )
    assert victim.proc.wait(10) == -signal.SIGKILL
    assert by_replica[1] == by_replica[2] == 25, by_replica  # the survivors never failed a write
    for survivor in (1, 2):
        async with replicas.client("reader", survivor) as reader:
            found = await reader.lookup([("pdq", code) for code in acknowledged], max_distance=0)
        assert all(len(matches) == 1 for matches in found), f"replica {survivor} lost acknowledged entries"
    logs = [await entries(replicas.replicas[n].url, replicas.hub.members["reader"]) for n in (1, 2)]
    assert logs[0] == logs[1] and len(logs[0]) >= 2 + len(acknowledged)
