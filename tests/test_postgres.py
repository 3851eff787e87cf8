"""The PostgreSQL store's own behaviour: init, whose database it is, migrations, and moving a hub to it.

Against a real PostgreSQL server (see :mod:`tests.postgres_server`); the
storage, API, sync and crash tests run on it too, through the ``database``
fixture.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.admin import init_hub
from federation.client import HubClient, HubError
from federation.config import ConfigError, DataDir
from federation.envelope import Addition
from federation.httpsig import VerifiedRequest, sign_request
from federation.hub import open_node
from federation.hub.limits import RateLimiter, RequestGuard
from federation.hub.replicas import DatabaseRequestGuard
from federation.signals import MD5, PDQ
from federation.store.base import StoreError
from federation.store.postgres import PostgresStore
from federation.store.postgres_schema import LATEST
from tests.faults import free_port, hashfed, start_hashfed, wait_exit, wait_until_ready
from tests.helpers import batch_doc, envelope, item, md5, node_lookup, opinion_doc, pdq
from tests.postgres_server import PostgresServer, start_own_postgres
from tests.sync_helpers import COLLECTION, READ, READ_WRITE, make_hub
from tests.test_limits import admitted_one_by_one, admitted_together


@pytest.fixture
def empty_database(postgres_server: PostgresServer) -> Iterator[str]:
    with postgres_server.fresh_database() as url:
        yield url


def test_init_refuses_a_database_that_holds_another_hubs_log(tmp_path: Path, empty_database: str) -> None:
    init_hub(tmp_path / "first", name="first", federation="fed", collection="main", database=empty_database)
    with pytest.raises(ConfigError, match="belongs to hub first") as refused:
        init_hub(
            tmp_path / "second", name="second", federation="fed", collection="main", database=empty_database
        )
    assert "copy its data directory instead" in str(refused.value)
    assert not (tmp_path / "second").exists()  # nothing was made


def test_a_data_directory_naming_another_hubs_database_is_refused(
    tmp_path: Path, empty_database: str
) -> None:
    init_hub(tmp_path / "first", name="first", federation="fed", collection="main", database=empty_database)
    init_hub(tmp_path / "second", name="second", federation="fed", collection="main")
    other = DataDir(tmp_path / "second")
    other.config_file.write_text(
        other.config_file.read_text().replace('database = ""', f'database = "{empty_database}"')
    )
    with pytest.raises(ConfigError, match="holds hub first's log, not second's"):
        open_node(other)


def test_migrations_run_once_and_a_newer_schema_is_refused(empty_database: str) -> None:
    PostgresStore(empty_database).close()
    PostgresStore(empty_database).close()  # a second open applies nothing again
    with psycopg.connect(empty_database, autocommit=True) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert versions == list(range(1, LATEST + 1))
        conn.execute(
            "INSERT INTO schema_migrations (version, name) VALUES (%s, 'from the future')", (LATEST + 1,)
        )
    with pytest.raises(StoreError, match=f"newer than this hashfed knows \\(version {LATEST}\\)"):
        PostgresStore(empty_database)


def test_request_signatures_are_new_once_across_replicas_and_again_after_they_expire(
    empty_database: str,
) -> None:
    first, second = PostgresStore(empty_database), PostgresStore(empty_database)  # two replicas
    try:
        a, b, c = b"\x01" * 64, b"\x02" * 64, b"\x00" * 64
        assert first.first_uses([a, b, a], 1_000, 1_600) == [None, None, 1_600]  # twice in one batch
        assert second.first_uses([b, c], 1_010, 1_610) == [1_600, None]
        assert first.first_uses([], 1_010, 1_610) == []
        assert second.first_uses([a, c], 1_601, 2_201) == [None, 1_610]  # a expired at 1,600
    finally:
        first.close()
        second.close()


def test_a_keys_tokens_are_one_bucket_across_replicas_refilled_by_the_database_clock(
    empty_database: str,
) -> None:
    first, second = PostgresStore(empty_database), PostgresStore(empty_database)  # two replicas
    try:
        slow = 0.001  # no token comes back while the test runs
        assert first.take_tokens([("b", 5), ("a", 2)], slow, 3) == [(3, 0.0), (2, 1.0)]
        ((granted, left),) = second.take_tokens([("a", 2)], slow, 3)
        assert granted == 1 and left == pytest.approx(0.0, abs=0.01)
        ((granted, left),) = first.take_tokens([("a", 1)], slow, 3)
        assert granted == 0 and left < 1
        assert first.take_tokens([], slow, 3) == []
        fast = 1_000.0  # a full bucket again within a few milliseconds
        time.sleep(0.05)
        assert second.take_tokens([("a", 5)], fast, 3) == [(3, pytest.approx(0.0, abs=0.01))]
    finally:
        first.close()
        second.close()


def test_replicas_charging_the_same_keys_at_once_grant_each_bucket_exactly_once(empty_database: str) -> None:
    stores = [PostgresStore(empty_database), PostgresStore(empty_database)]
    granted: list[tuple[int, int]] = []

    def charge(store: PostgresStore, order: list[str]) -> None:
        for _ in range(20):  # the keys in a different order per thread: locks are still taken in one order
            (first, _), (second, _) = store.take_tokens([(order[0], 3), (order[1], 2)], 0.001, 50)
            granted.append((first, second) if order[0] == "a" else (second, first))

    try:
        threads = [
            threading.Thread(
                target=charge, args=(stores[number % 2], ["a", "b"] if number % 2 else ["b", "a"])
            )
            for number in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        for store in stores:
            store.close()
    assert len(granted) == 80  # every charge answered: no deadlock, no error
    assert sum(a for a, _ in granted) == 50  # of 4 x 20 x 3 asked: the burst, no more (no lost update)
    assert sum(b for _, b in granted) == 50


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), max_size=30), st.integers(1, 4))
def test_admission_in_the_database_refuses_what_one_process_refuses_one_by_one(
    empty_database: str, requests: list[tuple[int, int]], burst: int
) -> None:
    """Replicas' admission (replays, then each key's rate) matches the in-process guard's, request by request."""
    signatures = [bytes([number + 1]) * 64 for number in range(6)]
    verified = [VerifiedRequest(f"key{key}", 0, signatures[number]) for number, key in requests]
    now = int(time.time())
    rate = 0.001  # no token comes back while the test runs
    expected = admitted_one_by_one(RequestGuard(RateLimiter(rate, burst)), verified, now)
    store = PostgresStore(empty_database, pool_size=1)  # its schema, made by the first example
    try:
        with psycopg.connect(empty_database, autocommit=True) as conn:
            conn.execute("TRUNCATE seen_signatures, rate_buckets")
        guard = DatabaseRequestGuard(store, rate, burst)
        assert admitted_together(guard, verified, now) == expected
        assert admitted_together(guard, verified, now) == ["SignatureRefused"] * len(
            verified
        )  # each one seen
    finally:
        store.close()


def test_an_unreachable_database_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"cannot connect to the database postgresql://hashfed:\*\*\*@127.0.0.1:9/"
    ):
        init_hub(
            tmp_path / "hub",
            name="h",
            federation="f",
            collection="main",
            database="postgresql://hashfed:secret@127.0.0.1:9/x",
        )


def test_a_command_whose_database_is_down_says_why_in_one_line(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    with own_postgres.fresh_database() as url:
        hub = make_hub(tmp_path, "hub-d", {"acme": READ_WRITE}, url)
        own_postgres.pause()
        try:
            done = hashfed("member", "list", str(hub.data.path))
        finally:
            own_postgres.resume()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr  # the driver's reason, not the pool's retries until a timeout
    assert lines[0].startswith(
        "hashfed: error: cannot connect to the database postgresql://hashfed@127.0.0.1:"
    )
    assert "Connection refused" in lines[0]


def test_migrate_store_moves_a_hub_to_postgresql_with_the_same_log_roots_and_answers(
    tmp_path: Path, empty_database: str
) -> None:
    hub = make_hub(tmp_path, "hub-m", {"acme": READ_WRITE, "beta": READ_WRITE, "reader": READ})
    node = open_node(hub.data)
    acme, beta = hub.members["acme"], hub.members["beta"]
    node.submit(
        COLLECTION, envelope(acme, batch_doc("acme", [item("pdq", pdq(n), ["a"]) for n in range(40)]))
    )
    node.submit(COLLECTION, envelope(beta, batch_doc("beta", [item("pdq", pdq(3)), item("md5", md5(1))])))
    node.submit(COLLECTION, envelope(acme, batch_doc("acme", remove=[("pdq", pdq(5))])))
    node.submit(COLLECTION, envelope(beta, opinion_doc("beta", [("pdq", pdq(7), "negative")])))
    queries = [(PDQ, pdq(n)) for n in range(0, 40, 3)] + [(MD5, md5(1))]
    answers = node_lookup(node, [COLLECTION], queries, 31)
    note = node.checkpoint(COLLECTION)
    size = node.store.log_size(COLLECTION)
    node.store.close()

    serving = start_hashfed("serve", str(hub.data.path), "--port", "0", log=tmp_path / "serve.log")
    try:
        for _ in range(600):
            if "serving on" in (tmp_path / "serve.log").read_text():
                break
            assert serving.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.05)
        refused = hashfed("migrate-store", str(hub.data.path), "--to", empty_database)
        assert refused.returncode != 0 and "is already serving" in refused.stderr, refused
    finally:
        serving.terminate()
        assert wait_exit(serving, 30) == 0

    moved = hashfed("migrate-store", str(hub.data.path), "--to", empty_database)
    assert moved.returncode == 0, moved.stderr
    assert f"main: {size:,} entries" in moved.stdout and "(checked)" in moved.stdout
    assert hub.data.config().database == empty_database
    assert hub.data.database.exists()  # the SQLite file is kept

    node = open_node(hub.data)
    try:
        assert isinstance(node.store, PostgresStore)
        assert node.store.log_size(COLLECTION) == size
        assert node.checkpoint(COLLECTION) == note  # the same root, and the signed record still extends
        node.load()
        assert node_lookup(node, [COLLECTION], queries, 31) == answers
    finally:
        node.store.close()

    again = hashfed("migrate-store", str(hub.data.path), "--to", empty_database)
    assert again.returncode != 0 and "already keeps its log in PostgreSQL" in again.stderr


def test_migrate_store_refuses_a_database_that_is_not_empty(tmp_path: Path, empty_database: str) -> None:
    init_hub(tmp_path / "other", name="other", federation="fed", collection="main", database=empty_database)
    hub = make_hub(tmp_path, "hub-m", {"acme": READ_WRITE})
    refused = hashfed("migrate-store", str(hub.data.path), "--to", empty_database)
    assert refused.returncode != 0 and "already holds collections" in refused.stderr, refused.stderr
    assert hub.data.config().database == ""  # hub.toml still names the SQLite file


def test_a_bulk_append_leaves_the_planner_knowing_the_tables_are_large(
    tmp_path: Path, empty_database: str
) -> None:
    """Without statistics the per-hash reads of the next append would filter the whole collection."""
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE}, empty_database)
    node = open_node(hub.data)
    node.submit(
        COLLECTION,
        envelope(hub.members["acme"], batch_doc("acme", [item("pdq", pdq(n)) for n in range(6_000)])),
    )
    node.store.close()
    with psycopg.connect(empty_database) as conn:
        (estimate,) = conn.execute("SELECT reltuples FROM pg_class WHERE relname = 'listings'").fetchone()
        plan = "\n".join(
            row[0]
            for row in conn.execute(
                "EXPLAIN SELECT hash, member FROM listings WHERE collection = %s AND type = %s "
                "AND hash IN (%s, %s)",
                (COLLECTION, "pdq", pdq(1), pdq(2)),
            )
        )
    assert estimate >= 6_000
    assert "Filter" not in plan, plan  # each hash is an index condition, not a filter over the collection


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for one test, which the test may shut down and start again."""
    server = start_own_postgres()
    if server is None:
        pytest.skip("needs Debian's postgresql package (initdb, pg_ctl) to run a server a test may stop")
    try:
        yield server
    finally:
        server.stop()


async def test_while_the_database_is_down_requests_answer_503_and_the_hub_recovers_by_itself(
    tmp_path: Path, own_postgres: PostgresServer
) -> None:
    with own_postgres.fresh_database() as url:
        hub = make_hub(tmp_path, "hub-o", {"acme": READ_WRITE, "reader": READ}, url)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = tmp_path / "serve.log"
        proc = start_hashfed("serve", str(hub.data.path), "--port", str(port), "--workers", "1", log=log)
        try:
            await wait_until_ready(base, proc, log)
            async with HubClient(base, hub.members["acme"], retries=0) as acme:
                first = (await acme.submit(COLLECTION, [Addition("pdq", pdq(1))])).index
                own_postgres.pause()
                with pytest.raises(HubError) as refused:
                    await acme.submit(COLLECTION, [Addition("pdq", pdq(2))])
                assert (refused.value.status, refused.value.kind) == (
                    503,
                    "urn:hashfed:problem:storage-failed",
                )
                assert "the database server cannot be reached (postgresql://hashfed@127.0.0.1:" in (
                    refused.value.detail
                )
                body = json.dumps({"queries": [{"type": "pdq", "hash": pdq(1)}]}).encode()
                headers = sign_request(hub.members["reader"], "POST", "/v1/lookup", "", body)
                headers["Content-Type"] = "application/json"
                async with aiohttp.ClientSession() as session:
                    async with session.post(base + "/v1/lookup", data=body, headers=headers) as response:
                        assert response.status == 503
                        assert response.content_type == "application/problem+json"
                        assert response.headers["Retry-After"].isdigit()
                        assert "nothing was written" in (await response.json())["detail"]
                    async with session.get(base + "/v1/ready") as response:
                        assert response.status == 503
                        problem = await response.json()
                        assert problem["type"].endswith(":not-ready")
                        said = problem["detail"]
                        assert "the hub cannot use its storage: the database server cannot be reached" in said
                own_postgres.resume()
                await wait_until_ready(base, proc, log)
                second = (await acme.submit(COLLECTION, [Addition("pdq", pdq(2))])).index
                assert second == first + 1  # the refused submission left nothing behind
                found = await acme.lookup([("pdq", pdq(1)), ("pdq", pdq(2))], max_distance=0)
                assert [[match["hash"] for match in matches] for matches in found] == [[pdq(1)], [pdq(2)]]
        finally:
            proc.send_signal(signal.SIGTERM)
            assert wait_exit(proc, 60) == 0, log.read_text()
    assert "Traceback" not in log.read_text()
