"""Benchmark vPDQ video lookups: the hub's video index against a brute-force matcher, same data.

    python -m benchmarks.bench_vpdq                              # 1M listed frames
    python -m benchmarks.bench_vpdq --frames 1000000,10000000 --write-docs

Listed videos have ``--video-frames`` (1,000) frames each: scenes of 25
frames, each frame its scene's PDQ hash with 0-8 bits flipped (consecutive
frames of a shot are near-duplicates; vPDQ keeps the distinct ones). Query
videos have 1,000 frames: half are listed videos re-encoded (every frame
0-10 more bits off), half are unrelated videos made the same way.

Engines, each answering python-threatexchange's vPDQ rule (max distance 31,
query match >= 80%, compared match >= 0%):

* ``hashfed``: ``VPDQ.new_index()`` (the video index over the PDQ engine),
  searched through ``VPDQ.search``, as a hub does.
* ``brute-force``: FAISS ``IndexBinaryFlat`` over every listed frame
  (``range_search``), then the per-video tally in numpy. python-threatexchange's
  own vPDQ matcher needs its ``vpdq`` extension, whose C++ build does not
  install here, so this matcher stands in for it; both compute the same rule.

The answers (video, distance, both percentages) are compared query by query.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .common import DOCS, memory_of, write_section

SCENE = 25
RADIUS = 31
MIN_QUERY = 80.0


def flip_some(codes: npt.NDArray[np.uint8], most: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """Each code with up to ``most`` random bits flipped."""
    bits = np.unpackbits(codes, axis=1)
    counts = rng.integers(0, most + 1, len(codes))
    positions = rng.integers(0, 256, (len(codes), most))
    chosen = np.arange(most)[None, :] < counts[:, None]
    rows = np.repeat(np.arange(len(codes)), most)[chosen.ravel()]
    bits[rows, positions[chosen]] ^= 1
    packed: npt.NDArray[np.uint8] = np.packbits(bits, axis=1)
    return packed


def make_video(frames: int, rng: np.random.Generator) -> npt.NDArray[np.uint8]:
    """A video's distinct frames: scenes of near-duplicate frames (0-8 bits apart from the scene's)."""
    scenes = rng.integers(0, 256, (frames // SCENE + 1, 32), dtype=np.uint8)
    base = np.repeat(scenes, SCENE, axis=0)[:frames]
    return np.unique(flip_some(base, 8, rng), axis=0)


def identity_of(codes: npt.NDArray[np.uint8]) -> str:
    import hashlib

    return hashlib.sha256("".join(row.tobytes().hex() + "\n" for row in codes).encode()).hexdigest()


def brute_force(listed: list[npt.NDArray[np.uint8]], names: list[str]) -> tuple[Any, Any]:
    import faiss

    frames = np.concatenate(listed)
    owner = np.repeat(np.arange(len(listed)), [len(v) for v in listed])
    sizes = np.array([len(v) for v in listed])
    index = faiss.IndexBinaryFlat(256)
    index.add(frames)

    def search(query: npt.NDArray[np.uint8]) -> list[tuple[str, int, float, float]]:
        lims, distances, ids = index.range_search(query, RADIUS + 1)
        which = np.repeat(np.arange(len(query)), np.diff(lims.astype(np.int64)))
        videos = owner[ids]
        answers = []
        for video in np.unique(videos):
            mine = videos == video
            per_query = {}
            for q, d in zip(which[mine].tolist(), distances[mine].tolist(), strict=True):
                per_query[q] = min(d, per_query.get(q, d))
            query_percent = 100.0 * len(per_query) / len(query)
            compared_percent = 100.0 * len(np.unique(ids[mine])) / sizes[video]
            if query_percent >= MIN_QUERY:
                answers.append((names[video], max(per_query.values()), query_percent, compared_percent))
        return sorted(answers, key=lambda a: (a[1], a[0]))

    return index, search


def hashfed(listed: list[npt.NDArray[np.uint8]], names: list[str]) -> tuple[Any, Any]:
    from federation.signals import VPDQ, Query
    from federation.signals.vpdq import VideoQuery

    index = VPDQ.new_index()
    for name, video in zip(names, listed, strict=True):
        index.add([name], [video.tobytes()])  # type: ignore[call-arg]
    index.frames.merge()  # type: ignore[attr-defined]

    def search(query: npt.NDArray[np.uint8]) -> list[tuple[str, int, float, float]]:
        detail = VideoQuery(tuple(row.tobytes().hex() for row in query), MIN_QUERY, 0.0)
        hits = VPDQ.search(index, [Query(VPDQ, "", RADIUS, detail)], None)[0]
        return [(h.hash, h.distance, h.fields[0][1], h.fields[1][1]) for h in hits]

    return index, search


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for total in [int(n) for n in args.frames.split(",")]:
        rng = np.random.default_rng(total)
        videos = total // args.video_frames
        listed = [make_video(args.video_frames, rng) for _ in range(videos)]
        names = [identity_of(v) for v in listed]
        picked = rng.choice(videos, args.queries // 2, replace=False)
        queries = [np.unique(flip_some(listed[p], 10, rng), axis=0) for p in picked]
        queries += [make_video(args.video_frames, rng) for _ in range(args.queries - len(queries))]
        results: dict[str, list[list[tuple[str, int, float, float]]]] = {}
        for engine in ("hashfed", "brute-force"):
            baseline = memory_of(os.getpid())[0]
            started = time.perf_counter()
            if engine == "hashfed":
                holder, search = hashfed(listed, names)
            else:
                holder, search = brute_force(listed, names)
            build = time.perf_counter() - started
            held = memory_of(os.getpid())[0] - baseline
            timings = []
            answers = []
            for query in queries:
                began = time.perf_counter()
                answers.append(search(query))
                timings.append(time.perf_counter() - began)
            results[engine] = answers
            rows.append(
                {
                    "frames": sum(len(v) for v in listed),
                    "videos": videos,
                    "engine": engine,
                    "build_s": build,
                    "held": held,
                    "median_ms": 1000 * float(np.median(timings)),
                    "max_ms": 1000 * float(np.max(timings)),
                    "matched": sum(1 for a in answers if a),
                }
            )
            print(rows[-1], file=sys.stderr)
            del holder, search
        same = all(
            [(a[0], a[1]) for a in x] == [(b[0], b[1]) for b in y]
            and all(abs(a[2] - b[2]) < 1e-9 and abs(a[3] - b[3]) < 1e-9 for a, b in zip(x, y, strict=True))
            for x, y in zip(results["hashfed"], results["brute-force"], strict=True)
        )
        for row in rows[-2:]:
            row["same_answers"] = same
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| listed frames | videos | engine | build s | held MiB | lookup ms (median) | lookup ms (max) | queries matched | answers equal |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frames']:,} | {r['videos']:,} | {r['engine']} | {r['build_s']:.1f} | {r['held'] / 2**20:,.0f} | "
            f"{r['median_ms']:,.0f} | {r['max_ms']:,.0f} | {r['matched']} | {'yes' if r['same_answers'] else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--frames", default="1000000", help="listed frames, comma-separated sizes")
    parser.add_argument("--video-frames", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=10, help="query videos of 1,000 frames")
    parser.add_argument("--write-docs", action="store_true", help=f"rewrite the section in {DOCS}")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    rows = run(args)
    print(table(rows))
    if not args.write_docs:
        return
    command = ("python -m benchmarks.bench_vpdq " + " ".join(argv)).replace(" --write-docs", "").strip()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = f"""### vPDQ video lookups

Generated by `benchmarks/bench_vpdq.py`; everything between the markers is
rewritten by `--write-docs`.

- Command: `{command}` (took {(time.perf_counter() - began) / 60:.1f} min); date: {date}
- Listed videos of about {args.video_frames:,} distinct frames (scenes of {SCENE} near-duplicate
  frames); {args.queries} query videos of {args.video_frames:,} frames, half re-encoded copies of
  listed videos, half unrelated. Rule: frame distance <= {RADIUS}, query match >= {MIN_QUERY:.0f}%.
- `brute-force` = FAISS `IndexBinaryFlat` over every listed frame plus a numpy tally per video:
  python-threatexchange's vPDQ matcher needs its `vpdq` extension, whose C++ build does not
  install on this machine, so this matcher stands in for it (same rule, same answers).
- Held = process RSS growth while the engine was built (both engines run in one process, one
  after the other).

{table(rows)}
"""
    write_section("bench_vpdq", section)


if __name__ == "__main__":
    main()
