"""Reading hash lists for submission and lookup: CSV or one hash per line.

Three input shapes are accepted:

* **CSV** with a header row naming a ``hash`` column, or columns named after
  signal types (``md5``, ``sha1``, ``photodna``…: each non-empty cell is a
  hash of that type, as hash-list exports with one column per type have it),
  or both; optional columns are ``type`` (of the ``hash`` column), ``labels``
  (several separated by ``;`` or ``|``) and ``quality`` (PDQ only). Other
  columns are ignored, so exports from other tools can be used as they are.
* **One hash per line**: ``HASH``, ``TYPE:HASH`` or ``TYPE,HASH``. Blank lines
  and lines starting with ``#`` are skipped.
* **A JSON document** a signal type's tools write for one item: a video as
  python-threatexchange's vPDQ writes it (a list of ``"pdqhex,quality,timestamp"``
  strings). The item's hash is computed from it.

A hash without a type takes the default type if one is given, else a type
guessed from its length: only MD5 (32 hex digits) is unambiguous, a 64-digit
hash may be PDQ or SHA-256 and needs saying which.

Everything is validated before anything is returned, and every problem names
its ``file:line``. Duplicates are merged: their labels are unioned.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .envelope import Addition, Limits
from .signals import SIGNAL_TYPES, Frame, SignalError, SignalType, guess_type, signal_type

LABEL_SEPARATOR = re.compile(r"[;|]")
MAX_REPORTED_PROBLEMS = 20
_LIMITS = Limits()


@dataclass(frozen=True)
class Problem:
    where: str
    """``file:line``, or another short description of where the input was."""
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class HashFileError(ValueError):
    """Input that cannot be used; ``problems`` lists each one with its ``file:line``."""

    def __init__(self, problems: Sequence[Problem], total: int | None = None) -> None:
        self.problems = tuple(problems)
        self.total = max(total or 0, len(self.problems))
        more = self.total - 1
        suffix = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
        super().__init__(f"{self.problems[0]}{suffix}" if self.problems else "invalid input")


def check_label(label: str) -> str:
    """Validate one label the way the hub will; return it stripped."""
    label = label.strip()
    if not label:
        raise SignalError("a label may not be empty")
    if len(label) > _LIMITS.max_label_length:
        raise SignalError(f"label {label[:20]!r}… is longer than {_LIMITS.max_label_length} characters")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in label):
        raise SignalError(f"label {label!r} contains a control character")
    return label


def split_labels(text: str) -> list[str]:
    return [check_label(part) for part in LABEL_SEPARATOR.split(text) if part.strip()]


def _ambiguous(where_type: str) -> str:
    return (
        f"a 64-digit hash may be pdq or sha256: give --type, write it as pdq:HASH or sha256:HASH{where_type}"
    )


def parse_hash(
    text: str, default_type: str | None = None, explicit_type: str | None = None
) -> tuple[SignalType, str]:
    """Parse ``HASH``, ``TYPE:HASH`` or ``TYPE,HASH`` into a signal type and a lower-case hash."""
    text = text.strip()
    type_name = explicit_type.strip().lower() if explicit_type and explicit_type.strip() else None
    for separator in (":", ","):
        prefix, found, rest = text.partition(separator)
        # A PhotoDNA hash written as numbers has commas of its own: only a word is a type.
        if found and prefix.strip()[:1].isalpha():
            if type_name is not None:
                raise SignalError(f"{text!r}: the type is given twice (in the type column and the hash)")
            type_name, text = prefix.strip().lower(), rest.strip()
            break
    if not text:
        raise SignalError("the hash is empty")
    if type_name is None:
        type_name = default_type
    if type_name is not None:
        signal = signal_type(type_name)
    elif len(text) == 64:
        raise SignalError(_ambiguous(", or add a type column to a CSV"))
    else:
        try:
            signal = guess_type(text)
        except SignalError as exc:
            raise SignalError(f"{exc}: check the hash, or give its type") from None
    return signal, signal.parse(text)


class HashCollector:
    """Gathers hashes from several inputs, merging duplicates and recording every problem."""

    def __init__(self, default_type: str | None = None, labels: Iterable[str] = ()) -> None:
        if default_type is not None:
            signal_type(default_type)
        self.default_type = default_type
        self.labels = frozenset(check_label(label) for label in labels)
        self._items: dict[tuple[str, str], tuple[set[str], int | None]] = {}
        self._frames: dict[tuple[str, str], tuple[Frame, ...]] = {}
        self._problems: list[Problem] = []
        self._problem_count = 0

    def problem(self, where: str, message: str) -> None:
        self._problem_count += 1
        if len(self._problems) < MAX_REPORTED_PROBLEMS:
            self._problems.append(Problem(where, message))

    def add(
        self,
        where: str,
        text: str,
        *,
        type_name: str | None = None,
        labels: str = "",
        quality: str = "",
    ) -> None:
        """Add one hash (with an optional type, labels and quality as found in the input)."""
        try:
            signal, value = parse_hash(text, self.default_type, type_name)
            item_labels = set(split_labels(labels)) | self.labels
            score = signal.parse_extras({"quality": _integer(quality)}, value)[0] if quality.strip() else None
            key = (signal.name, value)
            old_labels, old_quality = self._items.get(key, (set(), None))
            merged = old_labels | item_labels
            if len(merged) > _LIMITS.max_labels_per_item:
                raise SignalError(
                    f"{signal.name} hash {value} has more than {_LIMITS.max_labels_per_item} labels"
                )
        except SignalError as exc:
            self.problem(where, str(exc))
            return
        if old_quality is not None and (score is None or old_quality > score):
            score = old_quality
        self._items[key] = (merged, score)

    def add_lines(self, lines: Iterable[str], name: str) -> None:
        """Add every hash of one input (CSV or one hash per line), named ``name`` in problems."""
        numbered = _numbered(lines, name, self)
        for number, line in numbered:
            stripped = line.strip().lstrip("\ufeff")
            if not stripped or stripped.startswith("#"):
                continue
            header = _csv_header(stripped)
            if header is not None:
                self._add_csv(header, number, numbered, name)
            else:
                self.add(f"{name}:{number}", stripped)
                for number, line in numbered:
                    stripped = line.strip()
                    if stripped and not stripped.startswith("#"):
                        self.add(f"{name}:{number}", stripped)
            return

    def add_file(self, path: Path) -> None:
        with path.open("rb") as raw:
            document = raw.read(4).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
        with path.open(encoding="utf-8-sig", newline="") as handle:
            if document:
                try:
                    text = handle.read()
                except UnicodeDecodeError:
                    self.problem(str(path), "not UTF-8 text: save the file as UTF-8")
                    return
                self.add_document(text, str(path))
            else:
                self.add_lines(handle, str(path))

    def add_document(self, text: str, name: str) -> None:
        """One item from a JSON document that a signal type reads whole (a vPDQ video file)."""
        try:
            document = json.loads(text)
        except ValueError as exc:
            self.problem(name, f"not valid JSON: {exc}")
            return
        try:
            for signal in SIGNAL_TYPES.values():
                found = signal.read_document(document)
                if found is not None:
                    hash_hex, frames = found
                    key = (signal.name, hash_hex)
                    old_labels, _ = self._items.get(key, (set(), None))
                    self._items[key] = (old_labels | set(self.labels), None)
                    self._frames[key] = frames
                    return
        except SignalError as exc:
            self.problem(name, str(exc))
            return
        self.problem(
            name, "a JSON file must be a video as vPDQ writes it: a list of 'pdqhex,quality,timestamp'"
        )

    def _add_csv(
        self, header: list[str], header_line: int, numbered: Iterator[tuple[int, str]], name: str
    ) -> None:
        columns = {cell: position for position, cell in reversed(list(enumerate(header)))}
        line_numbers: list[int] = []

        def lines() -> Iterator[str]:
            for number, line in numbered:
                line_numbers.append(number)
                yield line

        consumed = 0
        for row in csv.reader(lines()):
            where = f"{name}:{line_numbers[consumed]}"
            consumed = len(line_numbers)
            if not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
                continue
            if len(row) > len(header):
                self.problem(
                    where, f"{len(row)} fields but the header on line {header_line} has {len(header)}"
                )
                continue

            def cell(column: str, row: list[str] = row) -> str:
                position = columns.get(column)
                return row[position] if position is not None and position < len(row) else ""

            typed = [(name, cell(name)) for name in SIGNAL_TYPES if name in columns and cell(name).strip()]
            if "hash" in columns and cell("hash").strip():
                typed.insert(0, (cell("type").strip() or "", cell("hash")))
            if not typed:
                self.problem(where, "no hash in this row: the hash (or type-named) columns are empty")
                continue
            for type_name, text in typed:
                self.add(
                    where, text, type_name=type_name or None, labels=cell("labels"), quality=cell("quality")
                )

    def result(self) -> list[Addition]:
        """The merged hashes in input order, or HashFileError naming every problem found."""
        if self._problems:
            raise HashFileError(self._problems, self._problem_count)
        return [
            Addition(signal, value, tuple(sorted(labels)), quality, self._frames.get((signal, value)))
            for (signal, value), (labels, quality) in self._items.items()
        ]


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise SignalError(f"quality {text.strip()!r} is not a whole number from 0 to 100") from None


def _csv_header(line: str) -> list[str] | None:
    """The normalised header cells if ``line`` is a CSV header naming a ``hash`` column or a type's column."""
    cells = [cell.strip().lower() for cell in next(csv.reader([line]), [])]
    return cells if "hash" in cells or any(cell in SIGNAL_TYPES for cell in cells) else None


def _numbered(lines: Iterable[str], name: str, collector: HashCollector) -> Iterator[tuple[int, str]]:
    number = 0
    try:
        for number, line in enumerate(lines, start=1):
            yield number, line
    except UnicodeDecodeError:
        collector.problem(f"{name}:{number + 1}", "not UTF-8 text: save the file as UTF-8")


def read_hash_items(
    path_or_lines: Path | str | Iterable[str],
    default_type: str | None = None,
    labels: Iterable[str] = (),
    *,
    name: str | None = None,
) -> list[Addition]:
    """Read one input: a path (``Path`` or ``str``) or an iterable of lines (named ``name``)."""
    collector = HashCollector(default_type, labels)
    if isinstance(path_or_lines, str | Path):
        collector.add_file(Path(path_or_lines))
    else:
        collector.add_lines(path_or_lines, name or "<input>")
    return collector.result()


def read_text(text: str, default_type: str | None = None, labels: Iterable[str] = ()) -> list[Addition]:
    """Read hashes from a string (handy in tests and for small inputs)."""
    return read_hash_items(io.StringIO(text), default_type, labels, name="<text>")
