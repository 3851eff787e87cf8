"""Videos as sets of frames: the vPDQ index over the PDQ engine (design §4.1).

A :class:`VideoIndex` keeps each listed video's good frames and, for every
distinct frame hash, the videos that have it. The frame hashes themselves
live in a PDQ index (the same engine PDQ images use); a video query is one
batched frame search followed by a tally per video.

Updates take a lock; searches do not: each frame's owners are a video name
or an immutable tuple of them, replaced whole, so a search sees a frame's
owners before or after an update, never half of one.

Memory: a video's frames are kept as one bytes object (32 bytes a frame),
and the frame map is keyed by the raw 32 bytes, its value the video's name
itself when one video has the frame (the common case), so a listed frame
costs about 150 bytes beside the PDQ engine's 32-40.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..signals.base import Hit
from .budget import MatchBudget
from .engines import CodeFormat, Match, SearchIndex

if TYPE_CHECKING:
    from ..signals.vpdq import VideoQuery

FRAME_BYTES = 32
Owners = str | tuple[str, ...]


class VideoIndex:
    def __init__(self, signal: CodeFormat, frames: SearchIndex) -> None:
        self.signal = signal
        self.frames = frames
        self._lock = threading.Lock()
        self._videos: dict[str, bytes] = {}
        self._owners: dict[bytes, Owners] = {}

    def add(self, hashes: Sequence[str], contents: Sequence[bytes] | None = None) -> None:
        """Add videos with their good frames (``contents``: concatenated 32-byte codes each)."""
        if contents is None or len(contents) != len(hashes):
            raise ValueError("videos are added with their frames: one content per hash")
        with self._lock:
            new_frames: list[str] = []
            for video, content in zip(hashes, contents, strict=True):
                if video in self._videos or len(content) % FRAME_BYTES:
                    continue
                self._videos[video] = content
                for start in range(0, len(content), FRAME_BYTES):
                    frame = content[start : start + FRAME_BYTES]
                    owners = self._owners.get(frame)
                    if owners is None:
                        new_frames.append(frame.hex())
                        self._owners[frame] = video
                    else:
                        self._owners[frame] = (owners, video) if isinstance(owners, str) else (*owners, video)
            if new_frames:
                self.frames.add(new_frames)

    def remove(self, hashes: Sequence[str]) -> None:
        with self._lock:
            gone: list[str] = []
            for video in hashes:
                content = self._videos.pop(video, None)
                if content is None:
                    continue
                for start in range(0, len(content), FRAME_BYTES):
                    frame = content[start : start + FRAME_BYTES]
                    owners = self._owners[frame]
                    left = () if isinstance(owners, str) else tuple(o for o in owners if o != video)
                    if not left:
                        del self._owners[frame]
                        gone.append(frame.hex())
                    else:
                        self._owners[frame] = left[0] if len(left) == 1 else left
            if gone:
                self.frames.remove(gone)

    def search(
        self, queries: Sequence[str], max_distance: int, budget: MatchBudget | None = None
    ) -> list[list[Match]]:
        """Videos by identity alone (distance 0): the plain index interface, for completeness."""
        results: list[list[Match]] = []
        for position, video in enumerate(queries):
            present = video in self._videos and (budget is None or budget.take(position, 1) > 0)
            results.append([(video, 0)] if present else [])
        return results

    def search_video(
        self, query: VideoQuery, max_distance: int, budget: MatchBudget | None, position: int
    ) -> list[Hit]:
        """The listed videos matching one video query, nearest first (see :mod:`federation.signals.vpdq`).

        The frame search is bounded like any lookup (per frame and in all);
        if it was cut, the percentages may be low and the result says
        ``truncated``.
        """
        frames = list(query.frames)
        frame_budget = MatchBudget(budget.per_query, budget.per_answer) if budget is not None else None
        found = self.frames.search(frames, max_distance, frame_budget)
        nearest: dict[str, dict[int, int]] = {}
        matched: dict[str, set[bytes]] = {}
        owners_of = self._owners.get
        for frame_position, hits in enumerate(found):
            for frame_hex, distance in hits:
                frame = bytes.fromhex(frame_hex)
                owners = owners_of(frame, ())
                for video in (owners,) if isinstance(owners, str) else owners:
                    best = nearest.setdefault(video, {})
                    if distance < best.get(frame_position, distance + 1):
                        best[frame_position] = distance
                    matched.setdefault(video, set()).add(frame)
        hits_out: list[Hit] = []
        for video, best in nearest.items():
            listed = self._videos.get(video)
            if not listed:
                continue  # removed while this search ran
            query_percent = 100.0 * len(best) / len(frames)
            compared_percent = 100.0 * len(matched[video]) / (len(listed) // FRAME_BYTES)
            if (
                query_percent >= query.min_query_match_percent
                and compared_percent >= query.min_compared_match_percent
            ):
                hits_out.append(
                    Hit(
                        video,
                        max(best.values()),
                        (
                            ("query_match_percent", query_percent),
                            ("compared_match_percent", compared_percent),
                        ),
                    )
                )
        hits_out.sort(key=lambda hit: (hit.distance, hit.hash))
        if budget is not None:
            del hits_out[budget.take(position, len(hits_out)) :]
            if frame_budget is not None and frame_budget.truncated:
                budget.truncated.add(position)
        return hits_out

    def __len__(self) -> int:
        return len(self._videos)

    def __contains__(self, hash_hex: object) -> bool:
        return hash_hex in self._videos

    def frame_count(self) -> int:
        """Distinct frames held (the PDQ engine's size)."""
        return len(self._owners)
