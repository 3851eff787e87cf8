"""A real PostgreSQL server for the tests: the one ``HASHFED_TEST_POSTGRES`` names, or one started here.

Starting one needs Debian's ``postgresql`` package (``initdb`` and
``pg_ctl``). It runs from a temporary directory, listens on 127.0.0.1 only,
with durability settings off (the tests kill hubs, never the server), and
is stopped at the end of the session. Each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg

ENVIRONMENT = "HASHFED_TEST_POSTGRES"


@dataclass
class PostgresServer:
    admin_url: str
    """A URL of the server's maintenance database, for CREATE and DROP DATABASE."""
    data_dir: Path | None = None
    """Set when this session started the server (and must stop it)."""
    run_as: list[str] | None = None
    options: str = ""
    """The server's command-line options, to start it again after :meth:`pause`."""

    def url(self, database: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{database}"

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        name = f"hashfed_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.admin_url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self.data_dir is None:
            return
        self._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def pause(self) -> None:
        """Shut the server down (its clients' connections end), keeping its data for :meth:`resume`."""
        self._pg_ctl("-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._pg_ctl("-l", str(self._own_dir() / "server.log"), "-o", self.options, "-w", "start")

    def _own_dir(self) -> Path:
        if self.data_dir is None:
            raise RuntimeError("only a server these tests started can be stopped and started")
        return self.data_dir

    def _pg_ctl(self, *arguments: str, check: bool = True) -> None:
        subprocess.run(
            [*(self.run_as or []), _binary("pg_ctl"), "-D", str(self._own_dir() / "data"), *arguments],
            check=check,
            capture_output=True,
        )


def _binary(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))), None)
    if found is None:
        raise FileNotFoundError(name)
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_postgres() -> PostgresServer | None:
    """The server to test against; None when there is none and none can be started."""
    if os.environ.get(ENVIRONMENT):
        return PostgresServer(os.environ[ENVIRONMENT])
    return start_own_postgres()


def start_own_postgres() -> PostgresServer | None:
    """A server of its own (one a test may stop); None when Debian's binaries are missing."""
    try:
        initdb = _binary("initdb")
        _binary("pg_ctl")  # resume() and stop() run it
    except FileNotFoundError:
        return None
    run_as: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="hashfed-postgres-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as Debian's postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            return None
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run(
        [
            *run_as,
            initdb,
            "-D",
            str(root / "data"),
            "-A",
            "trust",
            "-U",
            "hashfed",
            "--no-sync",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
    )
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
    )
    server = PostgresServer(f"postgresql://hashfed@127.0.0.1:{port}/postgres", root, run_as, options)
    server.resume()
    return server
