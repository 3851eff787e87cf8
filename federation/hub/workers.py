"""``hashfed serve DIR --workers N``: N processes serving one hub on one port, over one SQLite log.

One Python process spends its CPU time per request on parsing, signatures
and JSON, not on the index; more processes use more cores. The supervisor
(this process) checks the data directory, holds its lock and starts N
workers. Each worker is a whole hub over the same database:

* it listens on the same port with ``SO_REUSEPORT``, and the kernel spreads
  connections across the workers;
* appends are serialised by SQLite's write lock, so log indexes never clash
  and a signer's ``seq`` is checked inside the append transaction;
* its index follows the log through the one apply path, and a search first
  compares the log's durable size with its own position (no polling
  delay), so a lookup that starts after any worker's 2xx reflects that entry;
  entries, proofs and checkpoints are read from the database as it is;
* replay protection, rate limits and console sessions live in shared state
  (:mod:`.shared_guard`), so a signature used at one worker is refused at all;
* worker 0 alone pulls from peers and writes index snapshots, which all read.

A worker that dies is started again; SIGINT or SIGTERM stops them all, and
workers whose supervisor was killed outright stop by themselves.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from ..config import DataDir
from ..dirlock import DirectoryLock
from .logs import configure_logging
from .metrics import MULTIPROCESS_ENV
from .shared_guard import STATE_FILE, create_state

METRICS_DIR = "metrics-workers"
RESTART_PAUSE = (1.0, 30.0)
"""First and longest pause before starting a worker again after it died (doubling in between)."""
STOP_GRACE_SECONDS = 30.0
log = logging.getLogger("hashfed.hub")


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT and never listening: it fixes port 0 to one
    port for every worker and keeps other programs off it; it receives no connections itself."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    reserved = socket.socket(family, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


def serve_workers(data: DataDir, host: str | None, port: int | None, workers: int, log_format: str) -> None:
    """Supervise ``workers`` worker processes until SIGINT or SIGTERM."""
    from .server import check_storage_for_serving, open_node, tls_context

    config = data.config()
    check_storage_for_serving(data, config)
    lock = DirectoryLock(data.path)
    lock.acquire()
    try:
        node = open_node(data, searchable=False)
        try:
            node.check_signed_history()
        finally:
            node.store.close()
        configure_logging(log_format)
        tls_context(data, config)  # a bad certificate stops the start before any worker runs
        host = host or config.host
        reserved = reserve_port(host, port if port is not None else config.port)
        chosen = int(reserved.getsockname()[1])
        create_state(data.path / STATE_FILE)
        _fresh_metrics_dir(data.path / METRICS_DIR)
        Supervisor(data, host, chosen, workers, log_format).run()
        reserved.close()
    finally:
        lock.release()


def _fresh_metrics_dir(path: Path) -> None:
    """prometheus-client's multiprocess directory, emptied: files of earlier workers would be summed in."""
    if MULTIPROCESS_ENV in os.environ:
        return  # the operator chose one
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(mode=0o700)
    os.environ[MULTIPROCESS_ENV] = str(path)


class Supervisor:
    def __init__(self, data: DataDir, host: str, port: int, workers: int, log_format: str) -> None:
        self.data = data
        self.host = host
        self.port = port
        self.workers = workers
        self.log_format = log_format
        self.context = multiprocessing.get_context("spawn")
        self.processes: dict[int, BaseProcess] = {}
        self.pauses: dict[int, float] = {}
        self.stopping = False

    def start(self, number: int) -> None:
        process = self.context.Process(
            target=run_worker,
            args=(str(self.data.path), self.host, self.port, number, self.log_format),
            name=f"hashfed-worker-{number}",
        )
        process.start()
        self.processes[number] = process
        log.info("worker %d started (pid %d)", number, process.pid)

    def run(self) -> None:
        def stop(signum: int, frame: object) -> None:
            self.stopping = True

        previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("serving with %d workers on %s:%d", self.workers, self.host, self.port)
            for number in range(self.workers):
                self.start(number)
            while not self.stopping:
                time.sleep(0.2)
                self._restart_the_dead()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._stop_all()

    def _restart_the_dead(self) -> None:
        for number, process in list(self.processes.items()):
            if process.is_alive() or self.stopping:
                continue
            _forget_metrics(process)
            pause = self.pauses.get(number, RESTART_PAUSE[0])
            log.error(
                "worker %d (pid %s) exited with status %s; starting it again in %.0f s",
                number,
                process.pid,
                process.exitcode,
                pause,
            )
            self.pauses[number] = min(pause * 2, RESTART_PAUSE[1])
            deadline = time.monotonic() + pause
            while time.monotonic() < deadline and not self.stopping:
                time.sleep(0.1)
            if not self.stopping:
                self.start(number)

    def _stop_all(self) -> None:
        log.info("stopping %d workers: finishing requests in progress", len(self.processes))
        for process in self.processes.values():
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for process in self.processes.values():
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning(
                    "worker %s did not stop within %.0f s; killing it", process.name, STOP_GRACE_SECONDS
                )
                process.kill()
                process.join()
            _forget_metrics(process)


def _forget_metrics(process: BaseProcess) -> None:
    if MULTIPROCESS_ENV in os.environ and process.pid is not None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


def watch_supervisor(supervisor: int, interval: float = 1.0) -> None:
    """Stop this worker (SIGTERM to itself: requests in progress finish) once its supervisor is gone.

    A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its
    workers; without this they would keep serving, unsupervised, on its port.
    """

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(interval)
        log.error("the supervisor (pid %d) is gone; this worker stops", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="hashfed-supervisor-watch", daemon=True).start()


def run_worker(path: str, host: str, port: int, number: int, log_format: str) -> None:
    """One worker: a whole hub over the shared database, listening with SO_REUSEPORT (a child process)."""
    import asyncio

    from ..console.access import ConsoleAccess
    from .app import create_app
    from .server import SWITCH_INTERVAL, _serve_until_signalled, open_node, tls_context
    from .shared_guard import SharedRequestGuard, SharedState

    configure_logging(log_format)
    watch_supervisor(os.getppid())
    data = DataDir(Path(path))
    config = data.config()
    sys.setswitchinterval(SWITCH_INTERVAL)
    node = open_node(data)
    node.indexes.external_poll = 0.0
    node.indexes.writes_snapshots = number == 0
    shared = SharedState(data.path / STATE_FILE)
    # On PostgreSQL, replicas on other machines answer too: the database keeps signatures and rate buckets.
    guard = (
        None if node.store.shared else SharedRequestGuard(shared, config.rate_limit_per_second, config.burst)
    )
    app = create_app(
        node,
        config,
        ConsoleAccess(data.console_tokens_file, shared),
        guard=guard,
        pulls_peers=number == 0,
        worker=number,
    )
    asyncio.run(_serve_until_signalled(app, config, host, port, tls_context(data, config), reuse_port=True))
    shared.close()
