"""vPDQ (design §4.1): a video as the set of PDQ hashes of its frames.

A listed video carries its ``frames`` (PDQ hash, quality, time). Its
identity, the ``hash``, is the SHA-256 of its distinct PDQ hashes of quality
50 or more, sorted, each followed by a newline, so it ignores frame order,
duplicates, times and low-quality frames. A query carries frames too; a
listed video matches when enough frames on each side have a frame within
``max_distance`` on the other (python-threatexchange's vPDQ rules):

* ``query_match_percent``: the share of the query's frames that match the video;
* ``compared_match_percent``: the share of the video's frames that match the query;
* ``distance``: the largest, over the query's matching frames, of the distance
  to the nearest frame of the video.

Frames are searched through the PDQ engine (:mod:`federation.signals.pdq`);
:class:`~federation.index.videos.VideoIndex` adds the frame-to-video map.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .base import (
    QUERY_FIELDS,
    Frame,
    Hit,
    LookupDefaults,
    Query,
    QueryShapeError,
    SignalError,
    SignalType,
    check_hex,
    check_int,
    check_percent,
)
from .pdq import MIN_QUALITY, PDQ

if TYPE_CHECKING:
    from ..index.budget import MatchBudget
    from ..index.engines import SearchIndex

MAX_FRAMES = 10_000
FRAME_FIELDS = frozenset({"pdq", "quality", "time"})
VIDEO_QUERY_FIELDS = QUERY_FIELDS | {"frames", "min_query_match_percent", "min_compared_match_percent"}


@dataclass(frozen=True)
class VideoQuery:
    """What a vPDQ query asks beyond its distance: its distinct good frames and both thresholds."""

    frames: tuple[str, ...]
    min_query_match_percent: float
    min_compared_match_percent: float


def parse_frames(value: object) -> tuple[Frame, ...]:
    """The ``frames`` field of a video item or query; errors name the frame and its field."""
    if not isinstance(value, list) or not value:
        raise SignalError("frames must be a non-empty list of {pdq, quality, time} objects")
    if len(value) > MAX_FRAMES:
        raise SignalError(f"frames has {len(value):,} frames; at most {MAX_FRAMES:,} are allowed")
    frames = []
    for position, item in enumerate(value):
        where = f"frames[{position}]"
        if not isinstance(item, dict):
            raise SignalError(f"{where} must be an object with pdq, quality and optionally time")
        unknown = sorted(set(item) - FRAME_FIELDS)
        if unknown:
            raise SignalError(f"{where} has unknown field {unknown[0]!r}")
        for required in ("pdq", "quality"):
            if required not in item:
                raise SignalError(f"{where}.{required} is required")
        try:
            pdq = check_hex("pdq", item["pdq"], PDQ.hex_length)
        except SignalError as exc:
            raise SignalError(f"{where}.pdq: {exc}") from None
        quality = check_int(item["quality"], f"{where}.quality", 0, 100)
        time = item.get("time")
        if time is not None and (
            isinstance(time, bool) or not isinstance(time, int | float) or not math.isfinite(time) or time < 0
        ):
            raise SignalError(f"{where}.time must be a number of seconds from the start, 0 or more")
        frames.append(Frame(pdq, quality, time))
    return tuple(frames)


def good_frames(frames: Sequence[Frame]) -> tuple[str, ...]:
    """The distinct PDQ hashes of quality 50 or more, sorted: what identity and matching use."""
    return tuple(sorted({frame.pdq for frame in frames if frame.quality >= MIN_QUALITY}))


def identity(frames: Sequence[Frame]) -> str:
    """A video's ``hash``: SHA-256 of its good frames' hashes, sorted, each ending in a newline."""
    good = good_frames(frames)
    if not good:
        raise SignalError(f"frames has no frame of quality {MIN_QUALITY} or more: such a video cannot match")
    return hashlib.sha256("".join(f"{pdq}\n" for pdq in good).encode()).hexdigest()


def _checked_identity(frames: tuple[Frame, ...], claimed: str | None) -> str:
    computed = identity(frames)
    if claimed is not None and claimed != computed:
        raise SignalError(
            f"hash {claimed} is not the identity computed from frames ({computed}): "
            "SHA-256 of the distinct pdq hashes of quality >= 50, sorted, each followed by a newline"
        )
    return computed


class VpdqSignal(SignalType):
    name = "vpdq"
    hex_length = 64
    description = "vPDQ video (64-hex identity plus frames of PDQ hashes), frame distance 0-63, 31 by default"
    max_distance_limit = 63
    takes_request_max_distance = True
    has_content = True

    def distance(self, a: str, b: str) -> int:
        return 0 if a == b else 1

    def parse_extras(
        self, item: Mapping[str, Any], hash_hex: str
    ) -> tuple[int | None, tuple[Frame, ...] | None]:
        if "quality" in item:
            raise SignalError("quality applies to each of a vpdq video's frames, not to the video")
        if "frames" not in item:
            raise SignalError("a vpdq item needs frames: [{pdq, quality, time}, ...]")
        frames = parse_frames(item["frames"])
        _checked_identity(frames, hash_hex)
        return None, frames

    def read_document(self, document: Any) -> tuple[str, tuple[Frame, ...]] | None:
        """python-threatexchange's vPDQ file: a JSON list of ``"pdqhex,quality,timestamp"`` strings."""
        if (
            not isinstance(document, list)
            or not document
            or not all(isinstance(line, str) for line in document)
        ):
            return None
        frames = []
        for position, line in enumerate(document):
            parts = [part.strip() for part in line.split(",")]
            if len(parts) != 3:
                raise SignalError(
                    f"frame {position + 1}: expected 'pdqhex,quality,timestamp', got {line[:80]!r}"
                )
            try:
                quality, time = int(parts[1]), float(parts[2])
            except ValueError:
                raise SignalError(
                    f"frame {position + 1}: quality and timestamp must be numbers: {line[:80]!r}"
                ) from None
            frames.append({"pdq": parts[0], "quality": quality, "time": time})
        parsed = parse_frames(frames)
        return identity(parsed), parsed

    def content(self, quality: int | None, frames: tuple[Frame, ...] | None) -> bytes | None:
        """The video's good frames as concatenated 32-byte PDQ codes, sorted."""
        return bytes.fromhex("".join(good_frames(frames or ())))

    def default_json(self, defaults: LookupDefaults) -> Any:
        return {
            "max_distance": defaults.vpdq_max_distance,
            "min_query_match_percent": defaults.vpdq_min_query_match_percent,
            "min_compared_match_percent": defaults.vpdq_min_compared_match_percent,
        }

    def default_max_distance(self, defaults: LookupDefaults) -> int:
        return defaults.vpdq_max_distance

    def query_fields(self) -> frozenset[str]:
        return VIDEO_QUERY_FIELDS

    def parse_query(
        self, item: Mapping[str, Any], request_max_distance: int | None, defaults: LookupDefaults
    ) -> Query:
        unknown = sorted(set(item) - VIDEO_QUERY_FIELDS)
        if unknown:
            raise QueryShapeError(f"{unknown[0]} does not apply to vpdq queries")
        if "frames" not in item:
            raise QueryShapeError("a vpdq query needs frames: [{pdq, quality, time}, ...]")
        frames = parse_frames(item["frames"])
        claimed = self.parse(item["hash"]) if "hash" in item else None
        video = _checked_identity(frames, claimed)
        detail = VideoQuery(
            good_frames(frames),
            check_percent(
                item.get("min_query_match_percent", defaults.vpdq_min_query_match_percent),
                "min_query_match_percent",
            ),
            check_percent(
                item.get("min_compared_match_percent", defaults.vpdq_min_compared_match_percent),
                "min_compared_match_percent",
            ),
        )
        return Query(self, video, self.resolve_max_distance(item, request_max_distance, defaults), detail)

    def new_index(self, codes: Any = None, **options: Any) -> SearchIndex:
        from ..index.videos import VideoIndex

        return VideoIndex(self, PDQ.new_index())

    def search(
        self, index: SearchIndex, queries: Sequence[Query], budget: MatchBudget | None
    ) -> list[list[Hit]]:
        from ..index.videos import VideoIndex

        assert isinstance(index, VideoIndex)
        results = []
        for position, query in enumerate(queries):
            if isinstance(query.detail, VideoQuery):
                results.append(index.search_video(query.detail, query.max_distance, budget, position))
            else:  # a video named by its identity alone (never from the wire: queries carry frames)
                part = budget.subset([position]) if budget is not None else None
                results.append([Hit(*match) for match in index.search([query.hash], 0, part)[0]])
        return results


VPDQ = VpdqSignal()
