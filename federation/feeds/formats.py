"""Reading the hash feeds members already receive, into one stream of additions and removals.

Each reader turns one export into :class:`FeedRecord` objects in feed order,
with the position of each in its file, so a malformed record can be named
exactly. Types the hub does not carry (a StopNCII ``VideoTMK``, a text
signal) are skipped and counted, never guessed.

Formats, as their providers document them:

- ``ncmec-xml``: NCMEC hash sharing v2 ``queryResult`` pages: ``image`` and
  ``video`` entries with ``fingerprints`` (``md5``, ``sha1``, ``pdna``,
  ``pdq``), ``classification`` and ``member``; ``deletedImage`` and
  ``deletedVideo`` withdraw an entry by its ``id``.
- ``stopncii-json``: StopNCII ``FetchHashes`` answers: ``hashRecords`` with
  ``signalType``, ``hashValue`` and ``hashStatus`` (``Withdrawn`` and
  ``Deleted`` remove the hash: the status decides, not the value).
- ``tat-json``: Tech Against Terrorism hash-list pages: ``results`` with
  ``hash_digest``, ``algorithm``, ``ideology``, ``file_type``, ``deleted``.
- ``pytx-csv``: ``threatexchange dataset --csv`` rows (``signal_type``,
  ``signal_str``, ``collab``, ``category``, ``tags``).
- ``lines``: ``signal_type value`` per line, as ``threatexchange dataset``
  prints without ``--csv``.
"""

from __future__ import annotations

import csv
import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..signals import SignalError, signal_type

PYTX_TYPES = {
    "pdq": "pdq",
    "video_md5": "md5",
    "md5": "md5",
    "sha1": "sha1",
    "sha256": "sha256",
    "photodna": "photodna",
}
"""python-threatexchange signal type names, and the hub's type for each (vpdq needs frames: not from these)."""
NEGATIVE_CATEGORIES = frozenset({"FALSE_POSITIVE", "NEGATIVE_CLASS", "NEGATIVE"})
NCMEC_TYPES = {"md5": "md5", "sha1": "sha1", "pdna": "photodna", "pdq": "pdq"}
STOPNCII_TYPES = {"ImagePDQ": "pdq", "VideoMD5": "md5"}
STOPNCII_REMOVED = frozenset({"Withdrawn", "Deleted"})
TAT_TYPES = {"MD5": "md5", "PDQ": "pdq", "SHA1": "sha1", "SHA256": "sha256"}


@dataclass(frozen=True)
class FeedRecord:
    position: str
    """Where the record is: file and record number (or line)."""
    remove: bool
    signal: str | None
    """The hub's type; None for an NCMEC deletion, which names an entry rather than a hash."""
    hash: str | None
    labels: tuple[str, ...] = ()
    entry_id: str | None = None
    """The feed's own id for the entry (NCMEC): its deletion later names only this."""


@dataclass
class FeedReport:
    records: list[FeedRecord]
    malformed: list[tuple[str, str]]
    """(position, what is wrong) for every record that could not be read."""
    skipped: dict[str, int]
    """Records of types the hub does not carry, by type."""


class _Reader:
    def __init__(self) -> None:
        self.report = FeedReport([], [], {})

    def hash_record(
        self,
        position: str,
        hub_type: str,
        value: object,
        labels: tuple[str, ...],
        *,
        remove: bool = False,
        entry_id: str | None = None,
    ) -> None:
        try:
            normalised = signal_type(hub_type).parse(value)
        except SignalError as exc:
            self.report.malformed.append((position, str(exc)))
            return
        self.report.records.append(FeedRecord(position, remove, hub_type, normalised, labels, entry_id))

    def skip(self, what: str) -> None:
        self.report.skipped[what] = self.report.skipped.get(what, 0) + 1


def read_ncmec_xml(reader: _Reader, path: Path, text: str) -> None:
    try:
        root = ET.fromstring(text.strip())
    except ET.ParseError as exc:
        reader.report.malformed.append((f"{path}", f"not XML: {exc}"))
        return
    for element in root.iter():  # the namespace is the API's version: read the local names
        element.tag = element.tag.rpartition("}")[2]
    number = 0
    for group in (root.find("images"), root.find("videos")):
        for entry in group if group is not None else ():
            number += 1
            position = f"{path}: entry {number} ({entry.tag})"
            entry_id = (entry.findtext("id") or "").strip()
            if not entry_id:
                reader.report.malformed.append((position, "the entry has no id"))
                continue
            if entry.tag in ("deletedImage", "deletedVideo"):
                reader.report.records.append(FeedRecord(position, True, None, None, (), entry_id))
                continue
            if entry.tag not in ("image", "video"):
                reader.report.malformed.append((position, f"unknown entry {entry.tag!r}"))
                continue
            member = entry.find("member")
            labels = [f"ncmec:{entry.tag}"]
            if entry.findtext("classification"):
                labels.append(f"ncmec:classification:{entry.findtext('classification', '').strip()}")
            if member is not None and member.get("id"):
                labels.append(f"ncmec:member:{member.get('id')}")
            fingerprints = entry.find("fingerprints")
            for print_ in fingerprints if fingerprints is not None else ():
                hub_type = NCMEC_TYPES.get(print_.tag)
                if hub_type is None:
                    reader.skip(f"ncmec {print_.tag}")
                    continue
                reader.hash_record(
                    position, hub_type, (print_.text or "").strip(), tuple(labels), entry_id=entry_id
                )


def _json(reader: _Reader, path: Path, text: str, key: str) -> list[Any]:
    try:
        document = json.loads(text)
    except ValueError as exc:
        reader.report.malformed.append((str(path), f"not JSON: {exc}"))
        return []
    items = document.get(key) if isinstance(document, dict) else None
    if not isinstance(items, list):
        reader.report.malformed.append((str(path), f"expected an object with a {key!r} list"))
        return []
    return items


def read_stopncii_json(reader: _Reader, path: Path, text: str) -> None:
    for number, record in enumerate(_json(reader, path, text, "hashRecords"), start=1):
        position = f"{path}: hashRecords[{number - 1}]"
        if not isinstance(record, dict) or not {"signalType", "hashValue", "hashStatus"} <= set(record):
            reader.report.malformed.append(
                (position, "a hash record needs signalType, hashValue and hashStatus")
            )
            continue
        hub_type = STOPNCII_TYPES.get(str(record["signalType"]))
        if hub_type is None:
            reader.skip(f"stopncii {record['signalType']}")
            continue
        removed = record["hashStatus"] in STOPNCII_REMOVED
        reader.hash_record(position, hub_type, record["hashValue"], ("stopncii",), remove=removed)


def read_tat_json(reader: _Reader, path: Path, text: str) -> None:
    for number, entry in enumerate(_json(reader, path, text, "results")):
        position = f"{path}: results[{number}]"
        if not isinstance(entry, dict) or not {"hash_digest", "algorithm"} <= set(entry):
            reader.report.malformed.append((position, "an entry needs hash_digest and algorithm"))
            continue
        hub_type = TAT_TYPES.get(str(entry["algorithm"]).upper())
        if hub_type is None:
            reader.skip(f"tat {entry['algorithm']}")
            continue
        labels = ["tat"]
        for field in ("ideology", "file_type"):
            if isinstance(entry.get(field), str) and entry[field]:
                labels.append(f"tat:{field.replace('_', '-')}:{entry[field]}")
        reader.hash_record(
            position, hub_type, entry["hash_digest"], tuple(labels), remove=entry.get("deleted") is True
        )


def read_pytx_csv(reader: _Reader, path: Path, text: str) -> None:
    rows = csv.DictReader(io.StringIO(text))
    if rows.fieldnames is None or not {"signal_type", "signal_str"} <= set(rows.fieldnames):
        reader.report.malformed.append((str(path), "expected a CSV header with signal_type and signal_str"))
        return
    for row in rows:
        position = f"{path}: line {rows.line_num}"
        hub_type = PYTX_TYPES.get((row.get("signal_type") or "").strip())
        if hub_type is None:
            reader.skip(f"pytx {row.get('signal_type')}")
            continue
        if (row.get("category") or "").strip().upper() in NEGATIVE_CATEGORIES:
            reader.skip("pytx negative opinion")
            continue
        labels = tuple(tag for tag in (row.get("tags") or "").split() if tag)
        reader.hash_record(position, hub_type, (row.get("signal_str") or "").strip(), labels)


def read_lines(reader: _Reader, path: Path, text: str) -> None:
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        position = f"{path}: line {number}"
        parts = line.split()
        if len(parts) < 2:
            reader.report.malformed.append((position, "expected 'signal_type value'"))
            continue
        hub_type = PYTX_TYPES.get(parts[0])
        if hub_type is None:
            reader.skip(f"lines {parts[0]}")
            continue
        reader.hash_record(position, hub_type, parts[1], ())


READERS: dict[str, Callable[[_Reader, Path, str], None]] = {
    "ncmec-xml": read_ncmec_xml,
    "stopncii-json": read_stopncii_json,
    "tat-json": read_tat_json,
    "pytx-csv": read_pytx_csv,
    "lines": read_lines,
}


def read_feed(feed_format: str, paths: list[Path]) -> FeedReport:
    """Every record of ``paths`` in order (a feed's pages, oldest first), with what could not be read."""
    reader = _Reader()
    for path in paths:
        READERS[feed_format](reader, path, path.read_text(encoding="utf-8"))
    return reader.report
