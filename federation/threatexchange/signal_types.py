"""python-threatexchange signal types for the hub's types that pytx has no type of its own for.

pytx ships ``pdq``, ``video_md5`` and ``video_sha256``; a coalition's lists
also carry MD5 and SHA-256 of images, SHA-1 and PhotoDNA. These small types
let a pytx runtime (its CLI, HMA) store, index and match them, with the
hub's own parsing and distances (:mod:`federation.signals`), so nothing
fetched from a hub is dropped for want of a type. File hashes match photos
and videos alike; PhotoDNA is matched from hashes only (computing it needs
Microsoft's licensed library).
"""

from __future__ import annotations

import hashlib
import pathlib
import random
from typing import Any, ClassVar, TypeVar

import numpy
from threatexchange.content_type.content_base import ContentType
from threatexchange.content_type.photo import PhotoContent
from threatexchange.content_type.video import VideoContent
from threatexchange.signal_type import signal_base
from threatexchange.signal_type.index import (
    IndexMatch,
    SignalSimilarityInfoWithSingleDistance,
    SignalTypeIndex,
)

from ..signals import signal_type
from ..signals.base import LookupDefaults, SignalError

T = TypeVar("T")


class _FileDigestSignal(
    signal_base.SimpleSignalType, signal_base.BytesHasher, signal_base.CanGenerateRandomSignal
):
    """A cryptographic digest of a media file's bytes: equal digests, identical files."""

    HUB_TYPE: ClassVar[str]
    DIGEST: ClassVar[str]

    @classmethod
    def get_name(cls) -> str:
        return cls.HUB_TYPE

    @classmethod
    def get_content_types(cls) -> list[type[ContentType]]:
        return [PhotoContent, VideoContent]

    @classmethod
    def get_index_cls(cls) -> type[SignalTypeIndex[Any]]:
        return signal_base.TrivialSignalTypeIndex

    @classmethod
    def validate_signal_str(cls, signal_str: str) -> str:
        try:
            return signal_type(cls.HUB_TYPE).parse(signal_str)
        except SignalError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def hash_from_bytes(cls, bytes_: bytes) -> str:
        return hashlib.new(cls.DIGEST, bytes_).hexdigest()

    @classmethod
    def hash_from_file(cls, path: pathlib.Path) -> str:
        digest = hashlib.new(cls.DIGEST)
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    @classmethod
    def get_random_signal(cls) -> str:
        return random.randbytes(hashlib.new(cls.DIGEST).digest_size).hex()


class Md5Signal(_FileDigestSignal):
    """MD5 of a photo or video file (pytx's own ``video_md5`` covers videos only)."""

    HUB_TYPE = "md5"
    DIGEST = "md5"

    @staticmethod
    def get_examples() -> list[str]:
        return ["d41d8cd98f00b204e9800998ecf8427e"]


class Sha1Signal(_FileDigestSignal):
    """SHA-1 of a photo or video file, as NCMEC's lists carry it."""

    HUB_TYPE = "sha1"
    DIGEST = "sha1"

    @staticmethod
    def get_examples() -> list[str]:
        return ["da39a3ee5e6b4b0d3255bfef95601890afd80709"]


class Sha256Signal(_FileDigestSignal):
    """SHA-256 of a photo or video file (pytx's own ``video_sha256`` covers videos only)."""

    HUB_TYPE = "sha256"
    DIGEST = "sha256"

    @staticmethod
    def get_examples() -> list[str]:
        return ["e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]


class PhotoDnaSignal(signal_base.SignalType, signal_base.FileHasher):
    """PhotoDNA hashes, matched by squared Euclidean distance within the hub's default maximum.

    Any of PhotoDNA's written forms is accepted and stored as 288 hex digits.
    Computing PhotoDNA needs Microsoft's licensed library, so
    :meth:`hash_from_file` yields no hash, as pytx's interface asks of a
    type that cannot hash a file; hashes computed elsewhere match with
    ``threatexchange match --hashes``.
    """

    MAX_DISTANCE: ClassVar[int] = LookupDefaults().photodna_max_distance

    @classmethod
    def get_name(cls) -> str:
        return "photodna"

    @classmethod
    def get_content_types(cls) -> list[type[ContentType]]:
        return [PhotoContent]

    @classmethod
    def get_index_cls(cls) -> type[SignalTypeIndex[Any]]:
        return PhotoDnaIndex

    @classmethod
    def validate_signal_str(cls, signal_str: str) -> str:
        try:
            return signal_type("photodna").parse(signal_str)
        except SignalError as exc:
            raise ValueError(str(exc)) from None

    @classmethod
    def hash_from_file(cls, file: pathlib.Path) -> str:
        return ""

    @classmethod
    def compare_hash(cls, hash1: str, hash2: str) -> signal_base.SignalComparisonResult:
        distance = signal_type("photodna").distance(
            cls.validate_signal_str(hash1), cls.validate_signal_str(hash2)
        )
        return signal_base.SignalComparisonResult.from_simple_dist(distance, cls.MAX_DISTANCE)

    @staticmethod
    def get_examples() -> list[str]:
        return [bytes(range(144)).hex()]


class PhotoDnaIndex(SignalTypeIndex[T]):
    """Every stored PhotoDNA within :attr:`PhotoDnaSignal.MAX_DISTANCE` of a query, by brute force in numpy.

    pytx builds its indexes from a fetched copy on the member's side; an exact
    scan of 144-byte vectors is what its linear indexes do too, vectorised.
    """

    def __init__(self) -> None:
        self.entries: list[tuple[str, T]] = []
        self._matrix: numpy.ndarray[Any, Any] | None = None

    def add(self, signal_str: str, entry: T) -> None:
        self.entries.append((PhotoDnaSignal.validate_signal_str(signal_str), entry))
        self._matrix = None

    def query(self, query: str) -> list[IndexMatch[T]]:
        if not self.entries or not query:
            return []
        if self._matrix is None:
            self._matrix = numpy.array(
                [numpy.frombuffer(bytes.fromhex(code), dtype=numpy.uint8) for code, _ in self.entries],
                dtype=numpy.int32,
            )
        vector = numpy.frombuffer(bytes.fromhex(PhotoDnaSignal.validate_signal_str(query)), dtype=numpy.uint8)
        distances = ((self._matrix - vector.astype(numpy.int32)) ** 2).sum(axis=1)
        within = numpy.flatnonzero(distances <= PhotoDnaSignal.MAX_DISTANCE)
        return [
            IndexMatch[T](SignalSimilarityInfoWithSingleDistance(int(distances[i])), self.entries[i][1])
            for i in within
        ]

    def __getstate__(self) -> dict[str, Any]:
        return {"entries": self.entries}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entries = state["entries"]
        self._matrix = None


OWN_SIGNAL_TYPES = (Md5Signal, Sha1Signal, Sha256Signal, PhotoDnaSignal)
