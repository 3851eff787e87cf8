"""End-to-end benchmark of a hub over HTTP: ingest, restart, lookups, visibility.

    python -m benchmarks.bench_hub --size 100000               # quick
    python -m benchmarks.bench_hub --size 10000000 --write-docs  # the coalition-scale run

Builds a hub data directory holding ``--size`` PDQ hashes (the synthetic
corpus of :mod:`benchmarks.corpus`, ingested through the hub's own write path
in signed batches of 100,000), then serves it with ``hashfed serve`` in a
separate process and measures, on loopback:

* cold restart to ready (index loaded from its snapshot, tail replayed);
* lookups/s through ``POST /v1/lookup`` with batches of 1,000 queries;
* lookups/s and p50/p99 latency of single-hash requests from 32 concurrent clients;
* how long after an acknowledged submission a new hash is found, while a
  merge of the large index segment runs;
* the hub process's resident memory (current and peak).

The load generator runs in this process; the hub in its own. Both share the
machine's cores, so the figures are a floor, not a ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from benchmarks.common import DOCS, free_port, hexes, memory_of, serving, wait_ready, write_docs_section
from benchmarks.corpus import make_corpus, make_queries
from federation.admin import change_membership, init_hub
from federation.client import HubClient
from federation.config import DataDir
from federation.envelope import BATCH_TYPE, Addition, Grant, Header, batch_payload, sign_envelope, utc_now
from federation.hub import open_node
from federation.keys import SignerKey, load_signer_file, write_signer_file

COLLECTION = "bench"
BATCH = 100_000


def build_hub(directory: Path, size: int, corpus: str, member: SignerKey) -> tuple[DataDir, float]:
    """A hub data dir with ``size`` PDQ hashes, ingested through Node.submit; returns seconds taken."""
    data = DataDir(directory)
    init_hub(directory, name="bench-hub", federation="bench", collection=COLLECTION)
    change_membership(data, COLLECTION, grant=[Grant(member.verifier, frozenset({"read", "write"}))])
    codes = make_corpus(corpus, size, seed=1)  # type: ignore[arg-type]
    node = open_node(data)
    started = time.perf_counter()
    for seq, begin in enumerate(range(0, size, BATCH), start=1):
        chunk = sorted(set(hexes(codes[begin : begin + BATCH])))
        header = Header("bench", COLLECTION, seq, utc_now())
        payload = batch_payload(header, member.name, [Addition("pdq", h) for h in chunk])
        node.submit(COLLECTION, sign_envelope(member, BATCH_TYPE, payload))
        done = min(begin + BATCH, size)
        rate = done / (time.perf_counter() - started)
        print(f"  ingested {done:,}/{size:,} ({rate:,.0f} hashes/s)", file=sys.stderr)
    took = time.perf_counter() - started
    node.load()
    node.indexes.snapshot_all()
    node.store.close()
    return data, took


@dataclass
class LoadResult:
    requests: int
    queries: int
    seconds: float
    latencies: list[float]
    errors: int

    @property
    def rate(self) -> float:
        return self.queries / self.seconds

    def percentile(self, p: float) -> float:
        return float(np.percentile(self.latencies, p) * 1000) if self.latencies else float("nan")


async def drive(
    url: str, member: SignerKey, queries: list[str], batch: int, clients: int, seconds: float
) -> LoadResult:
    """``clients`` concurrent loops of lookups of ``batch`` queries each, for ``seconds``."""
    latencies: list[float] = []
    counts = {"requests": 0, "queries": 0, "errors": 0}
    deadline = time.perf_counter() + seconds

    async def loop(worker: int, client: HubClient) -> None:
        position = worker * batch
        while time.perf_counter() < deadline:
            chunk = [("pdq", queries[(position + i) % len(queries)]) for i in range(batch)]
            position += batch * clients
            began = time.perf_counter()
            try:
                await client.lookup(chunk)
            except Exception:
                counts["errors"] += 1
                continue
            latencies.append(time.perf_counter() - began)
            counts["requests"] += 1
            counts["queries"] += batch

    clients_made = [HubClient(url, member, retries=0) for _ in range(clients)]
    started = time.perf_counter()
    try:
        await asyncio.gather(*(loop(i, c) for i, c in enumerate(clients_made)))
    finally:
        for client in clients_made:
            await client.close()
    return LoadResult(
        counts["requests"], counts["queries"], time.perf_counter() - started, latencies, counts["errors"]
    )


async def visibility_during_merge(url: str, member: SignerKey, rounds: int = 5) -> list[float]:
    """Seconds from an acknowledged submission to the first lookup that finds it, while merges run."""
    rng = np.random.default_rng(99)
    delays = []
    async with HubClient(url, member, retries=0) as client:
        for _ in range(rounds):
            # 40,000 new hashes overflow the fresh segment and start a background merge.
            flood = hexes(rng.integers(0, 2**63, size=(40_000, 4), dtype=np.uint64))
            await client.submit(COLLECTION, [Addition("pdq", h) for h in flood])
            probe = hexes(rng.integers(0, 2**63, size=(1, 4), dtype=np.uint64))[0]
            await client.submit(COLLECTION, [Addition("pdq", probe)])
            acknowledged = time.perf_counter()
            while not (await client.lookup([("pdq", probe)], max_distance=0))[0]:
                await asyncio.sleep(0.001)
            delays.append(time.perf_counter() - acknowledged)
    return delays


async def measure(
    data: DataDir, member: SignerKey, size: int, corpus: str, seconds: float
) -> dict[str, object]:
    codes = make_corpus(corpus, size, seed=1)  # type: ignore[arg-type]
    queries = hexes(make_queries(corpus, codes, 20_000, seed=2).codes)  # type: ignore[arg-type]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    figures: dict[str, object] = {}
    with serving(data, port) as process:
        figures["ready_s"] = await wait_ready(url)
        figures["rss_ready"], _ = memory_of(process.pid)
        batched = await drive(url, member, queries, 1000, 2, seconds)
        single = await drive(url, member, queries, 1, 32, seconds)
        figures["batched"] = batched
        figures["single"] = single
        figures["rss_served"], _ = memory_of(process.pid)
        figures["visible_s"] = await visibility_during_merge(url, member)
        await until_idle(process.pid)
        figures["rss"], figures["hwm"] = memory_of(process.pid)
    return figures


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def until_idle(pid: int, timeout: float = 120.0) -> None:
    """Wait for the hub's background merges to finish (it uses under 5% of a core for a second)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        if cpu_seconds(pid) - before < 0.05:
            return


def report(size: int, corpus: str, ingest_s: float, figures: dict[str, object], command: str) -> str:
    batched = figures["batched"]
    single = figures["single"]
    assert isinstance(batched, LoadResult) and isinstance(single, LoadResult)
    visible = figures["visible_s"]
    assert isinstance(visible, list)
    rss, hwm = figures["rss"], figures["hwm"]
    rss_ready, rss_served = figures["rss_ready"], figures["rss_served"]
    assert isinstance(rss, int) and isinstance(hwm, int)
    assert isinstance(rss_ready, int) and isinstance(rss_served, int)
    lines = [
        f"### Hub over HTTP: {size:,} PDQ hashes ({corpus} corpus)",
        "",
        f"`{command}` — {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        "load generator and hub share the machine.",
        "",
        "| measure | figure |",
        "|---|---|",
        f"| ingest through the write path (signed batches of 100,000) | {ingest_s:,.1f} s ({size / ingest_s:,.0f} hashes/s) |",
        f"| cold restart to ready (snapshot + tail) | {figures['ready_s']:.2f} s |",
        f"| `POST /v1/lookup`, batches of 1,000, 2 clients | {batched.rate:,.0f} lookups/s, p50 {batched.percentile(50):.0f} ms, p99 {batched.percentile(99):.0f} ms, {batched.errors} errors |",
        f"| single-hash lookups, 32 concurrent clients | {single.rate:,.0f} lookups/s, p50 {single.percentile(50):.1f} ms, p99 {single.percentile(99):.1f} ms, {single.errors} errors |",
        f"| new hash visible after its acknowledgement, during merges | max {max(visible) * 1000:.1f} ms over {len(visible)} rounds |",
        f"| hub resident memory: ready / after the lookup runs / at rest after the merges | "
        f"{rss_ready / 2**30:.2f} / {rss_served / 2**30:.2f} / {rss / 2**30:.2f} GiB |",
        f"| hub peak resident memory (during a merge, two large segments coexist) | {hwm / 2**30:.2f} GiB |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=100_000, help="PDQ hashes in the hub (default 100,000)")
    parser.add_argument("--corpus", choices=("realistic", "uniform"), default="realistic")
    parser.add_argument("--seconds", type=float, default=10.0, help="duration of each load phase")
    parser.add_argument(
        "--dir",
        type=Path,
        help="keep the hub data dir here (default: a temporary one); if it already holds a hub built by an "
        "earlier run, measure that hub again without rebuilding it",
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args()
    command = "python -m benchmarks.bench_hub " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="hashfed-bench-") as scratch:
        directory = args.dir or Path(scratch) / "hub"
        member_file = directory.parent / f"{directory.name}.bencher.key"
        if (directory / "hub.toml").exists() and member_file.exists():
            print(f"measuring the hub already built in {directory}", file=sys.stderr)
            data, member = DataDir(directory), load_signer_file(member_file)
            ingest_s = float(json.loads((directory.parent / f"{directory.name}.ingest.json").read_text()))
        else:
            member = SignerKey.generate("bencher")
            print(f"building a hub with {args.size:,} hashes in {directory}", file=sys.stderr)
            data, ingest_s = build_hub(directory, args.size, args.corpus, member)
            write_signer_file(member, member_file, overwrite=True)
            (directory.parent / f"{directory.name}.ingest.json").write_text(json.dumps(ingest_s))
        figures = asyncio.run(measure(data, member, args.size, args.corpus, args.seconds))
    section = report(args.size, args.corpus, ingest_s, figures, command)
    print(section)
    if args.write_docs:
        write_docs_section("bench_hub", "End to end", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
