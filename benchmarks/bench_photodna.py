"""Benchmark PhotoDNA radius search: the hub's engine against FAISS brute force, same corpus and queries.

    python -m benchmarks.bench_photodna                                # 1M, both corpora, both radii
    python -m benchmarks.bench_photodna --sizes 1000000,10000000 --write-docs

Engines (every vector within squared Euclidean distance R, inclusive):

* ``hashfed``: the PhotoDNA index a hub builds for a collection
  (``SegmentedIndex.l2``: the corpus becomes its large segment, searched by
  :class:`federation.index.pruned.PrunedL2Index`), queried with hex hashes
  as the hub does.
* ``faiss-flat``: ``faiss.IndexFlatL2`` over the vectors as float32, brute
  force ``range_search`` with the radius widened by 64 (float32 rounding)
  and every candidate's distance recomputed in integers; the oracle.
* ``faiss-ivf``: FAISS made exact: an inverted file of ``2 * sqrt(n)``
  k-means cells (10 rounds on a sample of 32 vectors a cell) holding the
  vectors as bytes (``IndexIVFScalarQuantizer`` with ``QT_8bit_direct``, not
  by residual, so its float32 distances are exact integers), and for each
  query every cell that the triangle inequality cannot rule out
  (``|q - c| - radius(c) <= sqrt(R)``, with ``radius(c)`` the farthest
  member's distance to the centroid, plus 1 for float32 rounding) probed
  through ``range_search_preassigned``.

Corpora (both synthetic: real PhotoDNA hashes are licensed and not shared):

* ``uniform``: every byte uniform in 0-255. No structure to prune with.
* ``clustered``: families of near-duplicates. Family centres come from a
  12-dimensional Gaussian mapped linearly into the 144 bytes (a stand-in for
  the correlations real image descriptors have), clipped to 0-255; each
  family has 4 members on average, each its centre plus Gaussian noise
  (sigma 6) per byte.

Queries: half are listed vectors with fresh noise (sigma 6) per byte, half
are new vectors drawn like the corpus (misses, mostly). Each engine runs in
its own child process, one after the other, so memory figures are its own:
held = RSS after the build minus RSS before loading the vectors; peak = the
process's VmHWM minus the same baseline. Single lookups run for at most
``--single-seconds``; batched lookups answer all queries in one call.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .common import DOCS, memory_of, write_section

ENGINES = ("hashfed", "faiss-flat", "faiss-ivf")
WIDTH = 144
LATENT = 12
FAMILY = 4
NOISE = 6.0


def make_corpus(
    kind: str, n: int, queries: int, seed: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        codes = rng.integers(0, 256, (n, WIDTH), dtype=np.uint8)
        fresh = rng.integers(0, 256, (queries - queries // 2, WIDTH), dtype=np.uint8)
    else:
        mixing = rng.normal(0.0, 18.0, (LATENT, WIDTH))
        families = max(1, n // FAMILY)
        centres = np.clip(128 + rng.normal(0.0, 1.0, (families, LATENT)) @ mixing, 0, 255).astype(np.float32)
        codes = np.empty((n, WIDTH), dtype=np.uint8)
        for start in range(0, n, 1 << 18):
            stop = min(n, start + (1 << 18))
            owners = rng.integers(0, families, stop - start)
            noisy = centres[owners] + rng.normal(0.0, NOISE, (stop - start, WIDTH)).astype(np.float32)
            codes[start:stop] = np.clip(np.rint(noisy), 0, 255)
        new = np.clip(128 + rng.normal(0.0, 1.0, (queries - queries // 2, LATENT)) @ mixing, 0, 255)
        fresh = np.clip(np.rint(new + rng.normal(0.0, NOISE, new.shape)), 0, 255).astype(np.uint8)
    near = codes[rng.integers(0, n, queries // 2)].astype(np.float64)
    near = np.clip(np.rint(near + rng.normal(0.0, NOISE, near.shape)), 0, 255).astype(np.uint8)
    asked = np.concatenate([near, fresh])
    return codes, asked[rng.permutation(len(asked))]


# ---- one engine, in a child process ------------------------------------------------


def _rss() -> int:
    return memory_of(os.getpid())[0]


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def run_engine(engine: str, data: Path, radii: list[int], single_seconds: float) -> dict[str, Any]:
    baseline = _rss()
    _reset_peak()
    started = time.perf_counter()
    codes = np.load(data / "codes.npy")
    queries = np.load(data / "queries.npy")
    hexes = [row.tobytes().hex() for row in queries]
    report: dict[str, Any] = {"engine": engine}
    if engine == "hashfed":
        from federation.index.segmented import SegmentedIndex
        from federation.signals import PHOTODNA

        index = SegmentedIndex.l2(PHOTODNA, codes)
        del codes

        def search(batch: list[int], radius: int) -> list[list[str]]:
            found = index.search([hexes[i] for i in batch], radius)
            return [[h for h, _ in matches] for matches in found]

    elif engine == "faiss-ivf":
        search = _exact_ivf(codes, queries)
        del codes
    else:
        import faiss

        flat = faiss.IndexFlatL2(WIDTH)
        for start in range(0, len(codes), 1 << 18):
            flat.add(codes[start : start + (1 << 18)].astype(np.float32))
        norms = np.empty(len(codes), dtype=np.int64)
        for start in range(0, len(codes), 1 << 18):
            chunk = codes[start : start + (1 << 18)].astype(np.int64)
            norms[start : start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)

        def search(batch: list[int], radius: int) -> list[list[str]]:
            asked = queries[batch]
            lims, _, ids = flat.range_search(asked.astype(np.float32), radius + 64.0)
            out = []
            for position in range(len(batch)):
                rows = ids[lims[position] : lims[position + 1]]
                q = asked[position].astype(np.int64)
                exact = int(q @ q) + norms[rows] - 2 * (codes[rows].astype(np.int64) @ q)
                out.append([codes[r].tobytes().hex() for r in rows[exact <= radius]])
            return out

    report["build_s"] = time.perf_counter() - started
    rss, peak = memory_of(os.getpid())
    report["held_bytes"] = rss - baseline
    report["peak_bytes"] = peak - baseline
    report["radii"] = {}
    for radius in radii:
        done = 0
        began = time.perf_counter()
        search([0], radius)  # warm up
        began = time.perf_counter()
        while done < len(queries) and time.perf_counter() - began < single_seconds:
            search([done], radius)
            done += 1
        single = done / (time.perf_counter() - began)
        began = time.perf_counter()
        answers = search(list(range(len(queries))), radius)
        batched = len(queries) / (time.perf_counter() - began)
        pairs = sorted(f"{q}:{h}" for q, found in enumerate(answers) for h in found)
        (data / f"{engine}-{radius}.json").write_text(json.dumps(pairs))
        report["radii"][str(radius)] = {"single_qps": single, "batched_qps": batched, "hits": len(pairs)}
    return report


def _exact_ivf(codes: npt.NDArray[np.uint8], queries: npt.NDArray[np.uint8]) -> Any:
    """FAISS's inverted file, probed in every cell a query's ball can reach: exact (see above)."""
    import faiss

    n = len(codes)
    cells = max(1, min(n // 39, int(2 * np.sqrt(n))))
    rng = np.random.default_rng(0)
    sample = codes[np.sort(rng.choice(n, min(n, 32 * cells), replace=False))].astype(np.float32)
    quantizer = faiss.IndexFlatL2(WIDTH)
    ivf = faiss.IndexIVFScalarQuantizer(
        quantizer, WIDTH, cells, faiss.ScalarQuantizer.QT_8bit_direct, faiss.METRIC_L2, False
    )
    ivf.cp.niter = 10  # as the hub's engine trains; the cells' quality costs no exactness
    ivf.cp.min_points_per_centroid = 16
    ivf.train(sample)
    radius = np.zeros(cells, dtype=np.float64)
    for start in range(0, n, 1 << 18):
        chunk = codes[start : start + (1 << 18)].astype(np.float32)
        distances, assigned = quantizer.search(chunk, 1)
        ids = np.arange(start, start + len(chunk), dtype=np.int64)
        lists = np.ascontiguousarray(assigned[:, 0])  # kept alive while FAISS reads the pointers
        ivf.add_core(len(chunk), faiss.swig_ptr(chunk), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
        # Float32 distances to float32 centroids; the slack below covers their rounding.
        np.maximum.at(radius, assigned[:, 0], np.sqrt(np.maximum(distances[:, 0], 0.0)))
    centroids = quantizer.reconstruct_n(0, cells).astype(np.float64)
    centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
    ivf.make_direct_map()  # to read the listed bytes back for the answers

    def search(batch: list[int], max_distance: int) -> list[list[str]]:
        asked = queries[batch].astype(np.float64)
        squared = np.einsum("ij,ij->i", asked, asked)[:, None] + centroid_norms - 2 * asked @ centroids.T
        reachable = np.sqrt(np.maximum(squared, 0.0)) - radius <= np.sqrt(max_distance) + 1.0
        probes = np.full((len(batch), max(1, int(reachable.sum(axis=1).max()))), -1, dtype=np.int64)
        for position, row in enumerate(reachable):
            listed = np.flatnonzero(row)
            probes[position, : len(listed)] = listed
        ivf.nprobe = probes.shape[1]
        lims, distances, ids = ivf.range_search_preassigned(
            asked.astype(np.float32), max_distance + 0.5, probes, np.zeros(probes.shape, np.float32)
        )
        ids = ids[distances <= max_distance]  # exact: integer sums below 2^24
        lims = np.searchsorted(np.flatnonzero(distances <= max_distance), lims)
        listed = ivf.reconstruct_batch(ids).astype(np.uint8) if len(ids) else np.empty((0, WIDTH), np.uint8)
        return [[row.tobytes().hex() for row in listed[lims[i] : lims[i + 1]]] for i in range(len(batch))]

    return search


# ---- the parent: corpora, children, comparison, docs --------------------------------


def _child(engine: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_photodna",
        "--child",
        engine,
        "--data",
        str(data),
        "--radii",
        args.radii,
        "--single-seconds",
        str(args.single_seconds),
    ]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return report


def _machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    radii = [int(r) for r in args.radii.split(",")]
    rows: list[dict[str, Any]] = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for kind in args.corpora.split(","):
            with tempfile.TemporaryDirectory(prefix="bench-photodna-") as scratch:
                data = Path(scratch)
                codes, queries = make_corpus(kind, size, args.queries, seed=size + len(kind))
                np.save(data / "codes.npy", codes)
                np.save(data / "queries.npy", queries)
                del codes
                reports = {engine: _child(engine, data, args) for engine in ENGINES}
                for radius in radii:
                    oracle = set(json.loads((data / f"faiss-flat-{radius}.json").read_text()))
                    for engine, report in reports.items():
                        got = set(json.loads((data / f"{engine}-{radius}.json").read_text()))
                        figures = report["radii"][str(radius)]
                        rows.append(
                            {
                                "size": size,
                                "corpus": kind,
                                "radius": radius,
                                "engine": engine,
                                "build_s": report["build_s"],
                                "held": report["held_bytes"],
                                "peak": report["peak_bytes"],
                                "single": figures["single_qps"],
                                "batched": figures["batched_qps"],
                                "recall": len(got & oracle) / len(oracle) if oracle else 1.0,
                                "extra": len(got - oracle),
                                "hits": len(oracle),
                            }
                        )
                        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| vectors | corpus | R | engine | build s | held MiB | peak MiB | single/s | batched/s | vs flat (batched) | recall | extra |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flat = {(r["size"], r["corpus"], r["radius"]): r["batched"] for r in rows if r["engine"] == "faiss-flat"}
    for r in rows:
        speedup = r["batched"] / flat[(r["size"], r["corpus"], r["radius"])]
        lines.append(
            f"| {r['size']:,} | {r['corpus']} | {r['radius']:,} | {r['engine']} | {r['build_s']:.1f} | "
            f"{r['held'] / 2**20:,.0f} | {r['peak'] / 2**20:,.0f} | {r['single']:,.0f} | {r['batched']:,.0f} | "
            f"{speedup:.1f}x | {r['recall']:.4f} | {r['extra']} |"
        )
    return "\n".join(lines)


def write_docs(command: str, rows: list[dict[str, Any]], seconds: float, args: argparse.Namespace) -> None:
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"""### PhotoDNA radius search

Generated by `benchmarks/bench_photodna.py`; everything between the markers is
rewritten by `--write-docs`.

- Command: `{command}` (took {seconds / 60:.1f} min)
- Date: {date}
- Machine: {_machine()}
- {args.queries:,} queries per corpus: half listed vectors with fresh noise, half new vectors;
  single lookups for at most {args.single_seconds:g} s, batched = all queries in one call.
- Both corpora are synthetic (real PhotoDNA hashes are licensed): `uniform` bytes, and
  `clustered` families of near-duplicates (4 per family on average, noise sigma 6 per byte)
  whose centres come from a 12-dimensional Gaussian mapped into the 144 bytes.
- Recall: (query, hash) pairs against `faiss-flat` re-ranked exactly; extra = pairs it lacks.
- Held / peak: RSS of the engine's own child process after the build, and at its highest,
  minus its RSS before it loaded the vectors (so the vectors themselves are counted).

{table(rows)}
"""
    write_section("bench_photodna", section)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sizes", default="1000000", help="comma-separated corpus sizes")
    parser.add_argument("--corpora", default="uniform,clustered", help="uniform, clustered or both")
    parser.add_argument("--radii", default="30000,100000", help="squared distances, comma-separated")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single-seconds", type=float, default=10.0)
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS}")
    parser.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        radii = [int(r) for r in args.radii.split(",")]
        print(json.dumps(run_engine(args.child, args.data, radii, args.single_seconds)))
        return
    began = time.perf_counter()
    rows = run(args)
    print(table(rows))
    if args.write_docs:
        command = "python -m benchmarks.bench_photodna " + " ".join(argv)
        write_docs(command.replace(" --write-docs", "").strip(), rows, time.perf_counter() - began, args)


if __name__ == "__main__":
    main()
