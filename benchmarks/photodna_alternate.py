"""Check one PhotoDNA figure when the machine's speed drifts: both engines in one process, searched alternately.

    python -m benchmarks.photodna_alternate --size 10000000 --radius 30000 --rounds 2

Builds the hub's PhotoDNA index and a FAISS ``IndexFlatL2`` over the same
clustered corpus and queries as ``benchmarks.bench_photodna`` (same seed),
then times one batched search of each, alternately, ``--rounds`` times. FAISS
is timed for ``range_search`` alone (no exact re-ranking), which favours it.
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

from federation.index.segmented import SegmentedIndex
from federation.signals import PHOTODNA

from .bench_photodna import make_corpus


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1_000_000)
    parser.add_argument("--radius", type=int, default=30_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1000)
    args = parser.parse_args()
    codes, queries = make_corpus("clustered", args.size, args.queries, seed=args.size + len("clustered"))
    hexes = [row.tobytes().hex() for row in queries]
    index = SegmentedIndex.l2(PHOTODNA, codes)
    flat = faiss.IndexFlatL2(codes.shape[1])
    for start in range(0, len(codes), 1 << 18):
        flat.add(codes[start : start + (1 << 18)].astype(np.float32))
    as_floats = queries.astype(np.float32)
    for round_ in range(args.rounds):
        began = time.perf_counter()
        index.search(hexes, args.radius)
        ours = len(queries) / (time.perf_counter() - began)
        began = time.perf_counter()
        flat.range_search(as_floats, args.radius + 64.0)
        theirs = len(queries) / (time.perf_counter() - began)
        print(f"round {round_}: hashfed {ours:,.0f}/s, faiss-flat {theirs:,.0f}/s, {ours / theirs:.1f}x")


if __name__ == "__main__":
    main()
