"""Durability under SIGKILL: a real hub process is killed at random moments while
members submit, restarted, and the log, the projection and the checkpoints are
checked against what the members were told (design §2, §6: "an acknowledged
entry is in the log, the checkpoint and lookup answers at once").
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from federation import merkle
from federation.admin import change_membership, init_hub
from federation.checkpoint import open_note
from federation.client import HubClient, HubError
from federation.config import DataDir
from federation.envelope import (
    BATCH_TYPE,
    Addition,
    BatchPayload,
    Envelope,
    Grant,
    Header,
    Removal,
    batch_payload,
    parse_payload,
    sign_envelope,
    utc_now,
)
from federation.httpsig import sign_request
from federation.keys import SignerKey, VerifierKey

REPO = Path(__file__).resolve().parents[1]
FEDERATION = "crashfed"
COLLECTION = "main"
MEMBERS = ("acme", "beta", "gamma")
KILLS = int(os.environ.get("HASHFED_CRASH_KILLS", "5"))
SERVE = (
    "from federation.hub import serve; from federation.config import DataDir; import sys; "
    "serve(DataDir(__import__('pathlib').Path(sys.argv[1])), port=int(sys.argv[2]))"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def iterative_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 root computed level by level (an odd last node moves up unchanged)."""
    if not leaves:
        return hashlib.sha256(b"").digest()
    level = [hashlib.sha256(b"\x00" + data).digest() for data in leaves]
    while len(level) > 1:
        nxt = [
            hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class HubProcess:
    def __init__(self, data: DataDir, log: Path) -> None:
        self.data = data
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(self.data.path), str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=env,
            )

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"hub exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                async with session.get(f"{self.url}/v1/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.03)
        pytest.fail(f"hub not ready after {timeout}s:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class Acked:
    index: int
    envelope: Envelope
    leaf_hash: bytes
    created: bool


@dataclass
class MemberState:
    signer: SignerKey
    seq: int
    confirmed: list[tuple[str, str]] = field(default_factory=list)
    """Hashes this member added in acknowledged batches and never tried to remove."""
    pending: Envelope | None = None
    """The last envelope sent without a 2xx answer (the hub died): maybe in the log."""


@dataclass
class Record:
    sent: dict[bytes, Envelope] = field(default_factory=dict)
    acked: list[Acked] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)
    checkpoint_lags: list[str] = field(default_factory=list)


def random_hash(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(["md5", "sha256", "pdq"], weights=[5, 4, 1])[0]
    return kind, rng.randbytes(16 if kind == "md5" else 32).hex()


def make_batch(rng: random.Random, member: MemberState) -> Envelope:
    count = rng.randint(1, 40) if rng.random() < 0.9 else rng.randint(500, 2500)
    add = []
    for _ in range(count):
        kind, value = random_hash(rng)
        quality = rng.randint(50, 100) if kind == "pdq" and rng.random() < 0.5 else None
        add.append(
            Addition(
                kind, value, tuple(sorted(rng.sample(["csam", "terror", "ncii"], rng.randint(0, 2)))), quality
            )
        )
    remove: list[Removal] = []
    if member.confirmed and rng.random() < 0.3:
        for _ in range(min(len(member.confirmed), rng.randint(1, 5))):
            kind, value = member.confirmed.pop(rng.randrange(len(member.confirmed)))
            remove.append(Removal(kind, value))
    member.seq += 1
    header = Header(FEDERATION, COLLECTION, member.seq, utc_now())
    payload = batch_payload(header, member.signer.name, add, remove)
    return sign_envelope(member.signer, BATCH_TYPE, payload)


async def post(client: HubClient, member: MemberState, envelope: Envelope, record: Record) -> bool:
    """Post one envelope; return False when the hub did not answer (it is down)."""
    record.sent[envelope.canonical()] = envelope
    try:
        submitted = await client.post_envelope(COLLECTION, envelope)
    except HubError as exc:
        if exc.status == 0:
            member.pending = envelope
            return False
        record.refused.append(f"{member.signer.name}: {exc}")
        member.pending = None
        return True
    except (TimeoutError, aiohttp.ClientError, ValueError):  # answer cut off mid-body
        member.pending = envelope
        return False
    member.pending = None
    record.acked.append(Acked(submitted.index, envelope, submitted.leaf_hash, submitted.created))
    payload = parse_payload(BATCH_TYPE, envelope.payload)
    assert isinstance(payload, BatchPayload)
    member.confirmed.extend((a.signal, a.hash) for a in payload.add)
    return True


async def submit_loop(client: HubClient, member: MemberState, record: Record, rng: random.Random) -> None:
    while await post(client, member, make_batch(rng, member), record):
        pass


async def watch_checkpoints(url: str, hub_key: VerifierKey, record: Record) -> None:
    """Fetch checkpoints while the hub runs; each must cover every entry acknowledged before it was asked for."""
    async with aiohttp.ClientSession() as session:
        while True:
            floor = max((a.index for a in record.acked), default=-1) + 1
            try:
                async with session.get(f"{url}/v1/collections/{COLLECTION}/checkpoint") as response:
                    if response.status != 200:
                        return
                    note = await response.text()
            except (TimeoutError, aiohttp.ClientError):
                return
            checkpoint = open_note(note, hub_key)
            record.checkpoints.append((checkpoint.size, checkpoint.root))
            if checkpoint.size < floor:
                record.checkpoint_lags.append(
                    f"checkpoint of size {checkpoint.size} after an ack at {floor - 1}"
                )
            await asyncio.sleep(0.05)


async def fetch_log(url: str, signer: SignerKey) -> list[bytes]:
    """Every entry, as NDJSON, re-serialised in the canonical leaf form."""
    path = f"/v1/collections/{COLLECTION}/entries"
    headers = sign_request(signer, "GET", path, "start=0", None)
    headers["Accept"] = "application/x-ndjson"
    leaves = []
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}{path}?start=0", headers=headers) as response,
    ):
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        async for line in response.content:
            if not line.strip():
                continue
            item = json.loads(line)
            assert item["index"] == len(leaves)
            leaves.append(Envelope.from_json(item["envelope"]).canonical())
    return leaves


def replay(leaves: list[bytes]) -> tuple[dict[tuple[str, str], dict[str, int]], int]:
    """Listers of each hash (member -> index of its add) and the number of batches, from the log alone."""
    listers: dict[tuple[str, str], dict[str, int]] = {}
    batches = 0
    for index, data in enumerate(leaves):
        envelope = Envelope.parse(data)
        if envelope.payload_type != BATCH_TYPE:
            continue
        batches += 1
        payload = parse_payload(BATCH_TYPE, envelope.payload)
        assert isinstance(payload, BatchPayload)
        for addition in payload.add:
            listers.setdefault((addition.signal, addition.hash), {}).setdefault(payload.member, index)
        for removal in payload.remove:
            holders = listers.get((removal.signal, removal.hash), {})
            assert payload.member in holders, f"entry {index} removes a hash its member does not list"
            del holders[payload.member]
    return {key: holders for key, holders in listers.items() if holders}, batches


async def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"crash test seed {seed}")
    data = DataDir(tmp_path / "hub")
    hub_key = init_hub(data.path, name="crashhub", federation=FEDERATION, collection=COLLECTION)
    signers = {name: SignerKey.generate(name) for name in MEMBERS}
    change_membership(
        data,
        COLLECTION,
        grant=[Grant(key.verifier, frozenset({"read", "write"})) for key in signers.values()],
    )
    start_seq = time.time_ns() // 1000
    members = {name: MemberState(key, start_seq) for name, key in signers.items()}
    record = Record()
    hub = HubProcess(data, tmp_path / "hub.log")
    kill_delays: list[float] = []
    resent: list[tuple[str, int]] = []
    try:
        async with aiohttp.ClientSession() as probe:
            for epoch in range(KILLS + 1):
                hub.start()
                await hub.wait_ready(probe)
                clients = {
                    name: HubClient(hub.url, key, retries=0, timeout=30) for name, key in signers.items()
                }
                try:
                    # An envelope whose fate the crash hid is re-sent as is: 200 if it made it, else 201.
                    for name, member in members.items():
                        if member.pending is not None:
                            envelope = member.pending
                            assert await post(clients[name], member, envelope, record), "hub died while idle"
                            if record.acked and record.acked[-1].envelope == envelope:
                                resent.append((name, 200 if not record.acked[-1].created else 201))
                    if epoch == KILLS:
                        break
                    watcher = asyncio.create_task(watch_checkpoints(hub.url, hub_key, record))
                    loops = [
                        asyncio.create_task(
                            submit_loop(clients[name], member, record, random.Random(rng.random()))
                        )
                        for name, member in members.items()
                    ]
                    delay = rng.uniform(0.3, 1.2)
                    kill_delays.append(delay)
                    done, _ = await asyncio.wait(loops, timeout=delay)
                    assert not done, [task.exception() for task in done]
                    hub.kill()
                    await asyncio.wait_for(asyncio.gather(*loops, watcher), timeout=30)
                finally:
                    for client in clients.values():
                        await client.close()

            # ---- the hub is up again after the last kill: check everything ----
            assert not record.refused, record.refused[:5]
            assert not record.checkpoint_lags, record.checkpoint_lags[:5]
            acme = signers["acme"]
            leaves = await fetch_log(hub.url, acme)
            async with probe.get(f"{hub.url}/v1/collections/{COLLECTION}/checkpoint") as response:
                final = open_note(await response.text(), hub_key)
            assert final.origin == f"crashhub/{COLLECTION}"
            assert final.size == len(leaves)
            assert final.root == iterative_root(leaves)

            # Every acknowledged submission holds its index, exactly once, with its leaf hash.
            assert len(leaves) >= len({a.index for a in record.acked}) + 2  # + the two membership entries
            for acked in record.acked:
                data_bytes = acked.envelope.canonical()
                assert acked.index < len(leaves), acked.index
                assert leaves[acked.index] == data_bytes, f"index {acked.index} holds another entry"
                assert acked.leaf_hash == merkle.leaf_hash(data_bytes)
            assert len(set(leaves)) == len(leaves), "an entry is in the log twice"
            # Nothing in the log that no one sent (beyond the two membership entries).
            unknown = [i for i, leaf in enumerate(leaves) if leaf not in record.sent]
            assert unknown == [0, 1], unknown

            # The projection equals a replay of the log: nothing half-applied, nothing applied unlogged.
            listers, batches = replay(leaves)
            assert batches == len(leaves) - 2
            asked = sorted({key for data_bytes in record.sent for key in hashes_of(record.sent[data_bytes])})
            client = HubClient(hub.url, acme, retries=0)
            try:
                for start in range(0, len(asked), 5000):
                    chunk = asked[start : start + 5000]
                    results = await client.lookup(chunk, max_distance=0, collections=[COLLECTION])
                    for (kind, value), matches in zip(chunk, results, strict=True):
                        exact = [m for m in matches if m["hash"] == value and m["type"] == kind]
                        expected = listers.get((kind, value))
                        if expected is None:
                            assert not exact, f"{kind} {value} is listed but no logged batch lists it"
                            continue
                        assert len(exact) == 1, f"{kind} {value} is in the log but lookup misses it"
                        assert exact[0]["submitters"] == sorted(expected)
                        assert exact[0]["first_index"] == min(expected.values())
                # Inclusion of acknowledged entries and consistency of every checkpoint seen before a kill.
                for acked in rng.sample(record.acked, min(20, len(record.acked))):
                    hashes = await client.inclusion_proof(COLLECTION, acked.index, final.size)
                    merkle.verify_inclusion(acked.leaf_hash, acked.index, final.size, hashes, final.root)
                for size, root in sorted(set(record.checkpoints))[:: max(1, len(record.checkpoints) // 25)]:
                    assert size <= final.size
                    hashes = await client.consistency_proof(COLLECTION, size, final.size)
                    merkle.verify_consistency(size, final.size, root, final.root, hashes)
            finally:
                await client.close()
    finally:
        hub.kill()
    print(
        f"{len(record.acked)} acknowledged, {len(leaves)} logged, {len(resent)} re-sent after a kill "
        f"({sum(1 for _, s in resent if s == 200)} had landed), kills after {[round(d, 2) for d in kill_delays]} s"
    )
    assert len(record.acked) >= KILLS * 3, "too little traffic to say anything"


def hashes_of(envelope: Envelope) -> list[tuple[str, str]]:
    payload = parse_payload(BATCH_TYPE, envelope.payload)
    assert isinstance(payload, BatchPayload)
    return [(a.signal, a.hash) for a in payload.add] + [(r.signal, r.hash) for r in payload.remove]
