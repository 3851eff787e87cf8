"""``hashfed hash`` and ``hashfed submit --hash-media``: from media files to hashes."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_output import Progress, plural
from .envelope import Addition
from .media import (
    MEDIA_EXTRA_HINT,
    VIDEO_SUFFIXES,
    VPDQ_HINT,
    MediaError,
    MediaHashes,
    files_under,
    hash_file,
    vpdq_available,
)

FIELDS = ("path", "pdq", "quality", "md5", "sha1", "sha256", "vpdq")


def hash_media(paths: Sequence[str]) -> tuple[list[MediaHashes], list[str]]:
    """Hashes of every file given or under a directory given, and a line per file that failed."""
    files = list(files_under(Path(p) for p in paths))
    progress = Progress(len(files), sys.stderr, unit="files", verb="hashed")
    hashed: list[MediaHashes] = []
    failed: list[str] = []
    for number, path in enumerate(files, start=1):
        try:
            hashed.append(hash_file(path))
        except MediaError as exc:
            if str(exc) == MEDIA_EXTRA_HINT:
                raise
            failed.append(str(exc))
        progress.update(number, 0, 0)
    progress.finish()
    if not vpdq_available() and any(path.suffix.lower() in VIDEO_SUFFIXES for path in files):
        print(f"hashfed: note: {VPDQ_HINT}", file=sys.stderr)
    return hashed, failed


def cmd_hash(args: argparse.Namespace) -> int:
    hashed, failed = hash_media(args.paths)
    for problem in failed:
        print(f"hashfed: skipped {problem}", file=sys.stderr)
    rows = [{field: getattr(item, field) for field in FIELDS} | {"path": str(item.path)} for item in hashed]
    if args.format == "json":
        for row, item in zip(rows, hashed, strict=True):
            if item.frames is not None:
                row["frames"] = item.frame_strings
        json.dump(rows, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        writer = csv.DictWriter(sys.stdout, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"hashed {plural(len(hashed), 'file')}, skipped {len(failed):,}", file=sys.stderr)
    return 0 if hashed or not failed else 1


def additions_from_media(paths: Sequence[str], labels: Sequence[str]) -> tuple[list[Addition], list[str]]:
    """What ``submit --hash-media`` sends: each file's MD5, SHA-1 and SHA-256, and its PDQ or vPDQ when it has one."""
    hashed, failed = hash_media(paths)
    items: dict[tuple[str, str], Addition] = {}
    for media in hashed:
        for signal, value, quality in (
            ("md5", media.md5, None),
            ("sha1", media.sha1, None),
            ("sha256", media.sha256, None),
            ("pdq", media.pdq, media.quality),
        ):
            if value is not None:
                items[(signal, value)] = Addition(signal, value, tuple(labels), quality)
        if media.vpdq is not None:
            items[("vpdq", media.vpdq)] = Addition("vpdq", media.vpdq, tuple(labels), frames=media.frames)
    return list(items.values()), failed


def add_hash_command(sub: Any, command: Any) -> None:
    parser = command(sub, "hash")
    parser.add_argument("paths", nargs="+", metavar="FILE|DIR", help="media files, or directories of them")
    parser.add_argument(
        "--format", choices=("csv", "json"), default="csv", help="output format (default csv)"
    )
    parser.set_defaults(func=cmd_hash)
