"""Search indexes over the hashes currently listed in a collection."""

from federation.index.engines import (
    ExactIndex,
    FaissBinaryIndex,
    Match,
    SearchIndex,
)

__all__ = ["ExactIndex", "FaissBinaryIndex", "Match", "SearchIndex"]
