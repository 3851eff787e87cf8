"""After a bulk import: batched lookups while the hub still merges what it was just given.

    python -m benchmarks.after_import                       # 1,000,000 hashes
    python -m benchmarks.after_import --size 10000000 --write-docs

What a new user does, timed:

1. ``hashfed init`` of an empty hub (SQLite), one member granted, served with
   ``hashfed serve`` and its defaults (one worker per core).
2. The member submits ``--size`` uniform random PDQ codes in batches of
   10,000 from one client, each batch acknowledged before the next is sent.
3. The moment the last batch is acknowledged, ``--clients`` clients start
   batched lookups (``--batch`` hashes per request, codes from the import)
   for ``--seconds``. Index merges of what was just imported are still
   running then; that window is what this measures.
4. Reports the import rate, lookups/s over the whole window and in each
   5-second part of it, and the hub's memory (PSS of every worker together)
   when the import ended, at its highest during the lookups, and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import command_line, free_port, hexes, serving, write_docs_section
from benchmarks.corpus import make_corpus
from benchmarks.memory import GIB, memory
from benchmarks.workers import until_ready, worker_pids
from federation.admin import change_membership, init_hub
from federation.client import HubClient
from federation.config import DataDir
from federation.envelope import Addition, Grant
from federation.httpsig import sign_request
from federation.keys import SignerKey

COLLECTION = "main"
IMPORT_BATCH = 10_000
WINDOW_SECONDS = 5.0


def hub_pss(supervisor: int) -> int:
    """PSS of every worker of the hub (bytes); the supervisor itself holds no index."""
    total = 0
    for pid in worker_pids(supervisor):
        try:
            total += memory(pid)["Pss"]
        except FileNotFoundError:
            continue
    return total


async def import_codes(url: str, member: SignerKey, codes: list[str]) -> float:
    """Seconds to submit ``codes`` in acknowledged batches, with progress on standard error."""
    began = time.perf_counter()
    async with HubClient(url, member, retries=3, timeout=600) as client:
        for start in range(0, len(codes), IMPORT_BATCH):
            await client.submit(
                COLLECTION, [Addition("pdq", code) for code in codes[start : start + IMPORT_BATCH]]
            )
            done = start + IMPORT_BATCH
            if done % (IMPORT_BATCH * 50) == 0:
                rate = done / (time.perf_counter() - began)
                print(f"  imported {done:,} of {len(codes):,} ({rate:,.0f} hashes/s)", file=sys.stderr)
    return time.perf_counter() - began


async def look_up(
    url: str, member: SignerKey, codes: list[str], clients: int, batch: int, seconds: float
) -> list[tuple[float, int, int]]:
    """``(seconds since the start, hashes, status)`` of every batched lookup answered in the window."""
    answered: list[tuple[float, int, int]] = []
    began = time.perf_counter()

    async def client(number: int, session: aiohttp.ClientSession) -> None:
        start = number * 7919 * batch % len(codes)
        while time.perf_counter() - began < seconds:
            chunk = [codes[(start + k) % len(codes)] for k in range(batch)]
            start = (start + batch * clients) % len(codes)
            body = json.dumps({"queries": [{"type": "pdq", "hash": code} for code in chunk]}).encode()
            headers = {
                "Content-Type": "application/json",
                **sign_request(member, "POST", "/v1/lookup", "", body),
            }
            async with session.post(url + "/v1/lookup", data=body, headers=headers) as response:
                await response.read()
                answered.append((time.perf_counter() - began, batch, response.status))

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(client(number, session) for number in range(clients)))
    return answered


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    member = SignerKey.generate("importer")
    init_hub(directory, name="bench-import", federation="bench", collection=COLLECTION)
    data = DataDir(directory)
    change_membership(data, COLLECTION, grant=[Grant(member.verifier, frozenset({"read", "write"}))])
    codes = hexes(make_corpus("uniform", args.size, seed=7))  # type: ignore[arg-type]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with serving(data, port, stop_timeout=600) as process:
        asyncio.run(until_ready(url, os.cpu_count() or 1))
        imported = asyncio.run(import_codes(url, member, codes))
        at_import = hub_pss(process.pid)
        peak = at_import
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.5):
                peak = max(peak, hub_pss(process.pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            answered = asyncio.run(look_up(url, member, codes, args.clients, args.batch, args.seconds))
        finally:
            done.set()
            sampler.join()
        at_end = hub_pss(process.pid)
    return {
        "imported": imported,
        "answered": answered,
        "at_import": at_import,
        "peak": peak,
        "at_end": at_end,
    }


def report(args: argparse.Namespace, result: dict[str, Any], command: str) -> str:
    answered: list[tuple[float, int, int]] = result["answered"]
    ok = [(when, hashes) for when, hashes, status in answered if status == 200]
    refused = len(answered) - len(ok)
    whole = sum(hashes for _, hashes in ok) / args.seconds
    windows = []
    start = 0.0
    while start < args.seconds:
        end = min(start + WINDOW_SECONDS, args.seconds)
        looked = sum(hashes for when, hashes in ok if start <= when < end)
        windows.append(f"{looked / (end - start):,.0f}")
        start = end
    lines = [
        f"A new hub (SQLite, `hashfed serve` with its defaults: {os.cpu_count()} workers) given "
        f"{args.size:,} uniform random PDQ codes by one member in acknowledged batches of "
        f"{IMPORT_BATCH:,}; the moment the last batch was acknowledged, {args.clients} clients started "
        f"lookups of {args.batch:,} hashes each for {args.seconds:g} s, while the merges of the import ran.",
        "",
        f"Run {datetime.now(UTC).strftime('%Y-%m-%d')} on {platform.machine()} with {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}, with `{command}`.",
        "",
        "| import | lookups right after it | in each 5 s | refused | hub PSS: import done / peak / end |",
        "|---|---|---|---|---|",
        f"| {result['imported']:.0f} s ({args.size / result['imported']:,.0f} hashes/s) | "
        f"{whole:,.0f} hashes/s | {' / '.join(windows)} | {refused} | "
        f"{result['at_import'] / GIB:.2f} / {result['peak'] / GIB:.2f} / {result['at_end'] / GIB:.2f} GiB |",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.after_import",
        description="Batched lookups right after a bulk import into a new hub, while its merges run.",
    )
    parser.add_argument("--size", type=int, default=1_000_000, help="hashes imported (default 1,000,000)")
    parser.add_argument("--clients", type=int, default=4, help="lookup clients (default 4)")
    parser.add_argument("--batch", type=int, default=1000, help="hashes per lookup (default 1,000)")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="length of the lookup window (default 30)"
    )
    parser.add_argument("--write-docs", action="store_true", help="write the figures into docs/benchmarks.md")
    args = parser.parse_args()
    command = command_line("benchmarks.after_import", sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="bench-import-") as scratch:
        result = run(args, Path(scratch) / "hub")
    section = report(args, result, command)
    print(section)
    if args.write_docs:
        write_docs_section("bench_after_import", "Lookups right after a bulk import", section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
