"""A full or read-only disk, made for real: a small tmpfs holds the hub's data directory.

Writes are refused with problems that name storage (507 full, 503 read-only, with Retry-After),
nothing half-written stays, reads, lookups and proofs go on, and writes are accepted again as
soon as space (or write access) is back, without a restart. Snapshots are optional work: a
disk that cannot take them never keeps a hub from becoming ready or from stopping cleanly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from federation.admin import change_membership, init_hub
from federation.config import DataDir
from federation.durable import write_atomically
from federation.envelope import Envelope, Grant
from federation.hub import create_app, open_node
from federation.keys import SignerKey
from tests.faults import (
    ext4_error,
    ext4_filesystem,
    fill,
    free_port,
    hashfed,
    remount,
    small_filesystem,
    start_hashfed,
    wait_exit,
    wait_until_ready,
)
from tests.helpers import COLLECTION, Hub, assert_problem, batch_doc, envelope, item, pdq, wait_ready

MiB = 1024 * 1024


@dataclasses.dataclass
class SmallDiskHub:
    mount: Path
    data: DataDir
    members: dict[str, SignerKey]


def make_hub(mount: Path, reserve: int) -> SmallDiskHub:
    """A hub made on the big disk (``hashfed init`` keeps the default reserve), then moved onto ``mount``."""
    made = DataDir(mount.parent / f"{mount.name}-made")
    init_hub(made.path, name="testhub", federation="testfed", collection=COLLECTION)
    write_atomically(made.config_file, dataclasses.replace(made.config(), min_free_bytes=reserve).to_toml())
    data = DataDir(mount / "hub")
    shutil.copytree(made.path, data.path)
    members = {name: SignerKey.generate(name) for name in ("acme", "reader")}
    change_membership(
        data,
        COLLECTION,
        grant=[
            Grant(members["acme"].verifier, frozenset({"read", "write"})),
            Grant(members["reader"].verifier, frozenset({"read"})),
        ],
    )
    return SmallDiskHub(mount, data, members)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "disk", "24m") as mount:
        yield mount


async def serving(small: SmallDiskHub) -> tuple[TestServer, Hub]:
    server = TestServer(create_app(open_node(small.data), small.data.config()), host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    hub = Hub(str(server.make_url("")), small.data, small.data.signer(), small.members, {}, session)
    await wait_ready(hub)
    return server, hub


async def stop(server: TestServer, hub: Hub) -> None:
    await hub.session.close()
    await server.close()


def big_batch(seed: int, count: int) -> dict[str, object]:
    return batch_doc("acme", [item("pdq", pdq(seed * 100_000 + n), ["label"] * 4) for n in range(count)])


async def test_a_full_disk_answers_507_keeps_reads_and_recovers_without_a_restart(disk: Path) -> None:
    small = make_hub(disk, reserve=0)  # no reserve: SQLite itself meets the full disk
    server, hub = await serving(small)
    try:
        first = await hub.submit("acme", batch_doc("acme", [item("pdq", pdq(1))]))
        before = await hub.observe([("pdq", pdq(1))])
        filler = fill(disk)
        reply = await hub.post(_signed(hub, big_batch(2, 3000)))
        body = assert_problem(reply, 507, "storage-full")
        assert "is full" in body["detail"] and "nothing was written" in body["detail"]
        assert reply.headers["Retry-After"] == "60"
        assert await hub.observe([("pdq", pdq(1))]) == before  # reads, lookups, checkpoint unchanged
        proof = await hub.call(
            "GET", "/v1/collections/main/proof/inclusion", "reader", query=f"index={first}&size=3"
        )
        assert proof.status == 200, proof.text

        filler.unlink()
        index = await hub.submit("acme", big_batch(3, 3000))  # a large batch, at once, no restart
        assert index == first + 1
        assert (await hub.matches([("pdq", pdq(300_000 + 17))]))[0][0]["distance"] == 0
    finally:
        await stop(server, hub)


async def test_writes_stop_at_the_reserve_and_resume_when_space_is_freed(disk: Path) -> None:
    small = make_hub(disk, reserve=4 * MiB)
    server, hub = await serving(small)
    try:
        filler = fill(disk, keep_free=3 * MiB)
        reply = await hub.post(_signed(hub, batch_doc("acme", [item("pdq", pdq(5))])))
        body = assert_problem(reply, 507, "storage-full")
        assert "below its reserve of 4,194,304" in body["detail"]
        assert "min_free_bytes" in body["detail"]
        filler.unlink()
        await hub.submit("acme", batch_doc("acme", [item("pdq", pdq(5))]))
    finally:
        await stop(server, hub)


async def test_a_file_system_turned_read_only_answers_503_and_keeps_reads(tmp_path: Path) -> None:
    """ext4 with ``errors=remount-ro`` after an error: the hub's own open files can no longer be written."""
    with ext4_filesystem(tmp_path / "ext4") as device:
        small = make_hub(tmp_path / "ext4", reserve=0)
        server, hub = await serving(small)
        try:
            await hub.submit("acme", batch_doc("acme", [item("pdq", pdq(7))]))
            before = await hub.observe([("pdq", pdq(7))])
            ext4_error(device)
            reply = await hub.post(_signed(hub, batch_doc("acme", [item("pdq", pdq(8))])))
            body = assert_problem(reply, 503, "storage-read-only")
            assert "read-only" in body["detail"] and reply.headers["Retry-After"] == "60"
            assert await hub.observe([("pdq", pdq(7))]) == before
        finally:
            await stop(server, hub)


def test_serve_on_a_read_only_or_full_data_dir_says_so_in_one_line(disk: Path) -> None:
    small = make_hub(disk, reserve=4 * MiB)
    filler = fill(disk, keep_free=2 * MiB)
    done = hashfed("serve", str(small.data.path), "--port", str(free_port()))
    assert done.returncode == 2
    assert "below the hub's reserve" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    filler.unlink()

    remount(disk, ["ro"])
    try:
        done = hashfed("serve", str(small.data.path), "--port", str(free_port()))
    finally:
        remount(disk, ["rw"])
    assert done.returncode == 2
    assert "is read-only" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_snapshots_that_cannot_be_written_never_block_readiness_or_a_clean_stop(
    disk: Path, tmp_path: Path
) -> None:
    small = make_hub(disk, reserve=0)
    node = open_node(small.data)
    for seed in range(3):
        node.submit(COLLECTION, _envelope(small, big_batch(seed, 2000)))
    node.store.close()
    index_dir = small.data.index_dir
    index_dir.mkdir(exist_ok=True)
    with small_filesystem(index_dir, "4m"):
        remount(index_dir, ["ro"])  # the index directory alone cannot be written
        log = tmp_path / "serve.log"
        port = free_port()
        proc = start_hashfed("serve", str(small.data.path), "--port", str(port), log=log)
        warning = "could not save the pdq index snapshot of main"
        try:
            await wait_until_ready(f"http://127.0.0.1:{port}", proc, log)
            # Any worker may answer ready first; the one that writes snapshots warns once its build is done.
            for _ in range(600):
                if warning in log.read_text():
                    break
                await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            status = wait_exit(proc, 60)
        assert status == 0, log.read_text()
        assert warning in log.read_text()
        assert list(index_dir.iterdir()) == []

        remount(index_dir, ["rw"])
        node = open_node(small.data)
        node.load()  # the build fails to save again (now it can): then a retry saves it
        node.indexes.retry_snapshots()
        assert (index_dir / "main.pdq.json").exists()
        node.indexes.close()  # it maps the segment's files: let go before the filesystem is unmounted
        node.store.close()


def test_rebuild_refuses_before_deleting_anything_when_it_cannot_finish(disk: Path) -> None:
    small = make_hub(disk, reserve=0)
    node = open_node(small.data)
    for seed in range(3):
        node.submit(COLLECTION, _envelope(small, big_batch(seed, 2000)))
    node.load()
    node.indexes.snapshot_all()
    node.store.close()
    snapshots = sorted(path.name for path in small.data.index_dir.iterdir())
    assert "main.pdq.json" in snapshots
    database_size = small.data.database.stat().st_size
    filler = fill(disk, keep_free=database_size // 2)
    done = hashfed("rebuild", str(small.data.path))
    assert done.returncode == 2, done.stderr
    assert "free space first; nothing was changed" in done.stderr
    assert sorted(path.name for path in small.data.index_dir.iterdir()) == snapshots
    filler.unlink()
    done = hashfed("rebuild", str(small.data.path))
    assert done.returncode == 0, done.stderr


async def test_mirroring_into_a_full_directory_says_so_in_one_line(disk: Path, tmp_path: Path) -> None:
    small = make_hub(tmp_path, reserve=0)  # the hub on the big disk, the mirror on the small one
    node = open_node(small.data)
    for seed in range(4):
        node.submit(COLLECTION, _envelope(small, big_batch(seed, 3000)))
    node.store.close()
    server, hub = await serving(small)
    try:
        fill(disk, keep_free=1 * MiB)
        key_file = tmp_path / "reader.key"
        key_file.write_text(small.members["reader"].encode())
        key_file.chmod(0o600)
        pin = small.data.verifier_file.read_text().strip()
        done = await _to_thread_hashfed(
            "mirror",
            "--hub",
            hub.url,
            "--key",
            str(key_file),
            "--collection",
            COLLECTION,
            "--pin",
            pin,
            str(disk / "mirror"),
        )
        assert done.returncode == 1, done.stderr
        errors = [line for line in done.stderr.splitlines() if "error" in line]
        assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "the disk holding the database is full" in errors[0]
    finally:
        await stop(server, hub)


def _envelope(small: SmallDiskHub, doc: dict[str, object]) -> Envelope:
    return envelope(small.members["acme"], doc)


def _signed(hub: Hub, doc: dict[str, object]) -> Envelope:
    return envelope(hub.members["acme"], doc)


async def _to_thread_hashfed(*args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(hashfed, *args)
