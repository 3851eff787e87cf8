"""Memory benchmark: a hub at rest, during a merge of its large segment, and per extra worker.

    python -m benchmarks.memory                       # 1,000,000 hashes
    python -m benchmarks.memory --size 10000000 --write-docs

1. Builds a hub data directory holding ``--size`` PDQ hashes (the realistic
   corpus of :mod:`benchmarks.corpus`); the build publishes the large
   segment's files, which every start then maps.
2. For each worker count, serves it with ``hashfed serve --workers N``, times
   the cold start to ready, warms every worker with batched lookups (so the
   pages lookups touch are resident) and reads each worker's memory from
   /proc: resident set (anonymous and file-backed parts) and PSS, which
   splits pages shared between processes among them.
3. With one worker, submits enough new hashes to start a merge and samples
   the worker's resident set every 20 ms until the new segment is published
   and mapped: the peak against the figure at rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.common import DOCS, command_line, free_port, hexes, serving, write_docs_section
from benchmarks.corpus import make_corpus
from benchmarks.load import COLLECTION, build_or_reuse_hub
from benchmarks.workers import until_ready, worker_pids
from federation.client import HubClient
from federation.envelope import Addition
from federation.httpsig import sign_request
from federation.index.segmented import DEFAULT_FRESH_LIMIT
from federation.keys import SignerKey

GIB = 1 << 30


def memory(pid: int) -> dict[str, int]:
    """Resident set (with its anonymous and file-backed parts) and PSS of ``pid``, in bytes."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            figures[key] = int(value.split()[0]) * 1024
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == "Pss":
            figures["Pss"] = int(value.split()[0]) * 1024
    return figures


async def warm(url: str, member: SignerKey, queries: list[str], workers: int) -> None:
    """Batched lookups over new connections until every worker has answered several."""
    answered: dict[str, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = 0
        while len(answered) < workers or min(answered.values()) < 5:
            chunk = queries[start : start + 1000]
            start = (start + 1000) % len(queries)
            body = json.dumps({"queries": [{"type": "pdq", "hash": code} for code in chunk]}).encode()
            headers = {
                "Content-Type": "application/json",
                **sign_request(member, "POST", "/v1/lookup", "", body),
            }
            async with session.post(url + "/v1/lookup", data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    raise SystemExit(f"a lookup answered {response.status}")
                worker = response.headers.get("Hashfed-Worker", "0")
            answered[worker] = answered.get(worker, 0) + 1


async def submit_new(url: str, member: SignerKey, codes: list[str]) -> None:
    async with aiohttp.ClientSession() as session:
        client = HubClient(url, member, session=session, retries=0, timeout=300)
        for start in range(0, len(codes), 9_000):
            await client.submit(COLLECTION, [Addition("pdq", code) for code in codes[start : start + 9_000]])


def published(directory: Path) -> str | None:
    meta = directory / "index" / f"{COLLECTION}.pdq.json"
    try:
        return str(json.loads(meta.read_text())["segment"])
    except (OSError, ValueError, KeyError):
        return None


def mapped_segments(pid: int, index_dir: Path) -> set[str]:
    """The segment directories whose files ``pid`` maps, including ones already deleted."""
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        path = parts[5].removesuffix(" (deleted)") if len(parts) == 6 else ""
        if path.startswith(f"{index_dir}/") and path.endswith(".npy"):
            found.add(Path(path).parent.name)
    return found


def measure_merge(url: str, pid: int, directory: Path, member: SignerKey, size: int) -> dict[str, Any]:
    """Peak memory of the one worker while a merge of the large segment runs, against rest."""
    rest = memory(pid)
    before = published(directory)
    peak: dict[str, int] = dict(rest)
    done = threading.Event()
    index_dir = directory / "index"
    both_mapped = 0.0

    def sample() -> None:
        nonlocal both_mapped
        while not done.is_set():
            for key, value in memory(pid).items():
                peak[key] = max(peak[key], value)
            if len(mapped_segments(pid, index_dir)) > 1:
                both_mapped += 0.02
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    fresh = hexes(make_corpus("uniform", DEFAULT_FRESH_LIMIT + 4_000, seed=time.time_ns()))  # type: ignore[arg-type]
    began = time.perf_counter()
    asyncio.run(submit_new(url, member, fresh))
    while published(directory) in (None, before) or mapped_segments(pid, index_dir) != {published(directory)}:
        asyncio.run(warm(url, member, fresh[:1000], 1))  # requests are what catch the hub up
        if time.perf_counter() - began > 1800:
            raise SystemExit("no merge was published within 30 minutes")
        time.sleep(0.1)
    took = time.perf_counter() - began
    done.set()
    sampler.join()
    return {"rest": rest, "peak": peak, "after": memory(pid), "seconds": took, "both_mapped": both_mapped}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=1_000_000, help="PDQ hashes in the hub (default 1,000,000)"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts (default 1 2 4)"
    )
    parser.add_argument(
        "--dir", type=Path, help="keep the hub here, or reuse the one there (default: a temporary directory)"
    )
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args()
    command = command_line("benchmarks.memory", sys.argv[1:])
    member = SignerKey.generate("client0")
    rows: list[tuple[int, float, list[dict[str, int]]]] = []
    with tempfile.TemporaryDirectory(prefix="hashfed-memory-bench-") as scratch:
        directory = args.dir or Path(scratch) / "hub"
        began = time.perf_counter()
        data, queries = build_or_reuse_hub(directory, args.size, "realistic", [member])
        print(f"  ready to serve after {time.perf_counter() - began:.0f} s", file=sys.stderr)
        for workers in args.workers:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with serving(data, port, extra=("--workers", str(workers))) as process:
                started = time.perf_counter()
                asyncio.run(until_ready(url, workers))
                ready = time.perf_counter() - started
                asyncio.run(warm(url, member, queries, workers))
                pids = worker_pids(process.pid)
                rows.append((workers, ready, [memory(pid) for pid in pids]))
                print(f"  {workers} workers: ready in {ready:.1f} s", file=sys.stderr)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with serving(data, port, extra=("--workers", "1")) as process:
            asyncio.run(until_ready(url, 1))
            asyncio.run(warm(url, member, queries, 1))
            print("  merging ...", file=sys.stderr)
            merge = measure_merge(url, worker_pids(process.pid)[0], data.path, member, args.size)
    section = report(args.size, rows, merge, command)
    print(section)
    if args.write_docs:
        write_docs_section("bench_memory", "Memory", section)
    return 0


def gib(value: int) -> str:
    return f"{value / GIB:.2f} GiB"


def report(
    size: int, rows: list[tuple[int, float, list[dict[str, int]]]], merge: dict[str, Any], command: str
) -> str:
    when = datetime.now(UTC).date().isoformat()
    lines = [
        f"Memory of `hashfed serve` over one hub of {size:,} PDQ hashes (realistic corpus of "
        "`benchmarks/corpus.py`), read from /proc after every worker had answered batched lookups.",
        "",
        f"Run {when} on {platform.machine()} with {__import__('os').cpu_count()} CPUs, "
        f"Python {platform.python_version()}, with `{command}`.",
        "",
        "| workers | cold start to ready | resident, all workers | of which file-backed (segment files) | PSS, all workers | PSS per worker |",
        "|---|---|---|---|---|---|",
    ]
    base_pss = None
    for workers, ready, figures in rows:
        rss = sum(f["VmRSS"] for f in figures)
        file_backed = sum(f["RssFile"] for f in figures)
        pss = sum(f["Pss"] for f in figures)
        base_pss = pss if base_pss is None else base_pss
        per = " / ".join(gib(f["Pss"]) for f in figures)
        lines.append(f"| {workers} | {ready:.1f} s | {gib(rss)} | {gib(file_backed)} | {gib(pss)} | {per} |")
    rest, peak, after = merge["rest"], merge["peak"], merge["after"]
    lines += [
        "",
        "A merge (one worker; new hashes past the fresh segment's limit of "
        f"{DEFAULT_FRESH_LIMIT:,}, submitted, merged into new segment files and mapped):",
        "",
        "| | resident | anonymous | file-backed |",
        "|---|---|---|---|",
        f"| at rest | {gib(rest['VmRSS'])} | {gib(rest['RssAnon'])} | {gib(rest['RssFile'])} |",
        f"| peak during the merge | {gib(peak['VmRSS'])} | {gib(peak['RssAnon'])} | {gib(peak['RssFile'])} |",
        f"| after it | {gib(after['VmRSS'])} | {gib(after['RssAnon'])} | {gib(after['RssFile'])} |",
        "",
        f"Peak resident during the merge: {peak['VmRSS'] / rest['VmRSS']:.2f} times the figure at rest "
        f"(submission to the new segment mapped: {merge['seconds']:.1f} s; the old and the new segment were "
        f"both mapped for about {merge['both_mapped']:.1f} s of it). PSS counts a page shared by k "
        "processes as 1/k in each, so the PSS total is what the workers cost together; the "
        "file-backed pages are the segment files in the page cache, mapped by every worker once.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
