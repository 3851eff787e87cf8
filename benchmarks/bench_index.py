"""Benchmark the PDQ search engines side by side on the same corpus and queries.

    python -m benchmarks.bench_index                       # 100k and 1M, both corpora
    python -m benchmarks.bench_index --with-10m --write-docs --results-json run.json
    python -m benchmarks.bench_index --from-json run.json --write-docs   # re-render a saved run

Engines (all asked for every code within ``--radius`` bits, 31 by default):

* ``mih``: :class:`federation.index.mih.MihIndex` (plain numpy, one thread).
* ``faiss-flat``: ``faiss.IndexBinaryFlat``, brute force; also the oracle.
* ``faiss-mh-16x16``: ``faiss.IndexBinaryMultiHash`` with 16 tables of 16
  bits, ``nflip = radius // 16`` (the layout python-threatexchange uses).
* ``faiss-mh-11x23``: 11 tables of 23 bits (253 of the 256 bits),
  ``nflip = radius // 11``. Both MultiHash layouts are exact by pigeonhole:
  ``nhash * (nflip + 1) > radius``.
* ``tx-pdqindex``: python-threatexchange's PDQ index, the class
  ``PdqSignal.get_index_cls()`` returns (``PDQIndex``: FAISS
  ``IndexBinaryIDMap2`` over ``IndexBinaryMultiHash(256, 16, 16)``, plus a
  Python dict from ids to FAISS positions). This is what Meta's HMA builds.
  Built with ``PDQIndex.build([(hex, row), ...])``; single lookups call
  ``index.query(hex)`` (its threshold is fixed at 31, so this engine only runs
  at ``--radius 31``); ``PDQIndex`` has no batch query, so batches call the
  wrapped ``PDQMultiHashIndex.search_with_distance_in_result(hexes, 31)``.
* ``tx-pdqindex2``: python-threatexchange's newer ``PDQIndex2`` (a float
  ``IndexFlatL2`` over the 256 bits as floats, 1 KiB per code). Not what
  ``PdqSignal`` uses in 1.2.17; runs only up to 1M codes (10M would need
  10 GiB) and single lookups only (its batch search does not say which query
  a match belongs to).

Method: one invocation generates each corpus and query set once (seeded) and
saves them to a temporary directory. Each engine then runs in a fresh child
process, one after another, so that peak RSS is honest (no allocator state or
peak left over from another engine) and engines never compete for the two
cores. In the child: load codes and queries, reset the peak-RSS counter
(``/proc/self/clear_refs``), build, and read ``VmHWM`` (peak) and ``VmRSS``
(held) as deltas from the RSS before the build. Engines get their input in
their own API's form before the baseline (``uint8[n, 32]`` for FAISS, a
private copy made inside the build for ``mih`` so that it too is charged for
holding the codes, hex strings for threatexchange). Build and all lookups run
on a worker thread (``concurrent.futures``): FAISS ran up to 7x slower from
Python's main thread on this machine.

* Single lookups: one query per call, in a loop on the worker thread, until
  all queries are done or ``--single-seconds`` have passed (after 10 untimed
  warm-up calls).
* Batched lookups: all queries in batches of ``--batch`` (1000).
* Recall: the (query, row) pairs each engine returns from its batched run (its
  single run for ``tx-pdqindex2``) against ``faiss-flat``'s; "extra" counts
  returned pairs the oracle does not have or with a different distance. The
  oracle itself is checked against a numpy brute force on 20 queries.
"""

from __future__ import annotations

import argparse
import binascii
import concurrent.futures
import datetime
import gc
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from benchmarks.corpus import CorpusKind, make_corpus, make_queries

ENGINES = ("faiss-flat", "mih", "faiss-mh-16x16", "faiss-mh-11x23", "tx-pdqindex", "tx-pdqindex2")
ORACLE = "faiss-flat"
MAX_SIZE = {"tx-pdqindex2": 1_000_000}
START_MARKER = "<!-- bench_index:start -->"
END_MARKER = "<!-- bench_index:end -->"
REPO = Path(__file__).resolve().parent.parent
QUIET = 0.15
"""Cores used by other processes under which the machine counts as quiet."""
CONTENDED = 0.3
"""Cores used by other processes during a measurement above which it is repeated."""
ROUNDS = 3
"""Timed rounds per mode; the median is reported (the machine has noisy neighbours)."""

Rows = npt.NDArray[np.int64]
Dists = npt.NDArray[np.int32]
Hit = tuple[Rows, Dists]


# -- engines (run in the child) -------------------------------------------------


@dataclass
class Engine:
    build: Callable[[], None]
    single: Callable[[int], Hit]
    batch: Callable[[int, int], list[Hit]] | None
    """Queries [start, stop) in one call, or None when the engine has no batch API."""
    extra: Callable[[], dict[str, Any]] = dict


def _hexes(codes: npt.NDArray[np.uint64]) -> list[str]:
    text = binascii.hexlify(np.ascontiguousarray(codes).view(np.uint8).tobytes()).decode()
    return [text[i : i + 64] for i in range(0, len(text), 64)]


def _split_csr(lims: npt.NDArray[Any], distances: npt.NDArray[Any], labels: npt.NDArray[Any]) -> list[Hit]:
    bounds = lims.astype(np.int64).tolist()
    return [
        (labels[lo:hi].astype(np.int64), distances[lo:hi].astype(np.int32))
        for lo, hi in itertools.pairwise(bounds)
    ]


def make_engine(
    name: str, codes: npt.NDArray[np.uint64], queries: npt.NDArray[np.uint64], radius: int
) -> Engine:
    state: dict[str, Any] = {}
    if name == "mih":
        from federation.index.mih import MihIndex

        def build() -> None:
            state["index"] = MihIndex(codes.copy())

        def single(i: int) -> Hit:
            return state["index"].search(queries[i], radius)[0]  # type: ignore[no-any-return]

        def batch(lo: int, hi: int) -> list[Hit]:
            return state["index"].search(queries[lo:hi], radius)  # type: ignore[no-any-return]

        def extra() -> dict[str, Any]:
            index = state["index"]
            return {"nbytes": index.nbytes, "widths": list(index.widths), "plan": index.plan(radius)[1]}

        return Engine(build, single, batch, extra)

    if name.startswith("faiss-"):
        import faiss

        raw = codes.view(np.uint8)
        raw_queries = queries.view(np.uint8)

        def build() -> None:
            index: Any
            if name == "faiss-flat":
                index = faiss.IndexBinaryFlat(256)
            else:
                nhash, bits = (int(part) for part in name.removeprefix("faiss-mh-").split("x"))
                index = faiss.IndexBinaryMultiHash(256, nhash, bits)
                index.nflip = radius // nhash
            index.add(raw)
            state["index"] = index

        def single(i: int) -> Hit:
            _, distances, labels = state["index"].range_search(raw_queries[i : i + 1], radius + 1)
            return labels.astype(np.int64), distances.astype(np.int32)

        def batch(lo: int, hi: int) -> list[Hit]:
            return _split_csr(*state["index"].range_search(raw_queries[lo:hi], radius + 1))

        def extra() -> dict[str, Any]:
            return {"omp_threads": faiss.omp_get_max_threads()}

        return Engine(build, single, batch, extra)

    if name == "tx-pdqindex":
        from threatexchange.signal_type.pdq.signal import PdqSignal

        entries = list(zip(_hexes(codes), range(len(codes)), strict=True))
        query_hexes = _hexes(queries)
        index_cls = PdqSignal.get_index_cls()

        def build() -> None:
            state["index"] = index_cls.build(entries)
            entries.clear()

        def single(i: int) -> Hit:
            matches = state["index"].query(query_hexes[i])
            rows = np.array([match.metadata for match in matches], dtype=np.int64)
            distances = np.array([match.similarity_info.distance for match in matches], dtype=np.int32)
            return rows, distances

        def batch(lo: int, hi: int) -> list[Hit]:
            index = state["index"]
            found = index.index.search_with_distance_in_result(query_hexes[lo:hi], radius)
            hits: list[Hit] = []
            for query in query_hexes[lo:hi]:
                matches = found.get(query, [])
                rows = np.array(
                    [index.local_id_to_entry[ident][1] for ident, _, _ in matches], dtype=np.int64
                )
                hits.append((rows, np.array([int(d) for _, _, d in matches], dtype=np.int32)))
            return hits

        def extra() -> dict[str, Any]:
            return {"index_class": f"{index_cls.__module__}.{index_cls.__qualname__}"}

        return Engine(build, single, batch, extra)

    if name == "tx-pdqindex2":
        from threatexchange.signal_type.pdq.pdq_index2 import PDQIndex2

        entries = list(zip(_hexes(codes), range(len(codes)), strict=True))
        query_hexes = _hexes(queries)

        def build() -> None:
            state["index"] = PDQIndex2(entries=entries, threshold=radius)
            entries.clear()

        def single(i: int) -> Hit:
            matches = state["index"].query(query_hexes[i])
            rows = np.array([match.metadata for match in matches], dtype=np.int64)
            distances = np.array([match.similarity_info.distance for match in matches], dtype=np.int32)
            return rows, distances

        return Engine(build, single, None)

    raise ValueError(f"unknown engine {name!r}")


def _memory() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in bytes."""
    values: dict[str, int] = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def _huge_page_bytes() -> int:
    """Anonymous memory of this process backed by transparent huge pages."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as rollup:
            for line in rollup:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
    except OSError:
        return False
    return True


def _save_hits(path: Path, hits: Sequence[Hit]) -> None:
    lims = np.zeros(len(hits) + 1, dtype=np.int64)
    lims[1:] = np.cumsum([len(rows) for rows, _ in hits])
    rows = np.concatenate([h[0] for h in hits]) if hits else np.empty(0, np.int64)
    dists = np.concatenate([h[1] for h in hits]) if hits else np.empty(0, np.int32)
    np.savez(path, lims=lims, rows=rows.astype(np.int64), dists=dists.astype(np.int32))


def run_worker(args: argparse.Namespace) -> None:
    data = Path(args.data)
    codes = np.load(data / "codes.npy")
    queries = np.load(data / "queries.npy")
    engine = make_engine(args.worker, codes, queries, args.radius)
    del codes
    gc.collect()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench")
    report: dict[str, Any] = {"engine": args.worker}
    report["peak_reset"] = _reset_peak()
    before = _memory()["VmRSS"]
    started = time.perf_counter()
    if args.build_in_worker:
        pool.submit(engine.build).result()
    else:
        engine.build()
    report["build_s"] = time.perf_counter() - started
    gc.collect()
    after = _memory()
    report["build_peak_bytes"] = after["VmHWM"] - before
    report["held_bytes"] = after["VmRSS"] - before
    report["huge_pages_after_build"] = _huge_page_bytes()
    report.update(engine.extra())
    count = len(queries)
    warm = min(10, count)

    def run_single() -> tuple[int, float, list[Hit]]:
        for i in range(warm):
            engine.single(i)
        hits: list[Hit] = []
        started = time.perf_counter()
        deadline = started + args.single_seconds / ROUNDS
        for i in range(count):
            hits.append(engine.single(i))
            if time.perf_counter() > deadline:
                break
        return len(hits), time.perf_counter() - started, hits

    rates: list[float] = []
    for round_ in range(ROUNDS):
        done, elapsed, single_hits = pool.submit(run_single).result()
        rates.append(done / elapsed)
        if round_ == 0:
            report["single_queries"] = done
            _save_hits(data / f"{args.worker}.single.npz", single_hits)
        del single_hits
    report["single_rounds"] = rates
    report["single_per_s"] = statistics.median(rates)
    batch = engine.batch
    if batch is not None:

        def run_batched() -> tuple[float, list[Hit]]:
            batch(0, warm)
            hits: list[Hit] = []
            started = time.perf_counter()
            for lo in range(0, count, args.batch):
                hits.extend(batch(lo, min(lo + args.batch, count)))
            return time.perf_counter() - started, hits

        rates = []
        for round_ in range(ROUNDS):
            elapsed, batch_hits = pool.submit(run_batched).result()
            rates.append(count / elapsed)
            if round_ == 0:
                _save_hits(data / f"{args.worker}.batch.npz", batch_hits)
            del batch_hits
            if elapsed > args.single_seconds:
                break  # slow engines: one round is enough signal
        report["batch_rounds"] = rates
        report["batch_per_s"] = statistics.median(rates)
    report["total_peak_bytes"] = _memory()["VmHWM"] - before
    report["huge_pages_at_end"] = _huge_page_bytes()
    pool.shutdown()
    (data / f"{args.worker}.json").write_text(json.dumps(report))


# -- the parent -----------------------------------------------------------------


def _pairs(
    path: Path, n: int, limit: int | None = None
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Unique (query * n + row) keys and the same keys with the distance folded in."""
    with np.load(path) as saved:
        lims, rows, dists = saved["lims"], saved["rows"], saved["dists"]
    if limit is not None:
        lims = lims[: limit + 1]
        rows, dists = rows[: lims[-1]], dists[: lims[-1]]
    owner = np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims))
    keys = owner * n + rows
    return np.unique(keys), np.unique(keys * 257 + dists)


def _compare(oracle_path: Path, path: Path, n: int, limit: int | None = None) -> tuple[float, int]:
    """Recall of the engine's pairs against the oracle's, and the engine's extra (wrong) pairs."""
    with np.load(path) as saved:
        answered = len(saved["lims"]) - 1
    limit = answered if limit is None else min(limit, answered)
    truth, truth_d = _pairs(oracle_path, n, limit)
    got, got_d = _pairs(path, n, limit)
    recall = 1.0 if len(truth) == 0 else len(np.intersect1d(truth, got, assume_unique=True)) / len(truth)
    extra = len(np.setdiff1d(got_d, truth_d, assume_unique=True))
    return recall, extra


def _spot_check_oracle(
    data: Path, codes: npt.NDArray[np.uint64], queries: npt.NDArray[np.uint64], radius: int
) -> None:
    from federation.index.mih import popcount_distances

    with np.load(data / f"{ORACLE}.batch.best.npz") as saved:
        lims, rows = saved["lims"], saved["rows"]
    for i in range(min(20, len(queries))):
        expected = np.flatnonzero(popcount_distances(codes ^ queries[i]) <= radius)
        if sorted(rows[lims[i] : lims[i + 1]].tolist()) != expected.tolist():
            raise SystemExit(f"oracle {ORACLE} disagrees with numpy brute force on query {i}")


def _run_child(engine: str, data: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_index",
        "--worker",
        engine,
        "--data",
        str(data),
        "--radius",
        str(args.radius),
        "--batch",
        str(args.batch),
        "--single-seconds",
        str(args.single_seconds),
        *(["--build-in-worker"] if args.build_in_worker else []),
    ]
    best: dict[str, Any] | None = None
    for attempt in range(1 + args.retries):
        quiet = _wait_for_quiet(args.quiet_timeout)
        busy_before, own_before = _cpu_busy_seconds(), _own_cpu_seconds()
        started = time.perf_counter()
        result = subprocess.run(command, cwd=REPO, check=False)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            print(f"  {engine}: failed with exit code {result.returncode}", file=sys.stderr)
            return None
        foreign = max(0.0, (_cpu_busy_seconds() - busy_before) - (_own_cpu_seconds() - own_before)) / wall
        report: dict[str, Any] = json.loads((data / f"{engine}.json").read_text())
        report.update(wall_s=wall, other_load=foreign, quiet_before=quiet, attempt=attempt + 1)
        if best is None or foreign < best["other_load"]:
            best = report
            for mode in ("single", "batch"):
                saved = data / f"{engine}.{mode}.npz"
                if saved.exists():
                    saved.replace(data / f"{engine}.{mode}.best.npz")
        if foreign < CONTENDED:
            break
        print(
            f"  {engine}: other processes used {foreign:.2f} cores meanwhile; measuring again",
            file=sys.stderr,
        )
    return best


def _cpu_busy_seconds() -> float:
    """CPU seconds spent by anything on the machine since boot (all cores; steal counts as busy)."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _wait_for_quiet(timeout: float) -> float:
    """Wait until other processes use under QUIET cores (at most ``timeout`` s); return their load."""
    deadline = time.perf_counter() + timeout
    announced = False
    while True:
        busy, own, started = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
        time.sleep(2.0)
        load = ((_cpu_busy_seconds() - busy) - (_own_cpu_seconds() - own)) / (time.perf_counter() - started)
        if load < QUIET or time.perf_counter() > deadline:
            return max(0.0, load)
        if not announced:
            print(f"  waiting for other processes to finish ({load:.2f} cores busy)", file=sys.stderr)
            announced = True


def run_parent(args: argparse.Namespace) -> None:
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        original = argparse.Namespace(**{**saved["args"], "write_docs": args.write_docs, "docs": args.docs})
        _finish(original, saved["rows"], saved["total"])
        return
    sizes = [int(size) for size in args.sizes.split(",") if size]
    if args.with_10m and 10_000_000 not in sizes:
        sizes.append(10_000_000)
    kinds: list[CorpusKind] = ["uniform", "realistic"] if args.corpus == "both" else [args.corpus]
    engines = [name.strip() for name in args.engines.split(",") if name.strip()]
    if ORACLE not in engines:
        engines.insert(0, ORACLE)
    engines.sort(key=lambda name: name != ORACLE)
    if args.radius != 31:
        engines = [name for name in engines if name != "tx-pdqindex"]
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for kind in kinds:
        for n in sizes:
            with tempfile.TemporaryDirectory(prefix="bench_index_") as scratch:
                data = Path(scratch)
                generated = time.perf_counter()
                codes = make_corpus(kind, n, args.seed)
                queries = make_queries(kind, codes, args.queries, args.seed)
                np.save(data / "codes.npy", codes)
                np.save(data / "queries.npy", queries.codes)
                print(
                    f"{kind} n={n:,}: corpus and {args.queries} queries in {time.perf_counter() - generated:.1f}s",
                    file=sys.stderr,
                )
                for engine in engines:
                    if n > MAX_SIZE.get(engine, n):
                        continue
                    report = _run_child(engine, data, args)
                    if report is None:
                        rows.append({"corpus": kind, "n": n, "engine": engine, "failed": True})
                        continue
                    if engine == ORACLE:
                        _spot_check_oracle(data, codes, queries.codes, args.radius)
                        del codes
                        gc.collect()
                    source = "batch" if (data / f"{engine}.batch.best.npz").exists() else "single"
                    recall, extra = _compare(
                        data / f"{ORACLE}.batch.best.npz", data / f"{engine}.{source}.best.npz", n
                    )
                    single_recall, single_extra = _compare(
                        data / f"{ORACLE}.batch.best.npz", data / f"{engine}.single.best.npz", n
                    )
                    report.update(
                        corpus=kind,
                        n=n,
                        recall=recall,
                        extra=extra,
                        recall_source=source,
                        single_recall=single_recall,
                        single_extra=single_extra,
                    )
                    rows.append(report)
                    print("  " + _format_row(report), file=sys.stderr)
    total = time.perf_counter() - started
    print(f"\ntotal {total / 60:.1f} min", file=sys.stderr)
    args.date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.results_json:
        saved_args = {key: value for key, value in vars(args).items() if key != "from_json"}
        Path(args.results_json).write_text(json.dumps({"args": saved_args, "rows": rows, "total": total}))
    _finish(args, rows, total)


def _finish(args: argparse.Namespace, rows: list[dict[str, Any]], total: float) -> None:
    table = _table(rows)
    print(table)
    print()
    print(_summary(rows))
    if args.write_docs:
        _write_docs(Path(args.docs), _section(args, rows, table, total))


# -- reporting ------------------------------------------------------------------


def _mib(value: float) -> str:
    return f"{value / 2**20:,.0f}"


def _rate(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _format_row(report: dict[str, Any]) -> str:
    if report.get("failed"):
        return f"{report['engine']}: failed"
    return (
        f"{report['engine']}: build {report['build_s']:.1f}s, peak +{_mib(report['build_peak_bytes'])} MiB, "
        f"held +{_mib(report['held_bytes'])} MiB, single {_rate(report['single_per_s'])}/s, "
        f"batched {_rate(report.get('batch_per_s'))}/s, recall {report['recall']:.4f}, extra {report['extra']}, "
        f"other load {report['other_load']:.2f} cores (attempt {report['attempt']})"
    )


def _note(report: dict[str, Any]) -> str:
    notes: list[str] = []
    if "widths" in report:
        widths = report["widths"]
        notes.append(
            f"{len(widths)} tables ({min(widths)}-{max(widths)} bits), nbytes {_mib(report['nbytes'])} MiB"
        )
    if report.get("recall_source") == "single":
        notes.append(f"recall from {report['single_queries']} single lookups")
    elif report.get("single_recall", 1.0) < 1.0 or report.get("single_extra", 0):
        notes.append(
            f"single-lookup recall {report['single_recall']:.4f}, extra {report['single_extra']} "
            f"({report['single_queries']} lookups)"
        )
    if report.get("other_load", 0.0) >= 0.1:
        notes.append(f"other processes used {report['other_load']:.1f} cores meanwhile")
    return "; ".join(notes)


def _table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| corpus | codes | engine | build s | build peak MiB | held MiB | single lookups/s | "
        "batched lookups/s | recall | extra | notes |"
    )
    lines = [header, "|" + "---|" * 11]
    for report in rows:
        if report.get("failed"):
            lines.append(f"| {report['corpus']} | {report['n']:,} | {report['engine']} | failed |||||||| |")
            continue
        lines.append(
            f"| {report['corpus']} | {report['n']:,} | {report['engine']} | {report['build_s']:.1f} | "
            f"{_mib(report['build_peak_bytes'])} | {_mib(report['held_bytes'])} | "
            f"{_rate(report['single_per_s'])} | {_rate(report.get('batch_per_s'))} | "
            f"{report['recall']:.4f} | {report['extra']} | {_note(report)} |"
        )
    return "\n".join(lines)


def _summary(rows: list[dict[str, Any]]) -> str:
    """How ``mih`` compares with each other engine at each corpus's largest size."""
    lines: list[str] = []
    for kind in dict.fromkeys(row["corpus"] for row in rows):
        measured = [row for row in rows if row["corpus"] == kind and not row.get("failed")]
        if not measured:
            continue
        n = max(row["n"] for row in measured)
        at_n = {row["engine"]: row for row in measured if row["n"] == n}
        ours = at_n.get("mih")
        if ours is None:
            continue
        parts: list[str] = []
        for engine, other in at_n.items():
            if engine == "mih":
                continue
            part = f"{ours['single_per_s'] / other['single_per_s']:,.1f}x the single lookups/s of `{engine}`"
            if other.get("batch_per_s") and ours.get("batch_per_s"):
                part += f", {ours['batch_per_s'] / other['batch_per_s']:,.1f}x batched"
            if other["held_bytes"] > 0:
                part += f", holding {ours['held_bytes'] / other['held_bytes']:.2f}x its memory"
            parts.append(part)
        lines.append(f"- {kind}, {n:,} codes: `mih` answered " + "; ".join(parts) + ".")
    return "\n".join(lines)


def _machine() -> str:
    import faiss

    cpu = "unknown CPU"
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        for line in info:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo", encoding="ascii") as info:
        total_kib = int(next(line for line in info if line.startswith("MemTotal")).split()[1])
    try:
        from importlib.metadata import version

        threatexchange = version("threatexchange")
    except Exception:
        threatexchange = "not installed"
    return (
        f"{cpu}, {len(os.sched_getaffinity(0))} cores (nproc), {total_kib / 2**20:.1f} GiB RAM, "
        f"Linux {platform.release()}; Python {platform.python_version()}, numpy {np.__version__}, "
        f"faiss-cpu {faiss.__version__} ({faiss.omp_get_max_threads()} OpenMP threads), "
        f"threatexchange {threatexchange}"
    )


def _section(args: argparse.Namespace, rows: list[dict[str, Any]], table: str, total: float) -> str:
    command = "python -m benchmarks.bench_index " + " ".join(args.argv)
    date = getattr(args, "date", None) or datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""## Index engines

Generated by `benchmarks/bench_index.py`; everything between the markers is
rewritten by `--write-docs`.

- Command: `{command.strip()}` (took {total / 60:.1f} min)
- Date: {date}
- Machine: {_machine()}
- Lookups: radius {args.radius} (inclusive), {args.queries} queries per corpus (half planted near
  neighbours at distance 0-32, half random misses); single = one query per call on a worker
  thread (stops after {args.single_seconds:g} s), batched = batches of {args.batch}.
- Build peak / held: RSS deltas of a fresh child process per engine (VmHWM after the build
  minus VmRSS before it; VmRSS after it minus VmRSS before it).
- Recall: (query, row) pairs against `faiss-flat` (checked against numpy brute force on 20
  queries); extra = returned pairs that are not within the radius or carry a wrong distance.

{table}

{_summary(rows)}

Engines: `mih` = `federation.index.mih.MihIndex` (numpy, one thread);
`faiss-flat` = `IndexBinaryFlat`; `faiss-mh-AxB` = `IndexBinaryMultiHash` with A tables of
B bits and `nflip = radius // A` (exact by pigeonhole); `tx-pdqindex` = python-threatexchange's
`PdqSignal.get_index_cls()` (`PDQIndex`: `IndexBinaryIDMap2` over `IndexBinaryMultiHash(256, 16, 16)`,
what HMA uses), single = `PDQIndex.query(hex)`, batched = the wrapped
`PDQMultiHashIndex.search_with_distance_in_result(hexes, 31)` since `PDQIndex` has no batch
query; `tx-pdqindex2` = `PDQIndex2` (float `IndexFlatL2`, 1 KiB per code), ≤ 1M only, single
only. FAISS runs with its default OpenMP threads (both cores); `mih` uses one core (a
second thread splitting a batch gave no measurable gain: its many small numpy calls hold
the GIL between the memory-bound gathers). Each engine is timed in 3 rounds and the median is
reported; before each engine the script waits (up to 3 min) until other processes use under
0.15 cores, and repeats an engine once if they used 0.3 cores or more meanwhile (the notes
column names any such load that remained).

Treat the rates as good to about a factor of 2: with no other load measured, whole runs on
this machine differed by up to 2x for the same engine and size (at 10M codes, mih
4,200-6,100 single lookups/s on the uniform corpus, faiss-mh-16x16 75-180/s on the realistic
one, in three runs on 2026-11-21) while rounds within one process mostly agreed. In every
run `mih` led every other engine at 1M and 10M codes, single and batched; at 100k codes the
brute-force `faiss-flat` (3 MB, in cache) comes close and sometimes wins single lookups.

FAISS indexes are built on the main thread and searched from a worker thread, their best
case. On this machine an `IndexBinaryMultiHash` built on a *worker* thread answered about
half as many lookups (1M uniform codes, 16x16: ~700 against ~1,500-1,800 single lookups/s;
we did not pin down why, the heap placement of its hash tables is the likely cause);
`--build-in-worker` measures that case. A hub that rebuilds its large segment in a
background thread gets the slower one.
See the module docstring of `benchmarks/bench_index.py` for the method.
"""


def _write_docs(path: Path, section: str) -> None:
    block = f"{START_MARKER}\n{section.rstrip()}\n{END_MARKER}\n"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\n"
    start, end = text.find(START_MARKER), text.find(END_MARKER)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(END_MARKER) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100000,1000000", help="comma-separated corpus sizes")
    parser.add_argument("--with-10m", action="store_true", help="add a 10,000,000-code corpus")
    parser.add_argument("--corpus", choices=("uniform", "realistic", "both"), default="both")
    parser.add_argument("--queries", type=int, default=1000, help="queries per corpus")
    parser.add_argument("--batch", type=int, default=1000, help="queries per batched call")
    parser.add_argument("--radius", type=int, default=31, help="max Hamming distance (inclusive)")
    parser.add_argument(
        "--engines", default=",".join(ENGINES), help="comma-separated subset of " + ", ".join(ENGINES)
    )
    parser.add_argument(
        "--single-seconds", type=float, default=9.0, help="time budget for single lookups (all rounds)"
    )
    parser.add_argument(
        "--build-in-worker",
        action="store_true",
        help="build on the worker thread too (FAISS MultiHash then searches ~2x slower, see docs)",
    )
    parser.add_argument(
        "--quiet-timeout",
        type=float,
        default=180.0,
        help="seconds to wait for other processes to go quiet before each engine",
    )
    parser.add_argument(
        "--retries", type=int, default=1, help="repeat an engine measured while others used the CPU"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true", help="rewrite the section in --docs")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--results-json", help="also save the measurements to this JSON file")
    parser.add_argument("--from-json", help="print (and with --write-docs, write) a saved run instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.worker:
        run_worker(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()
