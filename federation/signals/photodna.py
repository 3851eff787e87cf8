"""PhotoDNA (design §4.1): 144-byte image hashes, matched by squared Euclidean distance.

A PhotoDNA hash is 144 bytes, each an integer 0-255. Tools write it three
ways, and the hub accepts all three in submissions and queries: 288 hex
digits, 144 comma-separated decimal integers, or standard base64 of the
bytes. It stores and answers hex. Two hashes are as far apart as the sum of
the squares of their byte differences (0 to 9,363,600), and a lookup finds
every listed hash within the asked maximum exactly, never approximately.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any

from .base import HEX_DIGITS, LookupDefaults, SignalError, SignalType

if TYPE_CHECKING:
    from ..index.engines import SearchIndex

BYTES = 144
MAX_DISTANCE_LIMIT = BYTES * 255 * 255
DEFAULT_MAX_DISTANCE = 30_000
"""A hub's default when its hub.toml says nothing: about 14 per byte on average (RMS)."""
_BASE64 = re.compile(r"[A-Za-z0-9+/]{192}")


class PhotoDnaSignal(SignalType):
    name = "photodna"
    hex_length = 2 * BYTES
    description = (
        "PhotoDNA (144 bytes: 288 hex digits, 144 comma-separated numbers or base64), "
        "squared Euclidean distance 0-9,363,600"
    )
    max_distance_limit = MAX_DISTANCE_LIMIT
    snapshot_width = BYTES

    def parse(self, text: object) -> str:
        if not isinstance(text, str):
            raise SignalError("photodna hash must be a string: hex, comma-separated numbers or base64")
        value = text.strip()
        if "," in value:
            return _from_decimals(value)
        if len(value) == self.hex_length:
            lowered = value.lower()
            if HEX_DIGITS.issuperset(lowered):
                return lowered
            bad = next(ch for ch in lowered if ch not in HEX_DIGITS)
            raise SignalError(f"photodna hash has a non-hex character {bad!r}")
        if _BASE64.fullmatch(value):
            try:
                return base64.b64decode(value, validate=True).hex()
            except binascii.Error as exc:  # pragma: no cover - the pattern admits only valid base64
                raise SignalError(f"photodna hash is not valid base64: {exc}") from None
        raise SignalError(
            f"photodna hash must be {self.hex_length} hex digits, {BYTES} comma-separated numbers "
            f"0-255, or base64 of {BYTES} bytes (192 characters); got {len(value)} characters"
        )

    def recognises(self, text: str) -> bool:
        """Whether a bare hash is written in one of PhotoDNA's forms (no other type shares them)."""
        value = text.strip()
        return (
            value.count(",") == BYTES - 1 or len(value) == self.hex_length or bool(_BASE64.fullmatch(value))
        )

    def distance(self, a: str, b: str) -> int:
        return sum((x - y) ** 2 for x, y in zip(bytes.fromhex(a), bytes.fromhex(b), strict=True))

    def default_json(self, defaults: LookupDefaults) -> Any:
        return defaults.photodna_max_distance

    def default_max_distance(self, defaults: LookupDefaults) -> int:
        return defaults.photodna_max_distance

    def new_index(self, codes: Any = None, **options: Any) -> SearchIndex:
        from ..index.segmented import SegmentedIndex

        return SegmentedIndex.l2(self, codes, **options)


def _from_decimals(value: str) -> str:
    parts = value.split(",")
    if len(parts) != BYTES:
        raise SignalError(f"photodna hash written as numbers must have {BYTES} of them, got {len(parts)}")
    numbers = bytearray()
    for position, part in enumerate(parts):
        part = part.strip()
        if not part.isascii() or not part.isdigit() or int(part) > 255:
            raise SignalError(
                f"photodna hash number {position + 1} must be an integer from 0 to 255, got {part!r}"
            )
        numbers.append(int(part))
    return bytes(numbers).hex()


PHOTODNA = PhotoDnaSignal()
