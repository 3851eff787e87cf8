"""The hub never signs two histories (design §6): its last signed checkpoint is kept outside the
database, and a log that no longer extends it is refused at start and before every signing.

Each fault is made for real: a stored tree-hash row is changed in the SQLite file, the WAL of a
killed writer is cut short, a database is rolled back to an older copy.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from federation.checkpoint import open_note
from federation.checkpoint_record import HistoryMismatch
from federation.client import HubClient
from federation.config import DataDir
from federation.hub import open_node
from federation.node import Node
from tests.conftest import Federation
from tests.faults import REPO, child_env, free_port, start_hashfed, wait_exit
from tests.helpers import (
    assert_problem,
    batch_doc,
    database_sql,
    envelope,
    item,
    on_postgres,
    open_hub,
    pdq,
)


def grow(node: Node, federation: Federation, count: int, start: int = 0) -> None:
    for seed in range(start, start + count):
        doc = batch_doc("acme", [item("pdq", pdq(seed))])
        node.submit("main", envelope(federation.members["acme"], doc))


def change_tree_row(data: DataDir, level: int, index: int) -> None:
    [(changed,)] = database_sql(
        data,
        "UPDATE tree SET hash = ? WHERE collection = 'main' AND level = ? AND idx = ?",
        (bytes(32), level, index),
    )
    assert changed == 1


def serve_refusal(federation: Federation, tmp_path: Path) -> tuple[int | None, str]:
    """Start ``hashfed serve`` on the data dir: its exit status (None: it kept running) and its output."""
    log = tmp_path / "serve.log"
    proc = start_hashfed("serve", str(federation.data.path), "--port", str(free_port()), log=log)
    return wait_exit(proc, 20), log.read_text()


def test_signing_records_the_checkpoint_durably_before_answering(federation: Federation) -> None:
    node = open_node(federation.data)
    grow(node, federation, 3)
    note = node.checkpoint("main")
    recorded = (federation.data.signed_dir / "main.note").read_text()
    assert recorded == note
    assert open_note(recorded, federation.hub.verifier).size == node.store.log_size("main")
    assert (federation.data.signed_dir / "main.note").stat().st_mode & 0o077 == 0


def test_a_changed_tree_row_stops_signing_and_start(federation: Federation, tmp_path: Path) -> None:
    node = open_node(federation.data)
    grow(node, federation, 5)
    signed = open_note(node.checkpoint("main"), federation.hub.verifier)
    assert signed.size == 7
    node.store.close()

    change_tree_row(federation.data, 1, 2)  # entries 4 and 5: part of the signed root

    restarted = open_node(federation.data)
    with pytest.raises(HistoryMismatch, match="already signed"):
        restarted.check_signed_history()
    grow(restarted, federation, 1, start=100)
    with pytest.raises(HistoryMismatch, match="does not extend the checkpoint of 7 entries"):
        restarted.checkpoint("main")
    assert (
        open_note((federation.data.signed_dir / "main.note").read_text(), federation.hub.verifier) == signed
    )
    restarted.store.close()

    status, output = serve_refusal(federation, tmp_path)
    assert status == 1, output
    assert "does not extend the checkpoint of 7 entries" in output
    assert "Traceback" not in output
    assert "Restoring from a backup" in output


def test_a_log_cut_shorter_than_its_signed_checkpoint_is_refused(
    federation: Federation, tmp_path: Path
) -> None:
    """The WAL of a killed writer loses its last transactions; the hub had already published them."""
    if on_postgres(federation.data):
        pytest.skip("cuts an SQLite write-ahead log; a PostgreSQL backup restored too early is the next test")
    script = textwrap.dedent(
        """
        import os, sys
        from pathlib import Path
        from federation.config import DataDir
        from federation.hub import open_node
        from federation.keys import SignerKey
        from tests.test_signed_history import grow_to
        data = DataDir(Path(sys.argv[1]))
        acme = SignerKey.parse(Path(sys.argv[2]).read_text())
        node = open_node(data)
        grow_to(node, acme, 10)
        node.store._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        grow_to(node, acme, 15)
        print(node.checkpoint("main"), flush=True)
        os._exit(0)  # like a crash: the WAL is neither checkpointed nor removed
        """
    )
    key_file = tmp_path / "acme.key"
    key_file.write_text(federation.members["acme"].encode())
    ran = subprocess.run(
        [sys.executable, "-c", script, str(federation.data.path), str(key_file)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(),
        timeout=120,
    )
    assert ran.returncode == 0, ran.stderr
    assert open_note(ran.stdout.strip() + "\n", federation.hub.verifier).size == 15
    wal = federation.data.database.with_name("hub.sqlite3-wal")
    assert wal.stat().st_size > 0
    with open(wal, "r+b") as handle:
        handle.truncate(0)

    status, output = serve_refusal(federation, tmp_path)
    assert status == 1, output
    assert "holds 10 entries, but this hub already signed a checkpoint of 15 entries" in output
    assert "Traceback" not in output

    node = open_node(federation.data)
    assert node.store.log_size("main") == 10
    with pytest.raises(HistoryMismatch):
        node.checkpoint("main")


def test_restoring_a_backup_at_or_after_the_signed_checkpoint_serves_again(
    federation: Federation, tmp_path: Path
) -> None:
    """Backups as docs/operations.md takes them: SQLite's online backup, or pg_dump and pg_restore."""
    url = federation.data.config().database
    node = open_node(federation.data)

    def back_up(backup: Path) -> None:
        if on_postgres(federation.data):
            subprocess.run(["pg_dump", "--format=custom", f"--file={backup}", url], check=True)
        else:
            database_sql(federation.data, "VACUUM INTO ?", (str(backup),))

    def restore(backup: Path) -> None:
        if on_postgres(federation.data):
            subprocess.run(
                ["pg_restore", "--clean", "--if-exists", f"--dbname={url}", str(backup)], check=True
            )
            return
        federation.data.database.with_name("hub.sqlite3-wal").unlink(missing_ok=True)
        federation.data.database.with_name("hub.sqlite3-shm").unlink(missing_ok=True)
        shutil.copy(backup, federation.data.database)

    grow(node, federation, 3)
    node.checkpoint("main")
    older, newer = tmp_path / "older.backup", tmp_path / "newer.backup"
    back_up(older)
    grow(node, federation, 2, start=10)
    node.checkpoint("main")
    back_up(newer)
    node.store.close()

    restore(older)  # taken before the last signed checkpoint: serving from it would fork the log
    refused = open_node(federation.data)
    with pytest.raises(
        HistoryMismatch, match="holds 5 entries, but this hub already signed a checkpoint of 7"
    ):
        refused.check_signed_history()
    refused.store.close()

    restore(newer)
    node = open_node(federation.data)
    node.check_signed_history()
    grow(node, federation, 1, start=20)
    assert open_note(node.checkpoint("main"), federation.hub.verifier).size == 8


def grow_to(node: Node, signer: object, size: int) -> None:
    """Submit one-hash batches signed by ``signer`` until the log of ``main`` has ``size`` entries."""
    from federation.keys import SignerKey

    assert isinstance(signer, SignerKey)
    seed = 0
    while node.store.log_size("main") < size:
        seed += 1
        node.submit("main", envelope(signer, batch_doc("acme", [item("pdq", pdq(1000 + seed))])))


async def test_the_checkpoint_endpoint_refuses_to_sign_over_a_changed_tree(
    federation: Federation, hub_server: TestServer, clients: dict[str, HubClient]
) -> None:
    session_hub = await open_hub(federation, hub_server, clients, aiohttp.ClientSession())
    try:
        for seed in range(5):
            await session_hub.submit("acme", batch_doc("acme", [item("pdq", pdq(seed))]))
        assert (await session_hub.checkpoint()).size == 7
        change_tree_row(federation.data, 1, 2)
        await session_hub.submit("acme", batch_doc("acme", [item("pdq", pdq(99))]))
        reply = await session_hub.call("GET", "/v1/collections/main/checkpoint")
        body = assert_problem(reply, 503, "signing-refused")
        assert "does not extend the checkpoint of 7 entries" in body["detail"]
    finally:
        await session_hub.session.close()
