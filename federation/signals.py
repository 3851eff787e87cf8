"""Signal types (design §4): parsing, normalisation and distance.

A signal type knows the shape of its hashes and how two of them compare. PDQ
is perceptual (matched by Hamming distance); MD5 and SHA-256 match exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

HEX_DIGITS = frozenset("0123456789abcdef")
PDQ_DEFAULT_MAX_DISTANCE = 31
PDQ_MAX_DISTANCE_LIMIT = 63
PDQ_MIN_QUALITY = 50


class SignalError(ValueError):
    """A hash or signal field that cannot be accepted; the message says why."""


@dataclass(frozen=True)
class SignalType:
    name: str
    bits: int
    exact: bool
    """True when only identical hashes match (cryptographic hashes)."""

    @property
    def hex_length(self) -> int:
        return self.bits // 4

    @property
    def byte_length(self) -> int:
        return self.bits // 8

    def parse(self, text: object) -> str:
        """Return the normalised (lower-case hex) hash, or raise SignalError."""
        if not isinstance(text, str):
            raise SignalError(f"{self.name} hash must be a string of hex digits")
        value = text.lower()
        if len(value) != self.hex_length:
            raise SignalError(f"{self.name} hash must be {self.hex_length} hex digits, got {len(value)}")
        if not HEX_DIGITS.issuperset(value):
            bad = next(ch for ch in value if ch not in HEX_DIGITS)
            raise SignalError(f"{self.name} hash has a non-hex character {bad!r}")
        return value

    def distance(self, a: str, b: str) -> int:
        """Hamming distance in bits between two normalised hashes."""
        return (int(a, 16) ^ int(b, 16)).bit_count()


PDQ = SignalType("pdq", 256, exact=False)
MD5 = SignalType("md5", 128, exact=True)
SHA256 = SignalType("sha256", 256, exact=True)

SIGNAL_TYPES: Mapping[str, SignalType] = MappingProxyType(
    {signal.name: signal for signal in (PDQ, MD5, SHA256)}
)


def signal_type(name: object) -> SignalType:
    if not isinstance(name, str) or name not in SIGNAL_TYPES:
        known = ", ".join(SIGNAL_TYPES)
        raise SignalError(f"unknown signal type {name!r}: expected one of {known}")
    return SIGNAL_TYPES[name]


def check_quality(signal: SignalType, quality: object) -> int:
    """Validate a PDQ quality score; refuse the ones PDQ itself says not to trust."""
    if signal is not PDQ:
        raise SignalError(f"quality applies to pdq hashes only, not {signal.name}")
    if isinstance(quality, bool) or not isinstance(quality, int) or not 0 <= quality <= 100:
        raise SignalError("pdq quality must be an integer from 0 to 100")
    if quality < PDQ_MIN_QUALITY:
        raise SignalError(
            f"pdq quality {quality} is below {PDQ_MIN_QUALITY}: such hashes match unrelated images"
        )
    return quality


def detect_type(text: str) -> SignalType:
    """Guess a type from a bare hash: only the length of MD5 is unambiguous."""
    length = len(text.strip())
    if length == MD5.hex_length:
        return MD5
    if length == 64:
        raise SignalError(
            "a 64-digit hash may be pdq or sha256: say which with --type, or use a CSV with a type column"
        )
    raise SignalError(f"cannot tell the signal type of a {length}-character hash")
