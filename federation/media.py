"""Hashing media files: PDQ (with quality), MD5, SHA-1 and SHA-256 of images.

PDQ comes from the ``pdqhash`` package and image decoding from Pillow, both
in the optional ``media`` extra: the hub never needs them. EXIF orientation
is applied before hashing, so a photo hashes as it is shown. Videos get the
cryptographic hashes; their vPDQ needs the ``vpdq`` package, which this
project does not depend on (see docs/integrations.md).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

MEDIA_EXTRA_HINT = (
    "hashing images needs the media extra: pip install 'hashfed[media]' "
    "(pdqhash builds from source where no wheel fits: Debian needs build-essential and python3-dev)"
)
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"})


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
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return MediaHashes(path, *digests)
    pdq, quality = pdq_of(path)
    return MediaHashes(path, *digests, pdq=pdq, quality=quality)


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
