"""Replicas benchmark: one hub on SQLite against the same hub on PostgreSQL with one and two replicas.

    python -m benchmarks.replicas                                  # 1,000,000 hashes, starts its own server
    python -m benchmarks.replicas --database postgresql://u@host/db --write-docs

Each setup is a fresh hub, each replica one process (``hashfed serve
--workers 1``), all on this machine with the PostgreSQL server:

* **ingest**: ``--size`` PDQ hashes (uniform random codes) submitted over
  HTTP in batches of 10,000, by one client per replica (each its own
  member), every batch acknowledged before the next;
* **lookups**: batched (4 connections of 1,000 hashes) and single-hash (32
  connections) runs from the load generator of :mod:`benchmarks.workers`,
  its connections spread over the replicas;
* **visibility** (two replicas): a hash submitted to one replica, then
  looked up at the other at once, again and again until found; the time
  from the 2xx to the first answer that holds it.

Each PostgreSQL setup gets a fresh database on the server ``--database``
(or ``HASHFED_BENCH_POSTGRES``) names, which must allow CREATE DATABASE;
without one it starts a throw-away server with Debian's ``initdb`` (as the
tests do), with ``fsync`` off. The report says which.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import DOCS, free_port, hexes, serving, write_docs_section
from benchmarks.corpus import make_corpus
from benchmarks.load import percentile
from benchmarks.workers import measure, until_ready
from federation.admin import change_membership, init_hub
from federation.client import HubClient
from federation.config import DataDir
from federation.envelope import Addition, Grant
from federation.keys import SignerKey
from tests.postgres_server import PostgresServer, start_postgres

COLLECTION = "main"
BATCH = 10_000
ENVIRONMENT = "HASHFED_BENCH_POSTGRES"


def make_hub(directory: Path, database: str, members: list[SignerKey]) -> DataDir:
    init_hub(directory, name="bench-replicas", federation="bench", collection=COLLECTION, database=database)
    data = DataDir(directory)
    change_membership(
        data, COLLECTION, grant=[Grant(m.verifier, frozenset({"read", "write"})) for m in members]
    )
    return data


async def ingest(urls: list[str], writers: list[SignerKey], codes: list[str]) -> float:
    """Seconds to submit ``codes`` in batches, one client per replica, each batch acknowledged in turn."""
    shares = [codes[number :: len(urls)] for number in range(len(urls))]

    async def submitter(url: str, writer: SignerKey, share: list[str]) -> None:
        async with HubClient(url, writer, retries=0, timeout=600) as client:
            for start in range(0, len(share), BATCH):
                batch = [Addition("pdq", code) for code in share[start : start + BATCH]]
                await client.submit(COLLECTION, batch)

    began = time.perf_counter()
    await asyncio.gather(*(submitter(u, w, s) for u, w, s in zip(urls, writers, shares, strict=True)))
    return time.perf_counter() - began


async def visibility(
    urls: list[str], writer: SignerKey, reader: SignerKey, rounds: int
) -> list[tuple[float, int]]:
    """Per round: seconds from a 2xx at the first replica to the hash being found at the second, and
    how many lookups that took."""
    found_after: list[tuple[float, int]] = []
    codes = hexes(make_corpus("uniform", rounds, seed=99))  # type: ignore[arg-type]
    async with (
        HubClient(urls[0], writer, retries=0) as submitting,
        HubClient(urls[1], reader, retries=0) as looking,
    ):
        for code in codes:
            await submitting.submit(COLLECTION, [Addition("pdq", code)])
            acknowledged = time.perf_counter()
            lookups = 0
            while True:
                (matches,) = await looking.lookup([("pdq", code)], max_distance=0)
                lookups += 1
                if matches:
                    found_after.append((time.perf_counter() - acknowledged, lookups))
                    break
    return found_after


def run_setup(
    label: str,
    database: str,
    replicas: int,
    scratch: Path,
    codes: list[str],
    queries: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    writers = [SignerKey.generate(f"writer{n}") for n in range(replicas)]
    readers = [SignerKey.generate(f"reader{n}") for n in range(8)]
    data = make_hub(scratch / label / "hub", database, writers + readers)
    directories = [data.path]
    for number in range(1, replicas):  # what an operator copies to another machine
        copy = scratch / label / f"replica-{number}"
        shutil.copytree(data.path, copy)
        directories.append(copy)
    result: dict[str, Any] = {"label": label, "replicas": replicas}
    with ExitStack() as stack:
        ports = [free_port() for _ in directories]
        processes = [
            stack.enter_context(serving(DataDir(d), port, extra=("--workers", "1")))
            for d, port in zip(directories, ports, strict=True)
        ]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url in urls:
            asyncio.run(until_ready(url, 1))
        print(f"  {label}: ingesting {len(codes):,} hashes ...", file=sys.stderr)
        result["ingest_s"] = asyncio.run(ingest(urls, writers, codes))
        keys = [reader.encode() for reader in readers]
        pids = [process.pid for process in processes]
        for run, clients, batch in (("batched", 4, 1000), ("single", 32, 1)):
            print(f"  {label}: {run} lookups ...", file=sys.stderr)
            result[run] = measure(urls, pids, keys, queries, clients, args.seconds, batch)
        if replicas > 1:
            print(f"  {label}: visibility ...", file=sys.stderr)
            result["visible_s"] = asyncio.run(visibility(urls, writers[0], readers[0], args.rounds))
    return result


def report(size: int, rows: list[dict[str, Any]], command: str, server: str) -> str:
    lines = [
        f"One hub of {size:,} PDQ hashes on SQLite, and the same on PostgreSQL served by one and by two "
        "replicas (`hashfed serve --workers 1` each, copies of one data directory), all on this machine "
        f"with the database server ({server}).",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, with `{command}`.",
        "",
        "| setup | ingest (batches of 10,000, one client per replica) | batched lookups (4 clients, 1,000 per request) | "
        "single-hash lookups (32 clients) | p50 / p99 single | hub CPU per single request |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        batched, single = row["batched"], row["single"]
        batched_rate = batched["answered"] * 1000 / batched["seconds"]
        single_rate = single["answered"] / single["seconds"]
        lines.append(
            f"| {row['label']} | {size / row['ingest_s']:,.0f} hashes/s | {batched_rate:,.0f} hashes/s | "
            f"{single_rate:,.0f} requests/s | {percentile(single['latencies'], 50):.1f} / "
            f"{percentile(single['latencies'], 99):.1f} ms | "
            f"{single['hub_cpu'] / max(single['answered'], 1) * 1e6:,.0f} µs |"
        )
    for row in rows:
        if "visible_s" in row:
            visible = sorted(seconds for seconds, _ in row["visible_s"])
            first = sum(1 for _, lookups in row["visible_s"] if lookups == 1)
            lines += [
                "",
                f"{row['label']}: a hash acknowledged by one replica was found by the first lookup at the "
                f"other in {first} of {len(visible)} rounds; from the 2xx to the answer that held it: p50 "
                f"{percentile(visible, 50):.1f} ms, max {visible[-1] * 1000:.1f} ms (one lookup's round "
                "trip: the replica compares the log's size with its index before it answers).",
            ]
    lines += [
        "",
        "Hub CPU is the replicas' user and system time (the database server's is not counted); on this "
        "2-core machine the replicas, the server and the load generator share the same cores.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1_000_000, help="PDQ hashes per hub (default 1,000,000)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each lookup run (default 20)")
    parser.add_argument("--rounds", type=int, default=100, help="visibility rounds (default 100)")
    parser.add_argument(
        "--database", help="a PostgreSQL server's URL (a fresh database is made there for each setup)"
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args()
    command = "python -m benchmarks.replicas " + " ".join(
        "--database URL" if arg.startswith("postgresql") else arg for arg in sys.argv[1:]
    )
    codes = hexes(make_corpus("uniform", args.size, seed=1))  # type: ignore[arg-type]
    queries = hexes(make_corpus("uniform", 10_000, seed=2))  # type: ignore[arg-type]
    rows = []
    given = args.database or os.environ.get(ENVIRONMENT)
    postgres = PostgresServer(given) if given else start_postgres()
    if postgres is None:
        raise SystemExit("no PostgreSQL: pass --database URL (or install Debian's postgresql)")
    try:
        with tempfile.TemporaryDirectory(prefix="hashfed-replicas-bench-") as scratch:
            rows.append(run_setup("SQLite, one process", "", 1, Path(scratch), codes, queries, args))
            for replicas in (1, 2):
                label = f"PostgreSQL, {replicas} replica{'s' if replicas > 1 else ''}"
                with postgres.fresh_database() as url:
                    rows.append(run_setup(label, url, replicas, Path(scratch), codes, queries, args))
    finally:
        postgres.stop()
    server = (
        "the server given"
        if given
        else "a throw-away server started for the run, fsync and synchronous_commit off"
    )
    section = report(args.size, rows, command, server)
    print(section)
    if args.write_docs:
        write_docs_section("bench_replicas", "Replicas on PostgreSQL", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
