"""Cryptographic hashes (design §4, §4.1): MD5, SHA-1 and SHA-256 match identical hashes only."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import SignalType

if TYPE_CHECKING:
    from ..index.engines import SearchIndex


class ExactSignal(SignalType):
    """A cryptographic digest: any change to the file changes it, so only equal hashes match."""

    def __init__(self, name: str, hex_length: int, description: str) -> None:
        self.name = name
        self.hex_length = hex_length
        self.description = description

    def distance(self, a: str, b: str) -> int:
        return 0 if a == b else 1

    def new_index(self, codes: Any = None, **options: Any) -> SearchIndex:
        from ..index.engines import ExactIndex

        return ExactIndex(self)


MD5 = ExactSignal("md5", 32, "MD5 of the file (32 hex digits), exact match")
SHA1 = ExactSignal("sha1", 40, "SHA-1 of the file (40 hex digits), exact match")
SHA256 = ExactSignal("sha256", 64, "SHA-256 of the file (64 hex digits), exact match")
