"""Workers benchmark: single-hash and batched lookups with 1, 2 and 4 workers serving one hub.

    python -m benchmarks.workers                          # 1,000,000 hashes, 32 clients, 20 s per run
    python -m benchmarks.workers --size 10000000 --write-docs

1. Builds a hub data directory holding ``--size`` PDQ hashes (the realistic
   corpus of :mod:`benchmarks.corpus`) with index snapshots written, and one
   member key per client.
2. For each worker count, serves it with ``hashfed serve --workers N`` and
   waits until every worker answers ready.
3. Drives it from one separate process (the load generator): every request
   is signed before the clock starts, so the generator only sends and reads;
   ``--clients`` connections each keep one request in flight. Its own CPU
   time is measured and reported, since on a small machine it competes with
   the workers for the same cores.
4. Reports requests/s, p50/p99 latency, and the hub's CPU time per request
   (the workers' user and system time from /proc, before and after), then a
   batched run: 4 clients looking up ``--batch`` hashes per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import DOCS, command_line, free_port, serving, write_docs_section
from benchmarks.load import build_or_reuse_hub, percentile
from benchmarks.raw_http import drive, prepared_request
from federation.httpsig import sign_request
from federation.keys import SignerKey

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of ``pids`` so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def worker_pids(supervisor: int) -> list[int]:
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    pids = [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    return pids or [supervisor]  # one worker: the serving process itself


def generate(
    url: str | list[str],
    keys: list[str],
    queries: list[str],
    clients: int,
    seconds: float,
    batch: int,
    out: Any,
) -> None:
    """The load generator (a child process): pre-signed lookups from ``clients`` connections.

    With several URLs (replicas), client ``i`` sends to URL ``i`` modulo their number."""
    urls = [url] if isinstance(url, str) else url
    signers = [SignerKey.parse(text) for text in keys]
    expected = int(seconds * 8_000 / batch) + clients * 10
    prepared: list[tuple[str, list[bytes]]] = []
    for client in range(clients):
        signer = signers[client % len(signers)]
        target = urls[client % len(urls)]
        mine = []
        for number in range(expected // clients + 10):
            start = (client * 7919 + number * batch) % len(queries)
            chosen = [queries[(start + k) % len(queries)] for k in range(batch)]
            body = json.dumps({"queries": [{"type": "pdq", "hash": h} for h in chosen]}).encode()
            headers = {
                "Content-Type": "application/json",
                **sign_request(signer, "POST", "/v1/lookup", "", body),
            }
            mine.append(prepared_request(target, "/v1/lookup", headers, body))
        prepared.append((target, mine))
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    tally = drive(prepared, seconds)
    elapsed = time.perf_counter() - began
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    out.put(
        {
            "latencies": tally.latencies,
            "statuses": tally.statuses,
            "seconds": elapsed,
            "generator_cpu": cpu,
            "by_worker": tally.by_worker,
        }
    )


async def until_ready(url: str, workers: int) -> None:
    ready: set[str] = set()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(12_000):
            try:
                async with session.get(url + "/v1/ready") as response:
                    if response.status == 200:
                        ready.add(response.headers.get("Hashfed-Worker", "0"))
            except aiohttp.ClientError:
                pass
            if len(ready) >= workers:
                return
            await asyncio.sleep(0.05)
    raise SystemExit(f"only {len(ready)} of {workers} workers became ready")


def measure(
    url: str | list[str],
    supervisor: int | list[int],
    keys: list[str],
    queries: list[str],
    clients: int,
    seconds: float,
    batch: int,
) -> dict[str, Any]:
    """Run the load generator against ``url`` (or several); the hub's CPU is that of ``supervisor``'s workers
    (or of each of several supervisors)."""
    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    supervisors = [supervisor] if isinstance(supervisor, int) else supervisor
    pids = [pid for each in supervisors for pid in worker_pids(each)]
    process = context.Process(target=generate, args=(url, keys, queries, clients, seconds, batch, out))
    process.start()
    # the generator signs first; hub CPU is counted over the whole run, signing excluded as best we can
    result: dict[str, Any] | None = None
    hub_before = None
    while result is None:
        if hub_before is None and process.is_alive():
            hub_before = cpu_seconds(pids)
        try:
            result = out.get(timeout=0.5)
        except Exception:
            if not process.is_alive():
                raise SystemExit("the load generator died") from None
    process.join()
    answered = len(result["latencies"])
    result["hub_cpu"] = cpu_seconds(pids) - (hub_before or 0.0)
    result["answered"] = answered
    return result


def report(
    size: int, rows: list[tuple[str, int, int, dict[str, Any]]], clients: int, batch: int, command: str
) -> str:
    lines = [
        f"Lookups against one hub of {size:,} PDQ hashes (realistic corpus of `benchmarks/corpus.py`) served by "
        "`hashfed serve --workers N` on loopback, from a load generator in a separate process whose requests "
        "were all signed before the clock started.",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, with `{command}`.",
        "",
        "| run | workers | requests/s | hashes/s | p50 | p99 | hub CPU per request | generator CPU | answers | share per worker |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, workers, per_request, result in rows:
        answered, seconds = result["answered"], result["seconds"]
        latencies = result["latencies"]
        statuses = ", ".join(f"{code}: {count:,}" for code, count in sorted(result["statuses"].items()))
        total = max(sum(result["by_worker"].values()), 1)
        shares = " / ".join(f"{100 * count / total:.0f}%" for _, count in sorted(result["by_worker"].items()))
        lines.append(
            f"| {label} | {workers} | {answered / seconds:,.0f} | {answered * per_request / seconds:,.0f} | "
            f"{percentile(latencies, 50):.1f} ms | {percentile(latencies, 99):.1f} ms | "
            f"{result['hub_cpu'] / max(answered, 1) * 1e6:,.0f} µs | "
            f"{result['generator_cpu'] / seconds:.2f} cores | {statuses} | {shares} |"
        )
    lines += [
        "",
        f"Single-hash runs use {clients} connections; batched runs 4 connections of {batch:,} hashes per "
        "request. Hub CPU per request is the workers' user and system time divided by the requests answered; "
        "generator CPU is the cores the load generator itself kept busy, on the same machine.",
    ]
    return "\n".join(lines)


def warm_page_cache(directory: Path) -> None:
    """Read every file under ``directory`` once, so that reading a reused hub's segment files from
    disk does not fall on whichever run comes first."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with path.open("rb") as segment:
                while segment.read(1 << 24):
                    pass


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=1_000_000, help="PDQ hashes in the hub (default 1,000,000)"
    )
    parser.add_argument(
        "--clients", type=int, default=32, help="connections for single-hash lookups (default 32)"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each run (default 20)")
    parser.add_argument("--batch", type=int, default=1000, help="hashes per batched lookup (default 1,000)")
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)"
    )
    parser.add_argument(
        "--dir", type=Path, help="keep the hub here, or reuse the one there (default: a temporary directory)"
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args()
    command = command_line("benchmarks.workers", sys.argv[1:])
    members = [SignerKey.generate(f"client{n}") for n in range(8)]
    keys = [member.encode() for member in members]
    rows: list[tuple[str, int, int, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="hashfed-workers-bench-") as scratch:
        directory = args.dir or Path(scratch) / "hub"
        data, queries = build_or_reuse_hub(directory, args.size, "realistic", members)
        warm_page_cache(data.path / "index")
        for label, clients, batch in (("single hash", args.clients, 1), ("batched", 4, args.batch)):
            for workers in args.workers:
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                with serving(data, port, extra=("--workers", str(workers))) as process:
                    asyncio.run(until_ready(url, workers))
                    print(f"  {label}, {workers} workers, {clients} clients ...", file=sys.stderr)
                    result = measure(url, process.pid, keys, queries, clients, args.seconds, batch)
                rows.append((label, workers, batch, result))
    section = report(args.size, rows, args.clients, args.batch, command)
    print(section)
    if args.write_docs:
        write_docs_section("bench_workers", "Workers", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
