"""PDQ (design §4): Meta's 256-bit perceptual image hash, matched by Hamming distance."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import Frame, LookupDefaults, SignalError, SignalType, check_int

DEFAULT_MAX_DISTANCE = 31
MAX_DISTANCE_LIMIT = 63
if TYPE_CHECKING:
    from ..index.engines import SearchIndex

MIN_QUALITY = 50
"""PDQ's own guidance: hashes of lower quality match unrelated images."""


def check_quality(quality: object, where: str = "quality") -> int:
    """A PDQ quality score, refusing the ones PDQ itself says not to trust."""
    check_int(quality, where, 0, 100)
    assert isinstance(quality, int)
    if quality < MIN_QUALITY:
        raise SignalError(f"{where} {quality} is below {MIN_QUALITY}: such hashes match unrelated images")
    return quality


class PdqSignal(SignalType):
    name = "pdq"
    hex_length = 64
    description = "PDQ image hash (64 hex digits), Hamming distance 0-63, 31 by default"
    max_distance_limit = MAX_DISTANCE_LIMIT
    takes_request_max_distance = True
    snapshot_width = 32

    def distance(self, a: str, b: str) -> int:
        return (int(a, 16) ^ int(b, 16)).bit_count()

    def parse_extras(
        self, item: Mapping[str, Any], hash_hex: str
    ) -> tuple[int | None, tuple[Frame, ...] | None]:
        if "frames" in item:
            raise SignalError("frames apply to vpdq videos, not pdq hashes")
        return (check_quality(item["quality"]) if "quality" in item else None), None

    def default_json(self, defaults: LookupDefaults) -> Any:
        return defaults.pdq_max_distance

    def default_max_distance(self, defaults: LookupDefaults) -> int:
        return defaults.pdq_max_distance

    def new_index(self, codes: Any = None, **options: Any) -> SearchIndex:
        from ..index.segmented import SegmentedIndex

        return SegmentedIndex.binary(self, codes, **options)


PDQ = PdqSignal()
