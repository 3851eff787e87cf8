"""Crash safety under SIGKILL (design §2, §6): nothing acknowledged is lost, nothing is half-applied.

Real processes are killed with SIGKILL at random points, restarted, and the
store is checked against what members were told and against the log itself:

* ``test_sigkill_loses_no_acknowledged_entry`` kills a serving hub while
  members submit batches of every size (1 to 40 hashes, 500 to 2,500, and
  batches of more than 32,768 PDQ hashes that make the large index segment
  merge in the background), give opinions, and the hub key grants, changes
  and revokes keys. Kills are aimed at random moments, at a membership entry
  in flight, at a large batch and its merge, and at the index snapshot write
  that follows a merge.
* ``test_sigkill_during_startup_load`` kills a hub while it loads its indexes
  at start-up (``GET /v1/ready`` still 503) from a store of many hashes:
  while it builds them from the store, while it writes the snapshot that
  build produces, and while it replays the log's tail onto an older snapshot.
* ``test_sigkill_during_rebuild`` kills ``hashfed rebuild`` while it replays
  the log in its one transaction (and sometimes after, while it rebuilds the
  index and writes a snapshot).

After every kill the store must verify: the log is whole (every stored leaf
hash matches its entry, the stored subtree hashes are exactly those of the
entries, the log size matches), the projection equals an independent replay
of the log written here, and the index a restart would build (snapshot plus
the changes since it) answers exactly the projection. The replay kills also
run ``hashfed rebuild`` afterwards, which must succeed and change nothing.

``HASHFED_LONG_TESTS=1`` (set by ``.ci/run``) raises the kills from 5 to 52.
``HASHFED_CRASH_KILLS`` overrides the number of kills during submissions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from federation import merkle
from federation.admin import change_membership, init_hub
from federation.checkpoint import open_note
from federation.client import HubClient, HubError
from federation.config import DataDir
from federation.envelope import (
    BATCH_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Addition,
    Envelope,
    Grant,
    Header,
    OpinionItem,
    Removal,
    batch_payload,
    membership_payload,
    opinion_payload,
    sign_envelope,
    utc_now,
)
from federation.hub import open_node
from federation.index.live import IndexCatalog
from federation.index.segment_files import SnapshotFiles
from federation.index.segmented import DEFAULT_FRESH_LIMIT
from federation.keys import SignerKey, VerifierKey
from federation.node import Node
from federation.payloads import query_json
from federation.signals import PDQ, SIGNAL_TYPES, Frame, Query
from federation.store.opening import open_store, sqlite_file
from tests.faults import REPO, child_env, free_port
from tests.helpers import node_lookup, random_addition

FEDERATION = "crashfed"
COLLECTION = "main"
HUB_NAME = "crashhub"
MEMBERS = ("acme", "beta", "gamma")
READ_WRITE = frozenset({"read", "write"})
LONG = os.environ.get("HASHFED_LONG_TESTS", "").strip() not in ("", "0")
SUBMISSION_KILLS = int(os.environ.get("HASHFED_CRASH_KILLS", "30" if LONG else "3"))
POSTGRES_KILLS = min(SUBMISSION_KILLS, 6)
"""On PostgreSQL the run of kills is cut short: each epoch is slower there (every hub start reads
the projection over the network), and the kills test the hub's side, which both stores share."""
STARTUP_KILLS = 12 if LONG else 1
REBUILD_KILLS = 10 if LONG else 1
STARTUP_HASHES = 150_000 if LONG else 40_000
"""Hashes in the store whose start-up load is killed (a load from the store takes ~0.5 s per 150,000)."""
SERVE = (
    "from federation.hub import serve; from federation.config import DataDir; import sys; "
    "serve(DataDir(__import__('pathlib').Path(sys.argv[1])), port=int(sys.argv[2]))"
)
READY_LINE = b"indexes loaded for"
"""What the hub logs once its indexes are loaded (federation/hub/app.py)."""


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
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE, str(self.data.path), str(port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=child_env(),
            )

    def times_ready(self) -> int:
        """How often a hub writing to this log has finished loading its indexes."""
        return self.log.read_bytes().count(READY_LINE) if self.log.exists() else 0

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 60.0) -> None:
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


class KillSwitch:
    """Kills a process from a thread the moment a condition holds (polled about every 0.2 ms)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], condition: Callable[[], bool], delay: float = 0.0
    ) -> None:
        self.proc = proc
        self.condition = condition
        self.delay = delay
        self.fired = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kill-switch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            if self.condition():
                if self.delay:
                    time.sleep(self.delay)
                self.proc.send_signal(signal.SIGKILL)
                self.fired.set()
                return
            time.sleep(0.0002)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def index_files(directory: Path) -> dict[str, tuple[int, int, int]]:
    try:
        with os.scandir(directory) as entries:
            return {
                entry.name: (entry.stat().st_ino, entry.stat().st_mtime_ns, entry.stat().st_size)
                for entry in entries
            }
    except FileNotFoundError:
        return {}


def snapshot_write_begins(directory: Path) -> Callable[[], bool]:
    """True once any file in the index directory appears or changes: a snapshot write has begun."""
    baseline = index_files(directory)

    def changed() -> bool:
        try:
            return index_files(directory) != baseline
        except OSError:  # a file renamed between listing and stat: a write is under way
            return True

    return changed


# ---- verifying a store ----------------------------------------------------------------


class _PostgresConnection:
    """A psycopg connection taking the tests' ``?`` placeholders, like sqlite3's."""

    def __init__(self, url: str) -> None:
        import psycopg

        self._conn = psycopg.connect(url, autocommit=True)

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        return self._conn.execute(sql.replace("?", "%s"), parameters)

    def close(self) -> None:
        self._conn.close()


def _connect(db: Path | DataDir) -> Any:
    """A connection to a hub's database: its SQLite file, or the PostgreSQL database hub.toml names."""
    if isinstance(db, DataDir):
        url = db.config().database
        path = sqlite_file(url, db.path)
        if path is None:
            return _PostgresConnection(url)
        db = path
    return sqlite3.connect(db, isolation_level=None, timeout=30)


def subtree_hashes(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    """Every complete aligned subtree's hash, keyed (level, index) as the store keeps them."""
    expected: dict[tuple[int, int], bytes] = {}
    level = [merkle.leaf_hash(data) for data in leaves]
    height = 0
    while level:
        expected.update(((height, i), value) for i, value in enumerate(level))
        level = [
            hashlib.sha256(b"\x01" + level[2 * i] + level[2 * i + 1]).digest() for i in range(len(level) // 2)
        ]
        height += 1
    return expected


def read_log(db: Path | DataDir, collection: str = COLLECTION) -> list[bytes]:
    """The log's entries; checks the log is whole: nothing half-appended, every stored hash its entries'."""
    with closing(_connect(db)) as conn:
        conn.execute("BEGIN")
        size = int(conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()[0])
        rows = conn.execute(
            "SELECT idx, leaf_hash, data FROM entries WHERE collection = ? ORDER BY idx", (collection,)
        ).fetchall()
        tree = {
            (int(level), int(index)): bytes(value)
            for level, index, value in conn.execute(
                "SELECT level, idx, hash FROM tree WHERE collection = ?", (collection,)
            )
        }
        conn.execute("COMMIT")
    assert [int(row[0]) for row in rows] == list(range(size)), "the entries do not match the log size"
    leaves = [bytes(row[2]) for row in rows]
    for index, leaf, data in rows:
        assert bytes(leaf) == merkle.leaf_hash(bytes(data)), (
            f"entry {index}: stored leaf hash is not its data's"
        )
    expected = subtree_hashes(leaves)
    if tree != expected:
        extra = sorted(set(tree) - set(expected))[:5]
        missing = sorted(set(expected) - set(tree))[:5]
        wrong = sorted(k for k in set(tree) & set(expected) if tree[k] != expected[k])[:5]
        pytest.fail(
            f"stored tree hashes disagree with the entries: extra {extra}, missing {missing}, wrong {wrong}"
        )
    return leaves


Projection = dict[str, Any]


def dump_projection(db: Path | DataDir, collection: str = COLLECTION) -> Projection:
    """The stored projection (one snapshot of the database), in comparable form."""
    with closing(_connect(db)) as conn:
        conn.execute("BEGIN")
        where = (collection,)
        dump: Projection = {
            "keys": {
                key_id: (key, tuple(json.loads(rights)), granted, revoked)
                for key_id, key, rights, granted, revoked in conn.execute(
                    "SELECT key_id, key, rights, granted, revoked FROM keys WHERE collection = ?", where
                )
            },
            "seqs": dict(conn.execute("SELECT key_id, seq FROM seqs WHERE collection = ?", where).fetchall()),
            "listings": {
                (kind, value, member): (tuple(json.loads(labels)), quality, since)
                for kind, value, member, labels, quality, since in conn.execute(
                    "SELECT type, hash, member, labels, quality, since FROM listings WHERE collection = ?",
                    where,
                )
            },
            "opinions": {
                (kind, value, member): (verdict, note, index)
                for kind, value, member, verdict, note, index in conn.execute(
                    "SELECT type, hash, member, verdict, note, idx FROM opinions WHERE collection = ?", where
                )
            },
            "changes": conn.execute(
                "SELECT idx, ordinal, type, hash, listed FROM changes WHERE collection = ? ORDER BY idx, ordinal",
                where,
            ).fetchall(),
        }
        conn.execute("COMMIT")
    return dump


def replay_projection(leaves: list[bytes]) -> Projection:
    """The projection of a log, from the protocol's rules (docs/protocol.md §5), written independently.

    Entries are taken as accepted (the log's signatures are checked by
    ``hashfed rebuild``); this says what accepting them must have recorded.
    """
    keys: dict[str, tuple[str, tuple[str, ...], int, int | None]] = {}
    seqs: dict[str, int] = {}
    listings: dict[tuple[str, str, str], tuple[tuple[str, ...], int | None, int]] = {}
    listers: dict[tuple[str, str], int] = {}
    opinions: dict[tuple[str, str, str], tuple[str, str | None, int]] = {}
    changes: list[tuple[int, int, str, str, int]] = []
    for index, data in enumerate(leaves):
        envelope = json.loads(data)
        payload = json.loads(base64.b64decode(envelope["payload"]))
        seqs[envelope["signatures"][0]["keyid"]] = payload["seq"]
        kind = envelope["payloadType"]
        if kind == MEMBERSHIP_TYPE:
            for grant in payload["grant"]:
                key_id = "+".join(grant["key"].split("+", 2)[:2])
                earlier = keys.get(key_id)
                granted = earlier[2] if earlier is not None else index
                keys[key_id] = (grant["key"], tuple(sorted(set(grant["rights"]))), granted, None)
            for revoke in payload["revoke"]:
                text, rights, granted, _ = keys[revoke["key"]]
                keys[revoke["key"]] = (text, rights, granted, index)
        elif kind == BATCH_TYPE:
            member = payload["member"]
            entered, left = [], []
            for item in payload["add"]:
                hash_key = (item["type"], item["hash"].lower())
                if listers.get(hash_key, 0) == 0:
                    entered.append(hash_key)
                earlier_listing = listings.get((*hash_key, member))
                if earlier_listing is None:
                    listers[hash_key] = listers.get(hash_key, 0) + 1
                since = earlier_listing[2] if earlier_listing is not None else index
                labels = tuple(sorted(set(item.get("labels", []))))
                listings[(*hash_key, member)] = (labels, item.get("quality"), since)
            for item in payload["remove"]:
                hash_key = (item["type"], item["hash"].lower())
                del listings[(*hash_key, member)]
                listers[hash_key] -= 1
                if listers[hash_key] == 0:
                    left.append(hash_key)
            flagged = [(k, 1) for k in entered] + [(k, 0) for k in left]
            changes.extend(
                (index, ordinal, k[0], k[1], listed) for ordinal, (k, listed) in enumerate(flagged)
            )
        else:
            assert kind == OPINION_TYPE, kind
            for item in payload["opinions"]:
                opinion_key = (item["type"], item["hash"].lower(), payload["member"])
                if item["verdict"] == "withdrawn":
                    opinions.pop(opinion_key, None)
                else:
                    opinions[opinion_key] = (item["verdict"], item.get("note"), index)
    return {"keys": keys, "seqs": seqs, "listings": listings, "opinions": opinions, "changes": changes}


def fingerprint(db: Path, collection: str = COLLECTION) -> tuple[Any, ...]:
    """A cheap summary of log and projection (sizes and sums): any write changes it."""
    with closing(_connect(db)) as conn:
        conn.execute("BEGIN")
        where = (collection,)
        summary = tuple(
            conn.execute(query, where).fetchone()
            for query in (
                "SELECT size FROM collections WHERE name = ?",
                "SELECT count(*), total(length(data)) FROM entries WHERE collection = ?",
                "SELECT count(*), total(since), total(length(labels)), total(quality) FROM listings WHERE collection = ?",
                "SELECT count(*), total(idx) FROM opinions WHERE collection = ?",
                "SELECT count(*), total(idx + ordinal * listed) FROM changes WHERE collection = ?",
                "SELECT count(*), total(granted), total(revoked) FROM keys WHERE collection = ?",
                "SELECT count(*), total(seq % 1000003) FROM seqs WHERE collection = ?",
            )
        )
        conn.execute("COMMIT")
    return summary


def assert_same_projection(stored: Projection, expected: Projection, what: str) -> None:
    for table in expected:
        got, want = stored[table], expected[table]
        if got == want:
            continue
        if isinstance(want, dict):
            extra = [k for k in got if k not in want][:3]
            missing = [k for k in want if k not in got][:3]
            wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]][:3]
            pytest.fail(f"{what}: table {table} differs: extra {extra}, missing {missing}, wrong {wrong}")
        first = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
        pytest.fail(
            f"{what}: table {table} differs ({len(got)} rows, {len(want)} expected; first at {first})"
        )


def check_snapshot(data: DataDir, collection: str = COLLECTION) -> str:
    """A PDQ snapshot, as a restart would load it, plus the changes since its position, is the listed set.

    Each change sets a hash's presence outright, so a restart answers wrongly
    exactly when a hash unchanged since the snapshot's position is held by
    the snapshot but not listed, or listed but not held.
    """
    with tempfile.TemporaryDirectory() as scratch:  # a copy: loading may tidy the directory it reads
        for path in data.index_dir.glob("*.pdq.*"):
            if path.is_dir():
                shutil.copytree(path, Path(scratch) / path.name)
            elif not path.name.endswith(".tmp"):
                shutil.copy2(path, Path(scratch) / path.name)
        loaded = SnapshotFiles(Path(scratch)).load(collection, PDQ.name, 32)
        if loaded is None:
            return "none"
        position = loaded.position
        held = {row.tobytes().hex() for row in loaded.segment.codes}
    with closing(_connect(data)) as conn:
        conn.execute("BEGIN")
        size = int(conn.execute("SELECT size FROM collections WHERE name = ?", (collection,)).fetchone()[0])
        listed = {
            value
            for (value,) in conn.execute(
                "SELECT DISTINCT hash FROM listings WHERE collection = ? AND type = 'pdq'", (collection,)
            )
        }
        changed = {
            value
            for (value,) in conn.execute(
                "SELECT DISTINCT hash FROM changes WHERE collection = ? AND type = 'pdq' AND idx >= ?",
                (collection, position),
            )
        }
        conn.execute("COMMIT")
    if position > size:
        return "ignored"  # IndexCatalog builds from the store instead
    extra = (held - changed) - listed
    missing = (listed - changed) - held
    assert not extra and not missing, (
        f"the index snapshot at position {position} (log size {size}) would answer wrongly: "
        f"{len(extra)} hashes not listed (e.g. {sorted(extra)[:2]}), {len(missing)} listed ones missing "
        f"(e.g. {sorted(missing)[:2]})"
    )
    return "used"


def check_index(data: DataDir, scratch: Path, collection: str = COLLECTION) -> None:
    """The indexes a restart builds (snapshot, then the changes since it) hold exactly the listed hashes.

    Built from a copy of the snapshot files, so the check leaves the data
    directory as the killed process left it.
    """
    copy = scratch / f"index-copy-{time.monotonic_ns()}"
    if data.index_dir.exists():
        shutil.copytree(data.index_dir, copy)
    store = open_store(data.config().database, data.path)
    try:
        catalog = IndexCatalog(store, copy)
        catalog.catch_up(collection)
        listed, _ = store.listed(collection)
        by_type: dict[str, list[str]] = {name: [] for name in SIGNAL_TYPES}
        for kind, value in listed:
            by_type[kind].append(value)
        for name, signal_type in SIGNAL_TYPES.items():
            hashes = by_type[name]
            for start in range(0, len(hashes), 20_000):
                chunk = hashes[start : start + 20_000]
                found = catalog.search(collection, signal_type, [Query(signal_type, h, 0) for h in chunk])
                missed = [
                    h for h, matches in zip(chunk, found, strict=True) if [m[:2] for m in matches] != [(h, 0)]
                ]
                assert not missed, (
                    f"the rebuilt {name} index misses {len(missed)} listed hashes: {missed[:2]}"
                )
        sizes = catalog.size(collection)
        assert sizes == {name: len(hashes) for name, hashes in by_type.items()}, (
            f"the rebuilt index holds {sizes}, the projection lists "
            f"{ {name: len(hashes) for name, hashes in by_type.items()} }"
        )
    finally:
        store.close()
        shutil.rmtree(copy, ignore_errors=True)


def run_rebuild(data: DataDir) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "federation", "rebuild", str(data.path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=600,
    )


def verify_store(
    data: DataDir, scratch: Path, *, rebuild: bool, expected: Projection | None = None
) -> tuple[list[bytes], Projection]:
    """The store of a stopped hub verifies: log whole, projection = replay, index = projection.

    ``expected`` is the replay of the log, when the caller has it already. With
    ``rebuild``, ``hashfed rebuild`` then succeeds and leaves log and projection unchanged.
    """
    leaves = read_log(data)
    stored = dump_projection(data)
    replayed = expected if expected is not None else replay_projection(leaves)
    assert_same_projection(stored, replayed, "the projection against a replay of the log")
    check_snapshot(data)
    check_index(data, scratch)
    if rebuild:
        done = run_rebuild(data)
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{COLLECTION}: replayed {len(leaves):,} log entries" in done.stdout, done.stdout
        assert read_log(data) == leaves
        assert_same_projection(dump_projection(data), stored, "the projection after hashfed rebuild")
    return leaves, stored


def expected_lookup(projection: Projection) -> dict[tuple[str, str], dict[str, Any]]:
    """What a lookup must answer for each listed hash, from a projection."""
    answers: dict[tuple[str, str], dict[str, Any]] = {}
    for (kind, value, member), (labels, _, since) in projection["listings"].items():
        answer = answers.setdefault(
            (kind, value),
            {"submitters": [], "labels": set(), "first_index": since, "positive": 0, "negative": 0},
        )
        answer["submitters"].append(member)
        answer["labels"].update(labels)
        answer["first_index"] = min(answer["first_index"], since)
    for (kind, value, _), (verdict, _, _) in projection["opinions"].items():
        if (kind, value) in answers:
            answers[(kind, value)][verdict] += 1
    return answers


async def check_lookups(
    client: HubClient,
    projection: Projection,
    asked: list[tuple[str, str]],
    frames: Mapping[str, tuple[Frame, ...]] | None = None,
) -> None:
    """Lookups at distance 0 answer every asked hash exactly as the projection lists it (or not at all).

    A video is asked with its own frames (``frames``), so it finds itself among any others.
    """
    answers = expected_lookup(projection)
    for start in range(0, len(asked), 10_000):
        chunk = asked[start : start + 10_000]
        queries = [
            query_json(Addition(kind, value, frames=(frames or {}).get(value))) for kind, value in chunk
        ]
        results = await client.lookup(queries, max_distance=0, collections=[COLLECTION])
        for (kind, value), matches in zip(chunk, results, strict=True):
            exact = [m for m in matches if m["hash"] == value and m["type"] == kind]
            want = answers.get((kind, value))
            if want is None:
                assert not exact, f"{kind} {value} is found but not listed"
                continue
            assert len(exact) == 1, f"{kind} {value} is listed but lookup misses it"
            got = exact[0]
            assert got["submitters"] == sorted(want["submitters"]), (kind, value)
            assert got["labels"] == sorted(want["labels"]), (kind, value)
            assert got["first_index"] == want["first_index"], (kind, value)
            assert got["opinions"] == {"positive": want["positive"], "negative": want["negative"]}, (
                kind,
                value,
            )


# ---- kills during submissions --------------------------------------------------------


@dataclass
class Acked:
    index: int
    envelope: Envelope
    leaf_hash: bytes
    created: bool


@dataclass
class Actor:
    signer: SignerKey
    seq: int
    pending: Envelope | None = None
    """The last envelope sent without a 2xx answer (the hub died): maybe in the log."""

    def acked(self, envelope: Envelope) -> None:
        """Record what an acknowledged envelope changed."""


@dataclass
class MemberState(Actor):
    confirmed: list[tuple[str, str]] = field(default_factory=list)
    """Hashes this member added in acknowledged batches and never tried to remove."""

    def acked(self, envelope: Envelope) -> None:
        if envelope.payload_type == BATCH_TYPE:
            payload = json.loads(envelope.payload)
            self.confirmed.extend((item["type"], item["hash"]) for item in payload["add"])


@dataclass
class HubState(Actor):
    """The hub key's view of the extra member keys it granted (updated on acknowledgement)."""

    active: dict[str, tuple[VerifierKey, frozenset[str]]] = field(default_factory=dict)
    made: int = 0

    def acked(self, envelope: Envelope) -> None:
        payload = json.loads(envelope.payload)
        for grant in payload["grant"]:
            key = VerifierKey.parse(grant["key"])
            self.active[key.key_id] = (key, frozenset(grant["rights"]))
        for revoke in payload["revoke"]:
            del self.active[revoke["key"]]


@dataclass
class Record:
    sent: dict[bytes, Envelope] = field(default_factory=dict)
    acked: list[Acked] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    checkpoints: list[tuple[int, bytes]] = field(default_factory=list)
    checkpoint_lags: list[str] = field(default_factory=list)
    known: list[tuple[str, str]] = field(default_factory=list)
    """Every hash any batch was built with."""


def random_hash(rng: random.Random) -> tuple[str, str]:
    kind = rng.choices(["md5", "sha256", "pdq"], weights=[5, 4, 1])[0]
    return kind, rng.randbytes(16 if kind == "md5" else 32).hex()


def make_batch(rng: random.Random, member: MemberState, record: Record, *, big: bool = False) -> Envelope:
    if big:  # enough PDQ hashes to fill the fresh segment: the large segment merges in the background
        add = [
            Addition("pdq", rng.randbytes(32).hex(), ("bulk",) if rng.random() < 0.5 else ())
            for _ in range(DEFAULT_FRESH_LIMIT + rng.randint(100, 2_000))
        ]
    else:
        count = rng.randint(1, 40) if rng.random() < 0.9 else rng.randint(500, 2500)
        add = []
        for _ in range(count):
            kind, value = random_hash(rng)
            quality = rng.randint(50, 100) if kind == "pdq" and rng.random() < 0.5 else None
            labels = tuple(sorted(rng.sample(["csam", "terror", "ncii"], rng.randint(0, 2))))
            add.append(Addition(kind, value, labels, quality))
    remove: list[Removal] = []
    if member.confirmed and not big and rng.random() < 0.3:
        for _ in range(min(len(member.confirmed), rng.randint(1, 5))):
            kind, value = member.confirmed.pop(rng.randrange(len(member.confirmed)))
            remove.append(Removal(kind, value))
    record.known.extend((a.signal, a.hash) for a in add)
    member.seq += 1
    header = Header(FEDERATION, COLLECTION, member.seq, utc_now())
    return sign_envelope(member.signer, BATCH_TYPE, batch_payload(header, member.signer.name, add, remove))


def make_opinion(rng: random.Random, member: MemberState, record: Record) -> Envelope:
    chosen = {record.known[rng.randrange(len(record.known))] for _ in range(rng.randint(1, 5))}
    items = [
        OpinionItem(
            kind,
            value,
            rng.choice(["positive", "negative", "negative", "withdrawn"]),
            rng.choice([None, "seen on our service", "a public photo"]),
        )
        for kind, value in sorted(chosen)
    ]
    member.seq += 1
    header = Header(FEDERATION, COLLECTION, member.seq, utc_now())
    return sign_envelope(member.signer, OPINION_TYPE, opinion_payload(header, member.signer.name, items))


def make_membership(rng: random.Random, hub: HubState) -> Envelope:
    """Grant a new key, change an active one's rights, or revoke one (sometimes with a grant)."""
    grants: list[Grant] = []
    revokes: list[str] = []
    choice = rng.random()
    if not hub.active or choice < 0.45:
        hub.made += 1
        rights = rng.choice([frozenset({"read"}), frozenset({"write"}), READ_WRITE])
        grants.append(Grant(SignerKey.generate(f"extra{hub.made}").verifier, rights))
    elif choice < 0.7:
        key, rights = hub.active[rng.choice(sorted(hub.active))]
        grants.append(Grant(key, READ_WRITE if rights != READ_WRITE else frozenset({"read"})))
    else:
        revokes.append(rng.choice(sorted(hub.active)))
        if rng.random() < 0.5:
            hub.made += 1
            grants.append(Grant(SignerKey.generate(f"extra{hub.made}").verifier, READ_WRITE))
    hub.seq = max(hub.seq + 1, time.time_ns() // 1000)
    payload = membership_payload(Header(FEDERATION, COLLECTION, hub.seq, utc_now()), grants, revokes)
    return sign_envelope(hub.signer, MEMBERSHIP_TYPE, payload)


async def post(client: HubClient, actor: Actor, envelope: Envelope, record: Record) -> bool:
    """Post one envelope; return False when the hub did not answer (it is down)."""
    record.sent[envelope.canonical()] = envelope
    try:
        submitted = await client.post_envelope(COLLECTION, envelope)
    except HubError as exc:
        if exc.status == 0:
            actor.pending = envelope
            return False
        record.refused.append(f"{actor.signer.name}: {exc}")
        actor.pending = None
        return True
    except (TimeoutError, aiohttp.ClientError, ValueError):  # answer cut off mid-body
        actor.pending = envelope
        return False
    actor.pending = None
    record.acked.append(Acked(submitted.index, envelope, submitted.leaf_hash, submitted.created))
    actor.acked(envelope)
    return True


async def member_loop(
    client: HubClient, member: MemberState, record: Record, rng: random.Random, big: asyncio.Event | None
) -> None:
    """Batches of every size and some opinions; with ``big``, first one merge-sized batch (then set it)."""
    if big is not None:
        landed = await post(client, member, make_batch(rng, member, record, big=True), record)
        big.set()
        if not landed:
            return
    while True:
        if rng.random() < 0.15 and record.known:
            envelope = make_opinion(rng, member, record)
        else:
            envelope = make_batch(rng, member, record)
        if not await post(client, member, envelope, record):
            return


async def membership_loop(
    client: HubClient, hub: HubState, record: Record, rng: random.Random, sending: asyncio.Event
) -> None:
    while True:
        await asyncio.sleep(rng.uniform(0.05, 0.3))
        envelope = make_membership(rng, hub)
        sending.set()
        if not await post(client, hub, envelope, record):
            return


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
    client = HubClient(url, signer, retries=0, timeout=120)
    try:
        return [envelope.canonical() async for _, envelope in client.stream_entries(COLLECTION)]
    finally:
        await client.close()


SCENARIOS = (
    "snapshot",
    "membership",
    "random",
    "membership",
    "random",
    "merge",
    "membership",
    "random",
) * 2 + (
    "membership",
    "random",
)
"""Where kills during submissions are aimed, in turn (each merge-sized batch adds 33,000-35,000
hashes to the store, so about one kill in four is aimed at a merge or at its snapshot):

snapshot: the index snapshot write after a background merge (the kill comes
  as soon as a file in the index directory appears or changes);
membership: a membership entry from the hub key, 0-12 ms after it is sent;
random: any moment 0.3-1.2 s into the traffic;
merge: any moment while a merge-sized batch is parsed, appended, indexed and merged.
"""


async def test_sigkill_loses_no_acknowledged_entry(tmp_path: Path, database: str) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"crash test seed {seed}")
    data = DataDir(tmp_path / "hub")
    hub_key = init_hub(
        data.path, name=HUB_NAME, federation=FEDERATION, collection=COLLECTION, database=database
    )
    kill_count = POSTGRES_KILLS if database else SUBMISSION_KILLS
    signers = {name: SignerKey.generate(name) for name in MEMBERS}
    change_membership(data, COLLECTION, grant=[Grant(key.verifier, READ_WRITE) for key in signers.values()])
    start_seq = time.time_ns() // 1000
    members = {name: MemberState(key, start_seq) for name, key in signers.items()}
    hub_state = HubState(data.signer(), start_seq)
    actors: dict[str, Actor] = {**members, "hub": hub_state}
    record = Record()
    hub = HubProcess(data, tmp_path / "hub.log")
    kills: list[tuple[str, str]] = []
    resent: list[tuple[str, int]] = []
    merge_seconds = 3.0
    try:
        async with aiohttp.ClientSession() as probe:
            for epoch in range(kill_count + 1):
                hub.start()
                await hub.wait_ready(probe)
                assert hub.proc is not None
                clients = {
                    name: HubClient(hub.url, actor.signer, retries=0, timeout=60)
                    for name, actor in actors.items()
                }
                try:
                    # An envelope whose fate the crash hid is re-sent as is: 200 if it made it, else 201.
                    for name, actor in actors.items():
                        if actor.pending is not None:
                            envelope = actor.pending
                            assert await post(clients[name], actor, envelope, record), "hub died while idle"
                            assert record.acked[-1].envelope == envelope, record.refused[-1:]
                            resent.append((name, 201 if record.acked[-1].created else 200))
                    if epoch == kill_count:
                        break
                    scenario = SCENARIOS[epoch % len(SCENARIOS)]
                    big = asyncio.Event() if scenario in ("snapshot", "merge") else None
                    sending = asyncio.Event()
                    switch = None
                    if scenario == "snapshot":
                        delay = rng.choice([0.0, rng.uniform(0, 0.004)])
                        switch = KillSwitch(hub.proc, snapshot_write_begins(data.index_dir), delay)
                    started = time.monotonic()
                    tasks = [asyncio.create_task(watch_checkpoints(hub.url, hub_key, record))]
                    tasks += [
                        asyncio.create_task(
                            member_loop(
                                clients[name],
                                member,
                                record,
                                random.Random(rng.random()),
                                big if name == "acme" else None,
                            )
                        )
                        for name, member in members.items()
                    ]
                    tasks.append(
                        asyncio.create_task(
                            membership_loop(
                                clients["hub"], hub_state, record, random.Random(rng.random()), sending
                            )
                        )
                    )
                    outcome = scenario
                    if scenario == "random":
                        await asyncio.sleep(rng.uniform(0.3, 1.2))
                    elif scenario == "membership":
                        await asyncio.wait_for(sending.wait(), 10)
                        await asyncio.sleep(rng.uniform(0, 0.012))
                    elif scenario == "merge":
                        await asyncio.sleep(rng.uniform(0.05, merge_seconds))
                    else:
                        assert switch is not None
                        for _ in range(3000):
                            if switch.fired.is_set() or hub.proc.poll() is not None:
                                break
                            await asyncio.sleep(0.01)
                        switch.stop()
                        if switch.fired.is_set():
                            merge_seconds = max(0.5, time.monotonic() - started)
                        else:
                            outcome = "snapshot (no write seen in 30 s)"
                    if scenario != "snapshot":  # else the switch has killed the hub already
                        assert all(not t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
                    hub.kill()
                    kills.append((outcome, f"{time.monotonic() - started:.2f}s"))
                    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
                finally:
                    for client in clients.values():
                        await client.close()
                # ---- the hub is dead: its store must be whole ----
                read_log(data)
                check_snapshot(data)
                if scenario == "snapshot" and epoch == 0:
                    check_index(data, tmp_path)

            # ---- the hub is up again after the last kill: check everything ----
            assert not record.refused, record.refused[:5]
            assert not record.checkpoint_lags, record.checkpoint_lags[:5]
            acme = signers["acme"]
            leaves = await fetch_log(hub.url, acme)
            assert leaves == read_log(data)
            async with probe.get(f"{hub.url}/v1/collections/{COLLECTION}/checkpoint") as response:
                final = open_note(await response.text(), hub_key)
            assert final.origin == f"{HUB_NAME}/{COLLECTION}"
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
            # Nothing in the log that no one sent (beyond the two membership entries made by init).
            unknown = [i for i, leaf in enumerate(leaves) if leaf not in record.sent]
            assert unknown == [0, 1], unknown

            # The projection equals a replay of the log: nothing half-applied, nothing applied unlogged.
            projection = replay_projection(leaves)
            assert_same_projection(dump_projection(data), projection, "the serving hub's projection")
            # And lookups answer it for every hash ever sent (listed now or not).
            client = HubClient(hub.url, acme, retries=0, timeout=120)
            try:
                await check_lookups(client, projection, sorted(set(record.known)))
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
        hub.kill()
        verify_store(data, tmp_path, rebuild=True, expected=projection)
    finally:
        hub.kill()
    entry_kinds = {kind: 0 for kind in (BATCH_TYPE, OPINION_TYPE, MEMBERSHIP_TYPE)}
    for leaf in leaves:
        entry_kinds[json.loads(leaf)["payloadType"]] += 1
    print(
        f"{len(kills)} kills ({', '.join(f'{what} after {when}' for what, when in kills)}); "
        f"{len(record.acked)} acknowledged, {len(leaves)} logged {entry_kinds}, {len(resent)} re-sent "
        f"after a kill ({sum(1 for _, s in resent if s == 200)} had landed)"
    )
    assert len(kills) == kill_count
    assert len(record.acked) >= kill_count * 3, "too little traffic to say anything"
    if kill_count >= 5:
        assert entry_kinds[OPINION_TYPE] and entry_kinds[MEMBERSHIP_TYPE] > 2, entry_kinds
    snapshot_kills = [what for what, _ in kills if what.startswith("snapshot")]
    assert not snapshot_kills or "snapshot" in snapshot_kills, "no kill landed on a snapshot write"


# ---- stores built in-process, for the replay kills ------------------------------------


class World:
    """A hub data directory grown in-process through the real write path (Node.submit)."""

    def __init__(self, root: Path) -> None:
        self.data = DataDir(root / "hub")
        self.hub_key = init_hub(self.data.path, name=HUB_NAME, federation=FEDERATION, collection=COLLECTION)
        self.writers = {name: SignerKey.generate(name) for name in MEMBERS}
        self.reader = SignerKey.generate("reader")
        grants = [Grant(key.verifier, READ_WRITE) for key in self.writers.values()]
        change_membership(
            self.data, COLLECTION, grant=[*grants, Grant(self.reader.verifier, frozenset({"read"}))]
        )
        self.seq = time.time_ns() // 1000
        self.extras: list[VerifierKey] = []
        self.made = 0
        self.removed: list[tuple[str, str]] = []
        self.frames: dict[str, tuple[Frame, ...]] = {}
        """Frames of every video added, to add one again after its removal."""
        self.expected: Projection = {}

    def node(self) -> Node:
        """A node whose appends leave the index files alone (only the killed processes write them)."""
        node = open_node(self.data)
        node.indexes.catch_up = lambda collection: 0  # type: ignore[method-assign]
        return node

    def envelope(self, signer: SignerKey, payload_type: str, build: Callable[[Header], bytes]) -> Envelope:
        self.seq += 1
        return sign_envelope(signer, payload_type, build(Header(FEDERATION, COLLECTION, self.seq, utc_now())))

    def grow(self, rng: random.Random, entries: int, sizes: tuple[int, int]) -> None:
        """Append entries: batches (new hashes, re-adds, removals), opinions, membership changes."""
        node = self.node()
        try:
            with closing(_connect(self.data)) as conn:
                for _ in range(entries):
                    choice = rng.random()
                    if choice < 0.06:
                        self._membership(node, rng)
                    elif choice < 0.2:
                        self._opinion(node, rng, conn)
                    else:
                        self._batch(node, rng, conn, sizes)
        finally:
            node.store.close()
        self.expected = replay_projection(read_log(self.data))
        assert_same_projection(dump_projection(self.data), self.expected, "the grown store")

    def _membership(self, node: Node, rng: random.Random) -> None:
        if self.extras and rng.random() < 0.4:
            node.change_membership(COLLECTION, [], [self.extras.pop(rng.randrange(len(self.extras))).key_id])
            return
        self.made += 1
        key = SignerKey.generate(f"extra{self.made}").verifier
        node.change_membership(COLLECTION, [Grant(key, rng.choice([READ_WRITE, frozenset({"read"})]))], [])
        self.extras.append(key)

    def _opinion(self, node: Node, rng: random.Random, conn: sqlite3.Connection) -> None:
        signer = rng.choice([*self.writers.values(), self.reader])
        rows = conn.execute(
            "SELECT type, hash FROM listings WHERE collection = ? ORDER BY random() LIMIT ?",
            (COLLECTION, rng.randint(1, 8)),
        ).fetchall()
        items = [
            OpinionItem(
                kind, value, rng.choice(["positive", "negative", "withdrawn"]), rng.choice([None, "n"])
            )
            for kind, value in dict.fromkeys(rows)
        ]
        if items:
            envelope = self.envelope(
                signer, OPINION_TYPE, lambda header: opinion_payload(header, signer.name, items)
            )
            node.submit(COLLECTION, envelope)

    def _batch(
        self, node: Node, rng: random.Random, conn: sqlite3.Connection, sizes: tuple[int, int]
    ) -> None:
        member = rng.choice(sorted(self.writers))
        add = []
        for _ in range(rng.randint(*sizes)):
            kind = rng.choice(list(SIGNAL_TYPES))
            labels = tuple(rng.sample(["a", "b", "c"], rng.randint(0, 2)))
            item = random_addition(kind, rng, labels)
            if item.frames is not None:
                self.frames[item.hash] = item.frames
            add.append(item)
        readd = [
            self.removed.pop(rng.randrange(len(self.removed)))
            for _ in range(min(len(self.removed), rng.randint(0, 3)))
        ]
        add += [Addition(kind, value, ("again",), frames=self.frames.get(value)) for kind, value in readd]
        listed = conn.execute(
            "SELECT type, hash FROM listings WHERE collection = ? AND member = ? ORDER BY random() LIMIT ?",
            (COLLECTION, member, rng.randint(0, 12)),
        ).fetchall()
        adding = {(a.signal, a.hash) for a in add}
        remove = [Removal(kind, value) for kind, value in listed if (kind, value) not in adding]
        self.removed += [(r.signal, r.hash) for r in remove]
        signer = self.writers[member]
        envelope = self.envelope(
            signer, BATCH_TYPE, lambda header: batch_payload(header, member, add, remove)
        )
        node.submit(COLLECTION, envelope)


def clear_snapshot(data: DataDir) -> None:
    """Delete the snapshot files (they are derived data); the next load builds from the store and saves one."""
    for path in data.index_dir.glob("*"):
        if path.is_dir():
            shutil.rmtree(path)
        elif not path.name.endswith(".tmp"):
            path.unlink()


# ---- kills during the start-up load ---------------------------------------------------


async def _kill_while_loading(
    hub: HubProcess, session: aiohttp.ClientSession, rng: random.Random, window: float
) -> float | None:
    """Kill the hub at a random moment of its load (GET /v1/ready 503); return the load time if it won."""
    assert hub.proc is not None
    deadline: float | None = None
    first_503 = 0.0
    while True:
        assert hub.proc.poll() is None, hub.log.read_text()[-3000:]
        try:
            async with session.get(f"{hub.url}/v1/ready") as response:
                status = response.status
        except aiohttp.ClientError:
            status = None
        now = time.monotonic()
        if status == 503 and deadline is None:
            first_503 = now
            deadline = now + rng.uniform(0, window)
        if status == 200:
            hub.kill()
            return now - first_503 if deadline is not None else 0.0
        if deadline is not None and now >= deadline:
            hub.kill()
            return None
        await asyncio.sleep(0.002)


async def _kill_at_snapshot_write(
    hub: HubProcess, session: aiohttp.ClientSession, rng: random.Random
) -> bool:
    """Kill the hub as its load writes the index snapshot; False if it became ready first."""
    assert hub.proc is not None
    switch = KillSwitch(hub.proc, snapshot_write_begins(hub.data.index_dir), rng.choice([0.0, 0.001, 0.003]))
    try:
        while not switch.fired.is_set() and hub.proc.poll() is None:
            try:
                async with session.get(f"{hub.url}/v1/ready") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.005)
    finally:
        switch.stop()
        hub.kill()
    return switch.fired.is_set()


STARTUP_MODES = ("snapshot-write", "from-store", "snapshot-and-tail")
"""snapshot-write: no snapshot, killed as the load writes the one it builds;
from-store: no snapshot, killed at a random moment of the build from the store;
snapshot-and-tail: an older snapshot plus entries since, killed at a random moment of the load."""


async def test_sigkill_during_startup_load(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"startup kill seed {seed}")
    world = World(tmp_path)
    per_entry = STARTUP_HASHES // 8
    world.grow(rng, entries=10, sizes=(per_entry // 2, per_entry + per_entry // 2))
    data = world.data
    expected_fingerprint = fingerprint(data.database)
    log = tmp_path / "hub.log"
    windows = dict.fromkeys(STARTUP_MODES, 0.5)
    kills: list[str] = []
    attempts = 0
    async with aiohttp.ClientSession() as session:
        while len(kills) < STARTUP_KILLS:
            attempts += 1
            assert attempts <= 3 * STARTUP_KILLS + 3, (
                f"only {kills} of {attempts} attempts killed a loading hub"
            )
            mode = STARTUP_MODES[(attempts - 1) % len(STARTUP_MODES)]
            if mode == "snapshot-and-tail":
                if check_snapshot(data) != "used":
                    node = open_node(data)  # a full load saves a snapshot
                    node.load()
                    node.store.close()
                world.grow(rng, entries=rng.randint(2, 5), sizes=(20, 400))  # removals, re-adds, new hashes
                expected_fingerprint = fingerprint(data.database)
            else:
                clear_snapshot(data)
            hub = HubProcess(data, log)
            ready_before = hub.times_ready()
            hub.start()
            if mode == "snapshot-write":
                fired = await _kill_at_snapshot_write(hub, session, rng)
                landed = fired and hub.times_ready() == ready_before
            else:
                loaded_in = await _kill_while_loading(hub, session, rng, windows[mode])
                if loaded_in is not None:
                    windows[mode] = max(0.01, loaded_in * 0.9)
                landed = loaded_in is None and hub.times_ready() == ready_before
            # The load writes nothing to the database; the snapshot it may have half-written must not matter.
            assert fingerprint(data.database) == expected_fingerprint, f"a load changed the database ({mode})"
            read_log(data)
            check_snapshot(data)
            if mode == "snapshot-write":
                check_index(data, tmp_path)
            if landed:
                kills.append(mode)

        # ---- serve once more: lookups answer the projection for every listed hash and removed ones ----
        hub = HubProcess(data, log)
        hub.start()
        try:
            await hub.wait_ready(session)
            # What killed writers left half-written must be gone once a hub has started (checked last).
            leftovers = sorted(
                f"{path.name} ({path.stat().st_size:,} bytes)"
                for path in data.index_dir.iterdir()
                if not path.name.startswith(f"{COLLECTION}.") or not (path.is_dir() or path.suffix == ".json")
            )
            listed = sorted({(kind, value) for kind, value, _ in world.expected["listings"]})
            removed = sorted(set(world.removed) - set(listed))[:2_000]
            client = HubClient(hub.url, world.reader, retries=0, timeout=120)
            try:
                await check_lookups(client, world.expected, listed + removed, world.frames)
            finally:
                await client.close()
            async with session.get(f"{hub.url}/v1/collections/{COLLECTION}/checkpoint") as response:
                final = open_note(await response.text(), world.hub_key)
        finally:
            hub.kill()
    leaves, _ = verify_store(data, tmp_path, rebuild=True, expected=world.expected)
    assert final.size == len(leaves) and final.root == iterative_root(leaves)
    print(f"{len(kills)} kills while loading {len(listed):,} hashes ({kills}) in {attempts} attempts")
    # Else every kill during a snapshot write keeps a file as large as the snapshot, for good:
    # a hub crash-looping in its start-up load fills its disk.
    assert not leftovers, f"after {len(kills)} kills during the load, a started hub still keeps {leftovers}"


# ---- kills during hashfed rebuild ------------------------------------------------------


def write_locked(db: Path) -> bool:
    """Whether a write transaction is open on the database (a rebuild replaying its log)."""
    with closing(sqlite3.connect(db, isolation_level=None, timeout=0)) as conn:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            return True
        conn.execute("ROLLBACK")
        return False


def _start_rebuild(data: DataDir) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "federation", "rebuild", str(data.path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
        env=child_env(),
    )


def _kill_rebuild(
    data: DataDir, rng: random.Random, transaction: float, after_commit: bool
) -> tuple[str, float] | None:
    """Start ``hashfed rebuild`` and SIGKILL it at a random point of its replay transaction
    (or, with ``after_commit``, just after it commits); None if it finished first.

    The transaction is seen as the database's write lock held on three polls in
    a row (opening the store takes it for an instant only); the kill comes a
    random part of ``transaction`` seconds later, or as soon as the lock is released.
    """
    started = time.monotonic()
    proc = _start_rebuild(data)
    held = 0
    kill_at: float | None = None
    try:
        while proc.poll() is None:
            locked = write_locked(data.database)
            now = time.monotonic()
            held = held + 1 if locked else 0
            if held == 3 and kill_at is None:
                kill_at = now + (0.0 if after_commit else rng.uniform(0, transaction))
            if kill_at is not None and not locked:
                proc.send_signal(signal.SIGKILL)  # committed: the rebuild is dropping snapshots, exiting
                proc.wait()
                return ("after commit", now - started) if proc.returncode != 0 else None
            if kill_at is not None and not after_commit and now >= kill_at:
                inside = write_locked(data.database)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return ("in transaction" if inside else "after commit", now - started)
            time.sleep(0.002)
        return None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _transaction_length(data: DataDir) -> float:
    """How long one rebuild holds its replay transaction (polled, so a little short)."""
    proc = _start_rebuild(data)
    runs: list[float] = []
    since: float | None = None
    while proc.poll() is None:
        now = time.monotonic()
        if write_locked(data.database):
            since = now if since is None else since
            runs.append(now - since)
        else:
            since = None
        time.sleep(0.002)
    assert proc.returncode == 0
    assert runs and max(runs) > 0.02, (
        "the rebuild's transaction was never seen; the log is too small to time it"
    )
    return max(runs)


def test_sigkill_during_rebuild(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    print(f"rebuild kill seed {seed}")
    world = World(tmp_path)
    world.grow(rng, entries=300 if LONG else 150, sizes=(1, 90))
    data = world.data
    verify_store(data, tmp_path, rebuild=False, expected=world.expected)
    transaction = _transaction_length(data)
    kills: list[tuple[str, float]] = []
    attempts = 0
    wanted_inside = max(1, (REBUILD_KILLS * 4) // 5)
    while len(kills) < REBUILD_KILLS or sum(what == "in transaction" for what, _ in kills) < wanted_inside:
        attempts += 1
        assert attempts <= 3 * REBUILD_KILLS + 4, f"kills {kills} after {attempts} attempts"
        if attempts > 1 and rng.random() < 0.4:
            world.grow(rng, entries=rng.randint(1, 4), sizes=(1, 60))
        if rng.random() < 0.3 and not any(data.index_dir.glob("*.json")):
            node = open_node(data)  # a snapshot for the rebuild to drop
            node.load()
            node.store.close()
        after_commit = bool(kills) and rng.random() < 0.15
        killed = _kill_rebuild(data, rng, transaction, after_commit)
        if killed is None:  # it finished first
            continue
        kills.append((killed[0], round(killed[1], 3)))
        # The replay is one transaction: killed, it leaves the projection as it was (or, committed, equal).
        read_log(data)
        assert_same_projection(dump_projection(data), world.expected, f"after a rebuild killed {killed}")
        check_snapshot(data)
        check_index(data, tmp_path)
        done = run_rebuild(data)
        assert done.returncode == 0, done.stderr[-3000:]
        assert_same_projection(dump_projection(data), world.expected, "after the next rebuild")
    verify_store(data, tmp_path, rebuild=True, expected=world.expected)
    inside = sum(what == "in transaction" for what, _ in kills)
    print(
        f"{len(kills)} rebuild kills in {attempts} attempts, {inside} inside its replay transaction "
        f"(held about {transaction:.2f} s): {kills}"
    )


# ---- snapshot files: derived data that must never cause a wrong answer ------------------


def test_an_older_snapshot_written_late_never_pairs_with_a_newer_position(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two publications of one collection's segment at once must not leave one segment under the
    other's position.

    The first publishes a segment at position P1 and is slow; the second
    publishes a newer one at P2 > P1 and finishes. If the first then goes
    on, a restart must still answer as the log says.
    """
    rng = random.Random(7)
    world = World(tmp_path)
    world.grow(rng, entries=4, sizes=(50, 80))
    node = open_node(world.data)
    node.load()
    acme = world.writers["acme"]
    kept, dropped = [f"{random.Random(s).getrandbits(256):064x}" for s in (1, 2)]
    node.submit(
        COLLECTION,
        world.envelope(acme, BATCH_TYPE, lambda h: batch_payload(h, "acme", [Addition("pdq", dropped)])),
    )
    real_publish = SnapshotFiles.publish
    first_opened, finish_first = threading.Event(), threading.Event()

    def slow_publish(self: SnapshotFiles, collection: str, signal: str, position: int, segment: Any) -> bool:
        if threading.current_thread().name == "first-snapshot" and not first_opened.is_set():
            first_opened.set()
            finish_first.wait(10)
        return real_publish(self, collection, signal, position, segment)

    monkeypatch.setattr(SnapshotFiles, "publish", slow_publish)
    failures: list[BaseException] = []

    def first() -> None:
        try:
            node.indexes.snapshot(COLLECTION)  # the segment at P1: `dropped` listed, `kept` not
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=first, name="first-snapshot")
    thread.start()
    assert first_opened.wait(10)
    # One entry swaps the two hashes: the live count stays the same.
    node.submit(
        COLLECTION,
        world.envelope(
            acme,
            BATCH_TYPE,
            lambda h: batch_payload(h, "acme", [Addition("pdq", kept)], [Removal("pdq", dropped)]),
        ),
    )
    node.indexes.snapshot(COLLECTION)  # the segment at P2
    finish_first.set()
    thread.join()
    monkeypatch.setattr(SnapshotFiles, "publish", real_publish)
    node.indexes.close()
    node.store.close()

    reopened = open_node(world.data)
    reopened.load()
    answers = node_lookup(reopened, [COLLECTION], [(PDQ, kept), (PDQ, dropped)], 0)
    reopened.store.close()
    print(f"the slow first write ended with {failures!r}")
    assert [[m.hash for m in matches] for matches in answers] == [[kept], []], (
        "after two overlapping snapshot writes, a restart answers from the older codes "
        f"under the newer position: {check_snapshot_message(world.data)}"
    )


def check_snapshot_message(data: DataDir) -> str:
    try:
        return check_snapshot(data)
    except AssertionError as exc:
        return str(exc)


def test_an_empty_snapshot_file_is_ignored(tmp_path: Path) -> None:
    """index/ is derived data (config.py: "safe to delete"): a damaged snapshot is ignored, whatever the damage."""
    rng = random.Random(3)
    world = World(tmp_path)
    world.grow(rng, entries=3, sizes=(30, 60))
    node = open_node(world.data)
    node.load()  # builds from the store and saves a snapshot
    node.store.close()
    codes_file = next(world.data.index_dir.glob("*/codes.npy"))
    codes_file.write_bytes(b"")  # what a crash can leave where the file's data was not yet on disk
    try:
        check_index(world.data, tmp_path)
    except EOFError as exc:  # not OSError or ValueError: SnapshotFiles.load lets it through
        pytest.fail(f"an empty snapshot file stops the index load (the hub would never be ready): {exc!r}")
