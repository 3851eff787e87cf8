"""Output helpers for the ``hashfed`` CLI: tables, short hashes and a progress display."""

from __future__ import annotations

import argparse
import textwrap
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from .state import KeyRecord


def short_hash(value: str, wide: bool = False) -> str:
    """A hash shortened to its first 8 and last 4 digits, enough to tell hashes apart by eye."""
    if wide or len(value) <= 16:
        return value
    return f"{value[:8]}…{value[-4:]}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned on the widest cell; the last column is not padded."""
    widths = [max([len(header), *(len(row[i]) for row in rows)]) for i, header in enumerate(headers)]
    lines = []
    for row in [list(headers), *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def members_table(records: Sequence[tuple[str, KeyRecord]]) -> str:
    rows = [
        [
            collection,
            record.member,
            record.key.key_id,
            ",".join(sorted(record.rights)),
            str(record.granted_index),
            "-" if record.revoked_index is None else str(record.revoked_index),
        ]
        for collection, record in sorted(records, key=lambda item: (item[0], item[1].granted_index))
    ]
    return format_table(["COLLECTION", "MEMBER", "KEY ID", "RIGHTS", "GRANTED AT", "REVOKED AT"], rows)


def lookup_table(
    queries: Sequence[tuple[str, str]], results: Sequence[Sequence[dict[str, Any]]], wide: bool = False
) -> str:
    """One row per match (the query shown on its first row), and a "no match" row for misses."""
    rows = []
    for (signal, value), matches in zip(queries, results, strict=True):
        query = f"{signal}:{short_hash(value, wide)}"
        if not matches:
            rows.append([query, "no match", "-", "-", "-", "-", "-"])
        for position, match in enumerate(matches):
            opinions = match.get("opinions", {})
            distance = f"{match['distance']:,}"
            if "query_match_percent" in match:
                distance += f" ({match['query_match_percent']:.0f}%/{match['compared_match_percent']:.0f}%)"
            rows.append(
                [
                    query if position == 0 else "",
                    short_hash(str(match["hash"]), wide),
                    distance,
                    str(match["collection"]),
                    ",".join(match.get("submitters", [])) or "-",
                    ",".join(match.get("labels", [])) or "-",
                    f"+{opinions.get('positive', 0)}/-{opinions.get('negative', 0)}",
                ]
            )
    headers = ["QUERY", "MATCH", "DISTANCE", "COLLECTION", "SUBMITTERS", "LABELS", "OPINIONS"]
    return format_table(headers, rows)


def index_range(indexes: Sequence[int]) -> str:
    if not indexes:
        return "no log entries"
    low, high = min(indexes), max(indexes)
    return f"log index {low}" if low == high else f"log indexes {low}-{high}"


def plural(count: int, word: str) -> str:
    if count == 1:
        return f"1 {word}"
    if word.endswith("y"):
        return f"{count:,} {word[:-1]}ies"
    return f"{count:,} {word}{'es' if word.endswith(('h', 's')) else 's'}"


class Progress:
    """Items sent out of a total: a redrawn bar on a terminal, a line every few seconds elsewhere."""

    def __init__(
        self,
        total: int,
        stream: TextIO,
        *,
        tty: bool | None = None,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        width: int = 30,
        unit: str = "hashes",
        verb: str = "sent",
    ) -> None:
        self.total = total
        self.unit = unit
        self.verb = verb
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.width = width
        self.started = clock()
        self._last_line = self.started
        self._drawn = False

    def _text(self, done: int, batches: int, total_batches: int) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        percent = 100 * done / self.total if self.total else 100.0
        batch = f"batch {batches}/{total_batches}  " if total_batches else ""
        return f"{done:,}/{self.total:,} {self.unit} ({percent:.0f}%)  {batch}{done / elapsed:,.0f}/s"

    def update(self, done: int, batches: int, total_batches: int) -> None:
        text = self._text(done, batches, total_batches)
        if self.tty:
            filled = self.width * done // self.total if self.total else self.width
            bar = "#" * filled + "." * (self.width - filled)
            self.stream.write(f"\r[{bar}] {text}\x1b[K")
            self._drawn = True
        elif done >= self.total or self.clock() - self._last_line >= self.interval:
            self.stream.write(f"{self.verb} {text}\n")
            self._last_line = self.clock()
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()


# ---- help texts: (one-line summary, description, examples) per command ------

_FORMATS = (
    "Input: CSV with a header naming a `hash` column (optional columns: type, labels separated "
    "by ; or |, quality) or columns named after types (md5, sha1, photodna, ...: one hash of that "
    "type per cell); one hash per line as HASH, TYPE:HASH or TYPE,HASH (blank lines and # "
    "comments skipped); or a video as the JSON file python-threatexchange's vPDQ writes (a list "
    "of 'pdqhex,quality,timestamp'). md5 (32 hex digits), sha1 (40) and photodna (288 hex, 144 "
    "comma-separated numbers or base64) are recognised; a 64-digit hash (pdq or sha256) needs "
    "--type, a TYPE: prefix or a type column."
)

HELP: dict[str, tuple[str, str, str]] = {
    "keygen": (
        "make a member signer key",
        "Make an Ed25519 signer key NAME.key (mode 0600: never share it) and its verifier key "
        "NAME.pub beside it. The verifier key is printed: send it to the hub operator, who grants "
        "it rights with `hashfed member grant`.",
        "hashfed keygen acme\nhashfed keygen acme --out ~/.hashfed/acme.key",
    ),
    "init": (
        "create a hub data directory",
        "Create a hub data directory: the hub's key, configuration (hub.toml), database and first "
        "collection. The last line printed is the hub's verifier key. The log is kept in DIR/hub.sqlite3, "
        "or with --db in an empty PostgreSQL database that replicas of the hub share.",
        "hashfed init /srv/hashfed --name hub1 --federation tsfed --collection csam\n"
        "hashfed init /srv/hashfed --name hub1 --federation tsfed --collection csam \\\n"
        "    --db postgresql://hashfed@db.internal/hashfed",
    ),
    "member grant": (
        "grant a key rights on a collection",
        "Grant a member's verifier key rights on a collection: a membership entry signed by the "
        "hub key, honoured at once by a serving hub. The member is named by the key's name.",
        "hashfed member grant /srv/hashfed --collection csam --key acme.pub --rights read,write\n"
        "hashfed member grant /srv/hashfed --collection csam --key 'acme+1a2b3c4d+AQ...' --rights read",
    ),
    "member revoke": (
        "retire a key on a collection",
        "Revoke one key on a collection (the member keeps its other keys). A revoked key cannot "
        "be granted again: the member makes a new one.",
        "hashfed member revoke /srv/hashfed --collection csam --key acme+1a2b3c4d",
    ),
    "member list": (
        "list member keys",
        "List every key ever granted, with its rights and the log indexes of its grant and revocation.",
        "hashfed member list /srv/hashfed\nhashfed member list /srv/hashfed --collection csam",
    ),
    "collection add": (
        "create a collection",
        "Create a collection with its own log, then grant members on it.",
        "hashfed collection add /srv/hashfed terrorism\n"
        "hashfed member grant /srv/hashfed --collection terrorism --key acme.pub --rights read",
    ),
    "serve": (
        "run the hub",
        "Serve the hub's HTTP API until interrupted. Host and port default to hub.toml "
        "(127.0.0.1:8080 unless edited). One worker process per core serves the one port over the "
        "one database (--workers N to choose), sharing replay protection, rate limits and the index "
        "segment files, so the hub uses every core. A hub on "
        "PostgreSQL can also run as replicas on several machines: copies of DIR, each served.",
        "hashfed serve /srv/hashfed\nhashfed serve /srv/hashfed --host 0.0.0.0 --port 9000\n"
        "hashfed serve /srv/hashfed --workers 1",
    ),
    "rebuild": (
        "rebuild the projection from the logs",
        "Replay every collection's log into a fresh projection, checking every entry again "
        "(stop the hub first).",
        "hashfed rebuild /srv/hashfed",
    ),
    "migrate-store": (
        "move the hub's log from SQLite to PostgreSQL",
        "Copy every collection's log, in order, into an empty PostgreSQL database, rebuild the "
        "projection there from it, check that entries, roots and projection equal the original's, "
        "then point hub.toml at the database. The SQLite file is kept unchanged. Stop the hub first; "
        "afterwards copy DIR to each machine that runs a replica.",
        "createdb -h db.internal hashfed\n"
        "hashfed migrate-store /srv/hashfed --to postgresql://hashfed@db.internal/hashfed",
    ),
    "console-token": (
        "issue a login token for the web console",
        "Print a token that logs a browser in to the hub's console at /console/ (overview, members, log, "
        "peers, refusals, lookup) until it expires; only its SHA-256 is stored, in DIR. The console "
        "answers only callers from hub.toml console_allow (loopback unless changed).",
        "hashfed console-token /srv/hashfed\nhashfed console-token /srv/hashfed --hours 1",
    ),
    "rotate-key": (
        "hand the hub over to a new hub key",
        "Make a new hub key and append to every collection's log an entry, signed by the current "
        "key, that hands the log over to it. For --overlap-days the hub signs checkpoints with both "
        "keys, so mirrors and peering hubs verify the hand-over and follow it; one that has not synced "
        "by then must be pinned again. The old key moves to DIR/retired/, hub.pub becomes the new key "
        "and DIR/hub.keys lists them all (what a new mirror pins). Stop the hub first; if the command "
        "is interrupted, run it again and it finishes.",
        "hashfed rotate-key /srv/hashfed\nhashfed rotate-key /srv/hashfed --overlap-days 30",
    ),
    "hash": (
        "hash images and other media files",
        "Print PDQ (with its quality), MD5, SHA-1 and SHA-256 of each file, and of every file under "
        "each directory, EXIF orientation applied; videos get their vPDQ frames too where the vpdq "
        "package is installed (--format json prints them); other files get the cryptographic hashes. "
        "Unreadable files are reported and skipped. Needs the media extra for PDQ: "
        "pip install 'hashfed[media]'.",
        "hashfed hash photo.jpg\nhashfed hash --format json ./reported/ > hashes.json",
    ),
    "submit": (
        "submit (or --remove) hashes",
        "Sign and submit hashes to a collection in batches. Every line is checked before anything "
        "is sent and duplicates are merged (labels unioned). With --remove, withdraw hashes you "
        "submitted. " + _FORMATS,
        "hashfed submit --hub https://hub.example --key acme.key --collection csam --type pdq hashes.txt\n"
        "hashfed submit --hub https://hub.example --key acme.key --collection csam export.csv --label csam\n"
        "hashfed submit --key acme.key --collection terror video-1041.vpdq.json --label propaganda\n"
        "export HASHFED_HUB=https://hub.example HASHFED_KEY=acme.key\n"
        "grep -v keep old.txt | hashfed submit --collection csam --type pdq --remove -",
    ),
    "lookup": (
        "look hashes up",
        "Look hashes up in the collections you may read: near matches for pdq (Hamming distance, "
        "31 by default), photodna (squared Euclidean distance, the hub's default unless --distance "
        "photodna=D) and vpdq videos (frame matches, with the share of frames matched on each "
        "side), exact matches for md5, sha1 and sha256. " + _FORMATS,
        "hashfed lookup --hub https://hub.example --key acme.key md5:d41d8cd98f00b204e9800998ecf8427e\n"
        "hashfed lookup --hub https://hub.example --key acme.key --type pdq --file queries.txt --json\n"
        "hashfed lookup --key acme.key --file ncmec-export.csv --distance photodna=40000\n"
        "hashfed lookup --key acme.key --file clip.vpdq.json --max-distance 20",
    ),
    "opinion": (
        "say whether listed hashes are right",
        "Record your verdict on hashes in a collection: positive (a true match), negative (a false "
        "positive) or withdrawn (clears your earlier opinion). Other members see the counts in "
        "lookups.",
        "hashfed opinion --hub https://hub.example --key acme.key --collection csam \\\n"
        "    --verdict negative --note 'a stock photo' --type pdq HASH",
    ),
    "demo": (
        "run a demonstration federation",
        "Run a small federation locally to see hashfed work end to end.",
        "hashfed demo\nhashfed demo --help",
    ),
}


class UsageError(Exception):
    """A command line or input that cannot be used (exit status 2)."""


def command(sub: Any, name: str) -> argparse.ArgumentParser:
    """A subcommand with its summary, description and examples from :data:`HELP`."""
    summary, description, examples = HELP[name]
    parser: argparse.ArgumentParser = sub.add_parser(
        name.split()[-1],
        help=summary,
        description=textwrap.fill(description, 78),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def int_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from ``low`` to ``high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low:,} and {high:,}")
        return value

    return parse
