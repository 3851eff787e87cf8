"""Hashing media files: PDQ (with quality), MD5, SHA-1 and SHA-256 of images; vPDQ of videos.

PDQ comes from the ``pdqhash`` package and image decoding from Pillow, both
in the optional ``media`` extra: the hub never needs them. EXIF orientation
is applied before hashing, so a photo hashes as it is shown. Videos get the
cryptographic hashes, and their vPDQ frames (one PDQ per second) where
python-threatexchange's ``vpdq`` package is installed: it needs FFmpeg's
libraries to build, so no extra depends on it (see docs/integrations.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .signals.base import Frame
from .signals.vpdq import good_frames, identity

MEDIA_EXTRA_HINT = (
    "hashing images needs the media extra: pip install 'hashfed[media]' "
    "(pdqhash builds from source where no wheel fits: Debian needs build-essential and python3-dev)"
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".webm", ".mkv", ".avi", ".wmv", ".flv", ".mpg", ".mpeg", ".3gp"}
)
VPDQ_HINT = "videos get no vPDQ: that needs python-threatexchange's vpdq package (pip install vpdq; it builds against FFmpeg)"
SECONDS_PER_FRAME = 1.0


class MediaError(ValueError):
    """A file that cannot be hashed (unreadable, not an image); the message names it."""


@dataclass(frozen=True)
class MediaHashes:
    path: Path
    md5: str
    sha1: str
    sha256: str
    pdq: str | None = None
    quality: int | None = None
    """PDQ quality, 0-100 (below 50 the hash says little about the picture)."""
    vpdq: str | None = None
    """A video's identity (design §4.1), from ``frames``."""
    frames: tuple[Frame, ...] | None = None

    @property
    def frame_strings(self) -> list[str] | None:
        """The frames as python-threatexchange writes them: ``"pdqhex,quality,timestamp"``."""
        if self.frames is None:
            return None
        return [f"{frame.pdq},{frame.quality},{frame.time or 0.0:.3f}" for frame in self.frames]


def files_under(paths: Iterable[Path]) -> Iterator[Path]:
    """The files given, and every file under the directories given, in a stable order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def hash_file(path: Path) -> MediaHashes:
    """The hashes of one file; PDQ too when it is an image."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise MediaError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    digests = (
        hashlib.md5(data).hexdigest(),
        hashlib.sha1(data).hexdigest(),
        hashlib.sha256(data).hexdigest(),
    )
    if path.suffix.lower() in VIDEO_SUFFIXES:
        frames = vpdq_of(path)
        if frames is None:
            return MediaHashes(path, *digests)
        return MediaHashes(path, *digests, vpdq=identity(frames), frames=frames)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return MediaHashes(path, *digests)
    pdq, quality = pdq_of(path)
    return MediaHashes(path, *digests, pdq=pdq, quality=quality)


def vpdq_available() -> bool:
    return importlib.util.find_spec("vpdq") is not None


def vpdq_of(path: Path) -> tuple[Frame, ...] | None:
    """A video's frames by the ``vpdq`` package; None when it is not installed."""
    if not vpdq_available():
        return None
    import vpdq  # type: ignore[import-not-found]

    try:
        features = vpdq.computeHash(str(path), seconds_per_hash=SECONDS_PER_FRAME)
    except Exception as exc:  # the extension raises plain exceptions for files FFmpeg cannot read
        raise MediaError(f"{path}: not a video vpdq can read ({exc})") from exc
    frames = tuple(Frame(str(f.hex), int(f.quality), float(f.timestamp)) for f in features)
    if not good_frames(frames):
        raise MediaError(f"{path}: no frame of quality 50 or more, so the video cannot be matched")
    return frames


def pdq_of(path: Path) -> tuple[str, int]:
    try:
        import numpy as np
        import pdqhash  # type: ignore[import-untyped]
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as exc:
        raise MediaError(MEDIA_EXTRA_HINT) from exc
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise MediaError(f"{path}: not an image this hasher can read ({exc})") from exc
    bits, quality = pdqhash.compute(np.asarray(image))
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:064x}", int(quality)
