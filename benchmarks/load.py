"""Load generator: concurrent lookups and submissions against a hub on loopback.

    python -m benchmarks.load                         # 1, 16 and 64 clients, then an overload run
    python -m benchmarks.load --seconds 20 --write-docs
    python -m benchmarks.load --url http://127.0.0.1:8080 --keys DIR --collection C --clients 16

Without ``--url`` it builds a hub data directory holding ``--size`` PDQ hashes
and one member key per client, serves it with ``hashfed serve`` in a separate
process, and measures each client count in turn. Each client is one loop
sending one request at a time, signed with its own key, drawn from a fixed mix:
60% single-hash lookups, 25% lookups of ``--batch`` hashes (half near
neighbours of listed hashes, half misses), 15% submissions of 10 new hashes.

Then it restarts the hub twice with tight limits (few handling slots and a
short queue; then a low per-key rate limit) and runs the most clients again,
to show the hub shedding with 503 and 429 rather than slowing down or growing.
The clients never wait out ``Retry-After``: the worst case, not the polite one.

Every run is bounded by ``--seconds`` and ``--max-requests``. It only talks to
loopback addresses: a ``--url`` elsewhere is refused, so it cannot be pointed
at someone else's hub by mistake.

Reported per run: requests and hashes looked up per second, p50/p99 latency of
answered requests, answers by status (429 and 503 are the hub shedding),
client-side errors, and the hub's resident memory before and after (with
``--url``, memory is not measured).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import numpy as np

from benchmarks.common import DOCS, free_port, hexes, memory_of, serving, wait_ready, write_docs_section
from benchmarks.corpus import make_corpus, make_queries
from federation.admin import change_membership, init_hub
from federation.config import DataDir
from federation.envelope import BATCH_TYPE, Addition, Grant, Header, batch_payload, sign_envelope, utc_now
from federation.httpsig import sign_request
from federation.hub import open_node
from federation.keys import SignerKey, load_signer_file

COLLECTION = "load"
FEDERATION = "load"
INGEST_BATCH = 100_000
SUBMIT_ITEMS = 10
CLIENT_COUNTS = (1, 16, 64)
SOAK_CLIENTS = 16
RSS_INTERVAL = 10.0
OPERATIONS = ("single lookup", "batch lookup", "submission")
WEIGHTS = (0.60, 0.25, 0.15)
OVERLOADS: tuple[dict[str, float], ...] = (
    {"max_inflight": 4, "max_queued": 8, "queue_timeout_seconds": 0.25},
    {"rate_limit_per_second": 2.0, "rate_limit_burst": 4},
)
"""Hub settings for the overload runs: few handling slots and a short queue, then a tight
per-key rate limit, so the same load is more than the hub may take."""


def require_loopback(url: str) -> str:
    """The URL, if its host is a loopback address; a load test must not hit anyone else's hub."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if parts.scheme not in ("http", "https") or not loopback:
        raise SystemExit(
            f"refusing {url!r}: the load generator only talks to loopback (127.0.0.1, ::1, localhost)"
        )
    return url.rstrip("/")


@dataclass
class Outcome:
    """What one run saw."""

    clients: int
    settings: str
    seconds: float = 0.0
    latencies: dict[str, list[float]] = field(default_factory=lambda: {op: [] for op in OPERATIONS})
    statuses: Counter[str] = field(default_factory=Counter)
    hashes_looked_up: int = 0
    soak: bool = False
    rss: list[tuple[float, int]] = field(default_factory=list)
    """The hub's resident memory: (seconds into the run, bytes), every ``RSS_INTERVAL`` and at the end."""
    rss_peak: int | None = None

    def memory(self) -> str:
        """Start → half-way → end (peak), in MiB."""
        if not self.rss or self.rss_peak is None:
            return "—"
        halfway = min(self.rss, key=lambda sample: abs(sample[0] - self.seconds / 2))
        mib = [f"{rss / 2**20:,.0f}" for _, rss in (self.rss[0], halfway, self.rss[-1])]
        return " → ".join(mib) + f" MiB (peak {self.rss_peak / 2**20:,.0f})"

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def answered(self) -> list[float]:
        return [latency for op in OPERATIONS for latency in self.latencies[op]]

    def count(self, *statuses: str) -> int:
        return sum(self.statuses[s] for s in statuses)

    def other_errors(self) -> int:
        return self.requests - self.count("200", "201", "429", "503")


def percentile(values: Sequence[float], p: float) -> float:
    return float(np.percentile(values, p) * 1000) if values else float("nan")


class Member:
    """A client's key and its submission sequence (strictly increasing, as the hub requires)."""

    def __init__(self, key: SignerKey) -> None:
        self.key = key
        self.last_seq = 0
        self.lock = asyncio.Lock()  # keys shared by clients submit one at a time, in seq order

    def next_seq(self) -> int:
        self.last_seq = max(time.time_ns() // 1000, self.last_seq + 1)
        return self.last_seq


async def drive(
    url: str,
    members: Sequence[SignerKey],
    federation: str,
    collection: str,
    queries: Sequence[str],
    clients: int,
    seconds: float,
    max_requests: int,
    batch: int,
    outcome: Outcome,
) -> None:
    """``clients`` loops, each with its own connection and key, until the time or request budget runs out."""
    url = require_loopback(url)
    keys = [Member(key) for key in members]
    rng = random.Random(clients)
    started_requests = 0
    deadline = time.perf_counter() + seconds
    lookup_path = "/v1/lookup"
    entries_path = f"/v1/collections/{collection}/entries"

    def lookup_body(count: int) -> bytes:
        chosen = [queries[rng.randrange(len(queries))] for _ in range(count)]
        return json.dumps({"queries": [{"type": "pdq", "hash": h} for h in chosen]}).encode()

    def submission(member: Member) -> bytes:
        fresh = [f"{rng.getrandbits(256):064x}" for _ in range(SUBMIT_ITEMS)]
        header = Header(federation, collection, member.next_seq(), utc_now())
        payload = batch_payload(header, member.key.name, [Addition("pdq", h) for h in sorted(fresh)])
        return sign_envelope(member.key, BATCH_TYPE, payload).canonical()

    async def send(session: aiohttp.ClientSession, member: Member, path: str, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        headers.update(sign_request(member.key, "POST", path, "", body))
        try:
            async with session.post(url + path, data=body, headers=headers) as response:
                await response.read()
                return str(response.status)
        except TimeoutError:
            return "client timeout"
        except aiohttp.ClientError as exc:
            return f"client {type(exc).__name__}"

    async def loop(worker: int, session: aiohttp.ClientSession) -> None:
        nonlocal started_requests
        member = keys[worker % len(keys)]
        while time.perf_counter() < deadline and started_requests < max_requests:
            started_requests += 1
            op = rng.choices(OPERATIONS, WEIGHTS)[0]
            began = time.perf_counter()
            if op == "submission":
                async with member.lock:
                    status = await send(session, member, entries_path, submission(member))
            else:
                count = 1 if op == "single lookup" else batch
                status = await send(session, member, lookup_path, lookup_body(count))
                if status == "200":
                    outcome.hashes_looked_up += count
            outcome.statuses[status] += 1
            if status in ("200", "201"):
                outcome.latencies[op].append(time.perf_counter() - began)

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        began = time.perf_counter()
        await asyncio.gather(*(loop(worker, session) for worker in range(clients)))
        outcome.seconds = time.perf_counter() - began


async def hub_federation(url: str) -> str:
    """The federation a running hub serves (payloads must name it)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/hub") as response:
        response.raise_for_status()
        return str((await response.json())["federation"])


# ---- a hub of its own ------------------------------------------------------------------


def build_hub(
    directory: Path, size: int, corpus: str, members: Sequence[SignerKey]
) -> tuple[DataDir, list[str]]:
    """A hub data dir with ``size`` PDQ hashes and ``members`` granted read and write; returns queries too."""
    data = DataDir(directory)
    init_hub(directory, name="load-hub", federation=FEDERATION, collection=COLLECTION)
    change_membership(
        data, COLLECTION, grant=[Grant(m.verifier, frozenset({"read", "write"})) for m in members]
    )
    codes = make_corpus(corpus, size, seed=1)  # type: ignore[arg-type]
    node = open_node(data)
    for seq, begin in enumerate(range(0, size, INGEST_BATCH), start=1):
        chunk = sorted(set(hexes(codes[begin : begin + INGEST_BATCH])))
        payload = batch_payload(
            Header(FEDERATION, COLLECTION, seq, utc_now()),
            members[0].name,
            [Addition("pdq", h) for h in chunk],
        )
        node.submit(COLLECTION, sign_envelope(members[0], BATCH_TYPE, payload))
    node.load()
    node.indexes.snapshot_all()
    node.store.close()
    return data, hexes(make_queries(corpus, codes, 10_000, seed=2).codes)  # type: ignore[arg-type]


def build_or_reuse_hub(
    directory: Path, size: int, corpus: str, members: Sequence[SignerKey]
) -> tuple[DataDir, list[str]]:
    """:func:`build_hub`, or, when ``directory`` already holds one an earlier run built, that hub
    with ``members`` granted too (its corpus is made again for the queries: same seed, same codes)."""
    if not (directory / "hub.toml").exists():
        print(f"building a hub with {size:,} hashes in {directory}", file=sys.stderr)
        return build_hub(directory, size, corpus, members)
    print(f"reusing the hub in {directory}", file=sys.stderr)
    data = DataDir(directory)
    change_membership(
        data, COLLECTION, grant=[Grant(m.verifier, frozenset({"read", "write"})) for m in members]
    )
    codes = make_corpus(corpus, size, seed=1)  # type: ignore[arg-type]
    return data, hexes(make_queries(corpus, codes, 10_000, seed=2).codes)  # type: ignore[arg-type]


async def measure_own_hub(
    args: argparse.Namespace, data: DataDir, members: list[SignerKey], queries: list[str]
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    # (clients, hub settings, seconds, soak?)
    runs: list[tuple[int, dict[str, float], float, bool]] = [
        (clients, {}, args.seconds, False) for clients in args.clients
    ]
    if not args.no_overload:
        runs += [(max(args.clients), settings, args.seconds, False) for settings in OVERLOADS]
    if args.soak:
        runs.append((SOAK_CLIENTS, {}, args.soak, True))
    default = data.config()
    for clients, settings, seconds, soak in runs:
        data.config_file.write_text(dataclasses.replace(default, **settings).to_toml())  # type: ignore[arg-type]
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with serving(data, port) as process:
            await wait_ready(url)
            label = ", ".join(f"`{k} = {v}`" for k, v in settings.items()) or "defaults"
            outcome = Outcome(clients, label, soak=soak)
            print(f"  {clients} clients for {seconds:g} s ({label}) ...", file=sys.stderr)
            sampler = asyncio.create_task(sample_memory(process.pid, outcome))
            await drive(
                url,
                members,
                FEDERATION,
                COLLECTION,
                queries,
                clients,
                seconds,
                args.max_requests,
                args.batch,
                outcome,
            )
            sampler.cancel()
            if process.poll() is not None:
                raise SystemExit(f"the hub exited during the run (status {process.returncode})")
            rss, outcome.rss_peak = memory_of(process.pid)
            outcome.rss.append((outcome.seconds, rss))
        outcomes.append(outcome)
    data.config_file.write_text(default.to_toml())
    return outcomes


async def sample_memory(pid: int, outcome: Outcome) -> None:
    began = time.perf_counter()
    while True:
        outcome.rss.append((time.perf_counter() - began, memory_of(pid)[0]))
        await asyncio.sleep(RSS_INTERVAL)


# ---- report ---------------------------------------------------------------------------


def report(
    outcomes: Sequence[Outcome], command: str, size: int | None, corpus: str, batch: int, note: str = ""
) -> str:
    hub = (
        f"a hub holding {size:,} PDQ hashes ({corpus} corpus) served by `hashfed serve`"
        if size is not None
        else "a running hub"
    )
    lines = [
        "## Load",
        "",
        f"`{command}` — {datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"{hub} on loopback, the load generator in another process on the same machine (so the figures are a floor).",
        "",
        f"Each client sends one request at a time with its own member key: 60% single-hash lookups, 25% lookups of "
        f"{batch} hashes, 15% submissions of {SUBMIT_ITEMS} new hashes. Latency is of answered requests (200/201); "
        "429 and 503 are the hub shedding load, with `Retry-After`, which these clients ignore (the worst case: "
        "a shed client asks again at once). Hub RSS: the hub process's resident memory at the start, half-way "
        "and end of the run, and its peak." + (f" {note}" if note else ""),
        "",
        "| clients | hub settings | requests | requests/s | hashes looked up/s | p50 | p99 | 200/201 | 429 | 503 | other | hub RSS: start → mid-run → end |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [o for o in outcomes if not o.soak]
    for o in runs:
        lines.append(
            f"| {o.clients} | {o.settings} | {o.requests:,} | {o.requests / o.seconds:,.0f} | "
            f"{o.hashes_looked_up / o.seconds:,.0f} | {percentile(o.answered, 50):.1f} ms | "
            f"{percentile(o.answered, 99):.1f} ms | {o.count('200', '201'):,} | {o.count('429'):,} | "
            f"{o.count('503'):,} | {o.other_errors():,} | {o.memory()} |"
        )
    lines += ["", "By operation, p50 / p99 of answered requests:", ""]
    lines.append("| clients | hub settings | " + " | ".join(OPERATIONS) + " |")
    lines.append("|---|---|" + "---|" * len(OPERATIONS))
    for o in runs:
        cells = [
            f"{percentile(o.latencies[op], 50):.1f} / {percentile(o.latencies[op], 99):.1f} ms"
            for op in OPERATIONS
        ]
        lines.append(f"| {o.clients} | {o.settings} | " + " | ".join(cells) + " |")
    others = Counter[str]()
    for o in outcomes:
        others.update({k: v for k, v in o.statuses.items() if k not in ("200", "201", "429", "503")})
    lines += [
        "",
        "Other answers: " + (", ".join(f"{k}: {v}" for k, v in sorted(others.items())) or "none") + ".",
    ]
    for o in outcomes:
        if o.soak:
            series = ", ".join(f"{rss / 2**20:,.0f}" for _, rss in o.rss)
            lines += [
                "",
                f"Memory over a longer run: {o.clients} clients for {o.seconds:,.0f} s with default settings, "
                f"{o.requests:,} requests ({o.count('200', '201'):,} answered, {o.requests - o.count('200', '201'):,} "
                f"not). Hub RSS every {RSS_INTERVAL:g} s, MiB: {series}. Memory rises over the first minute or "
                "so as the hub warms up (each reader thread opens its own SQLite connection and cache; index "
                "segments are built and merged as submissions arrive), then by under 1 KB a request: replay "
                "protection remembers every accepted signature for 10 minutes (about 250 bytes each, at most "
                "1,000,000, so it levels off), and submissions add hashes to the log and the index. Requests "
                "shed with 503 are refused before either.",
            ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--size", type=int, default=100_000, help="PDQ hashes in the hub it builds (default 100,000)"
    )
    parser.add_argument("--corpus", choices=("realistic", "uniform"), default="realistic")
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="longest duration of each run (default 15)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=100_000, help="most requests in each run (default 100,000)"
    )
    parser.add_argument(
        "--clients",
        type=lambda text: [int(n) for n in text.split(",")],
        default=list(CLIENT_COUNTS),
        help="concurrent client counts, comma separated (default 1,16,64)",
    )
    parser.add_argument("--batch", type=int, default=100, help="hashes in a batched lookup (default 100)")
    parser.add_argument(
        "--no-overload", action="store_true", help="skip the runs against a hub with tight limits"
    )
    parser.add_argument(
        "--soak",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help=f"then run {SOAK_CLIENTS} clients this long, reporting the hub's memory every {RSS_INTERVAL:g} s",
    )
    parser.add_argument(
        "--url", help="drive this running hub instead (loopback only); needs --keys and --collection"
    )
    parser.add_argument(
        "--keys", type=Path, help="with --url: a directory of member signer key files (*.key)"
    )
    parser.add_argument("--collection", help="with --url: the collection to submit to")
    parser.add_argument("--note", default="", help="a sentence to add to the report (e.g. about the machine)")
    parser.add_argument("--write-docs", action="store_true", help=f"write the figures into {DOCS.name}")
    args = parser.parse_args()
    if args.seconds <= 0 or args.max_requests <= 0 or min(args.clients) <= 0:
        parser.error("--seconds, --max-requests and --clients must be positive")
    command = "python -m benchmarks.load " + " ".join(sys.argv[1:])
    if args.url:
        url = require_loopback(args.url)
        if args.keys is None or args.collection is None:
            parser.error("--url needs --keys and --collection")
        members = [load_signer_file(path) for path in sorted(args.keys.glob("*.key"))]
        if not members:
            parser.error(f"no *.key files in {args.keys}")
        corpus = make_corpus(args.corpus, 1000, seed=1)
        queries = hexes(make_queries(args.corpus, corpus, 10_000, seed=2).codes)
        federation = asyncio.run(hub_federation(url))
        outcomes = []
        for clients in args.clients:
            outcome = Outcome(clients, "as configured")
            asyncio.run(
                drive(
                    url,
                    members,
                    federation,
                    args.collection,
                    queries,
                    clients,
                    args.seconds,
                    args.max_requests,
                    args.batch,
                    outcome,
                )
            )
            outcomes.append(outcome)
        section = report(outcomes, command, None, args.corpus, args.batch, args.note)
    else:
        most = max([*args.clients, SOAK_CLIENTS if args.soak else 0])
        members = [SignerKey.generate(f"load-{n}") for n in range(most)]
        with tempfile.TemporaryDirectory(prefix="hashfed-load-") as scratch:
            print(f"building a hub with {args.size:,} hashes and {len(members)} member keys", file=sys.stderr)
            data, queries = build_hub(Path(scratch) / "hub", args.size, args.corpus, members)
            outcomes = asyncio.run(measure_own_hub(args, data, members, queries))
        section = report(outcomes, command, args.size, args.corpus, args.batch, args.note)
    print(section)
    if args.write_docs:
        # The section ends with a newline of its own: no further one before the end marker.
        write_docs_section("bench_load", None, section.removesuffix("\n"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
