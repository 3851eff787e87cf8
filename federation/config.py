"""A hub's data directory: configuration, keys and database in one place.

Layout::

    DIR/hub.toml      name, federation, listen address, limits (edit by hand)
    DIR/hub.key       the hub's signer key (mode 0600; back it up, never share it)
    DIR/hub.pub       the hub's verifier key (give it to members and peers)
    DIR/hub.sqlite3   the log and its projection (SQLite, WAL), unless hub.toml names a PostgreSQL database
    DIR/index/        snapshots of the PDQ and PhotoDNA indexes (derived from the log; safe to delete)
    DIR/signed/       the last checkpoint signed per collection (back it up with the database)
    DIR/retired/      hub keys rotated away from (they signed the logs' earlier entries)
    DIR/hub.keys      every hub key, oldest first: what a new mirror or peer pins after a rotation
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .envelope import Limits
from .keys import KeyFormatError, SignerKey, check_name, load_signer_file, parse_key_chain
from .signals import LookupDefaults
from .signals.photodna import MAX_DISTANCE_LIMIT as PHOTODNA_MAX_DISTANCE_LIMIT

CONFIG_FILE = "hub.toml"
SIGNER_FILE = "hub.key"
VERIFIER_FILE = "hub.pub"
DATABASE_FILE = "hub.sqlite3"
INDEX_DIR = "index"
SIGNED_DIR = "signed"
RETIRED_DIR = "retired"
NEXT_SIGNER_FILE = "hub.key.next"
KEY_CHAIN_FILE = "hub.keys"


def parse_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """``metrics_allow``: networks separated by spaces or commas (``*`` for any caller, empty for none)."""
    if text.strip() == "*":
        return [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
    return [ipaddress.ip_network(part, strict=False) for part in text.replace(",", " ").split()]


class ConfigError(ValueError):
    """A data directory or configuration that cannot be used; the message says how to fix it."""


_PEER_COLLECTION = re.compile(r"(?:([A-Za-z0-9._-]{1,64}):)?([A-Za-z0-9._-]{1,64})")


@dataclass(frozen=True)
class PeerConfig:
    """A peer hub to mirror (a ``[[peers]]`` table in hub.toml; see docs/operations.md)."""

    url: str
    key: str
    """The peer hub's verifier key: pins the checkpoints of its own collections."""
    member_key: str
    """This hub's signer key file at the peer (made with ``hashfed keygen``, granted read there)."""
    collections: tuple[str, ...]
    """The peer's own collections (``NAME``) and ones it relays from other hubs (``HUB:NAME``)."""
    relay_keys: tuple[str, ...] = ()
    """Verifier keys of the origin hubs of relayed collections, one per ``HUB``."""
    interval: float = 10.0
    """Seconds between polls while in step; after failures up to 32 times longer (at most 5 minutes)."""
    timeout: float = 60.0
    """Seconds any one request to the peer may take."""
    ca: str = ""
    """PEM file of the CA of an ``https://`` peer's certificate, if not a public one."""
    client_cert: str = ""
    """PEM file with this hub's TLS client certificate and key, for a peer that requires mutual TLS."""

    def origin_key(self, collection: str) -> str:
        """The verifier key (or keys, after rotations: oldest first) that signs ``collection``'s
        checkpoints (validated at load)."""
        match = _PEER_COLLECTION.fullmatch(collection)
        hub = match.group(1) if match else None
        if hub is None:
            return self.key
        return next(key for key in self.relay_keys if parse_key_chain(key)[0].name == hub)

    def to_toml(self) -> str:
        def quoted(value: str) -> str:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'

        lines = ["", "[[peers]]", f"url = {quoted(self.url)}", f"key = {quoted(self.key)}"]
        lines.append(f"member_key = {quoted(self.member_key)}")
        lines.append(f"collections = [{', '.join(quoted(c) for c in self.collections)}]")
        if self.relay_keys:
            lines.append(f"relay_keys = [{', '.join(quoted(k) for k in self.relay_keys)}]")
        lines.append(f"interval = {self.interval!r}")
        lines.append(f"timeout = {self.timeout!r}")
        for name in ("ca", "client_cert"):
            if getattr(self, name):
                lines.append(f"{name} = {quoted(getattr(self, name))}")
        return "\n".join(lines) + "\n"


def _peer(raw: Any, position: int, source: str, base: Path | None) -> PeerConfig:
    where = f"{source}: peers[{position}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table ([[peers]])")
    known = {f.name for f in fields(PeerConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
    for name in ("url", "key", "member_key", "collections"):
        if name not in raw:
            raise ConfigError(f"{where}: missing setting {name!r}")
    for name in ("url", "key", "member_key", "ca", "client_cert"):
        if not isinstance(raw.get(name, ""), str):
            raise ConfigError(f"{where}: {name} must be a string")
    if not raw["url"].startswith(("http://", "https://")):
        raise ConfigError(f"{where}: url {raw['url']!r} is not an http:// or https:// URL")
    for name in ("collections", "relay_keys"):
        value = raw.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{where}: {name} must be a list of strings")
    for name in ("interval", "timeout"):
        value = raw.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: {name} must be a positive number of seconds")
    try:
        peer_key = parse_key_chain(raw["key"])[0]
        relay = {parse_key_chain(text)[0].name: text for text in raw.get("relay_keys", [])}
    except KeyFormatError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    if not raw["collections"]:
        raise ConfigError(f"{where}: collections is empty; name the collections to mirror")
    for collection in raw["collections"]:
        match = _PEER_COLLECTION.fullmatch(collection)
        if match is None or match.group(2) in {".", ".."}:
            raise ConfigError(
                f"{where}: collection {collection!r} must be NAME or HUB:NAME (and NAME not '.' or '..')"
            )
        hub = match.group(1)
        if hub is not None and (hub == peer_key.name or hub not in relay):
            raise ConfigError(
                f"{where}: collection {collection!r} is relayed from hub {hub!r}: "
                f"add that hub's verifier key to relay_keys"
            )

    def beside(name: str) -> str:
        """A file setting, relative to the data directory unless absolute ("" stays "")."""
        path = Path(raw.get(name, ""))
        if not raw.get(name):
            return ""
        return str(base / path if base is not None and not path.is_absolute() else path)

    return PeerConfig(
        url=raw["url"].rstrip("/"),
        key=raw["key"],
        member_key=beside("member_key"),
        collections=tuple(raw["collections"]),
        relay_keys=tuple(raw.get("relay_keys", [])),
        interval=float(raw.get("interval", PeerConfig.interval)),
        timeout=float(raw.get("timeout", PeerConfig.timeout)),
        ca=beside("ca"),
        client_cert=beside("client_cert"),
    )


def _peers(raw: Any, source: str, base: Path | None) -> tuple[PeerConfig, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: peers must be an array of tables ([[peers]])")
    peers = tuple(_peer(item, position, source, base) for position, item in enumerate(raw))
    seen: dict[str, str] = {}
    for peer in peers:
        for collection in peer.collections:
            origin = parse_key_chain(peer.origin_key(collection))[0].name
            name = f"{origin}:{collection.rpartition(':')[2]}"
            if name in seen:
                raise ConfigError(
                    f"{source}: collection {name} is mirrored from both {seen[name]} and {peer.url}; "
                    "name it for one peer only"
                )
            seen[name] = peer.url
    return peers


_SECONDS_OR_RATES = frozenset(
    {
        "keepalive_timeout_seconds",
        "request_timeout_seconds",
        "queue_timeout_seconds",
        "rate_limit_per_second",
        "send_timeout_seconds",
    }
)
"""Settings that take a number, integer or not; every other number setting is an integer."""
_STRING_SETTINGS = frozenset(
    {
        "name",
        "federation",
        "host",
        "database",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "metrics_allow",
        "console_allow",
    }
)
_POSITIVE = (
    "max_connections",
    "keepalive_timeout_seconds",
    "request_timeout_seconds",
    "max_inflight",
    "queue_timeout_seconds",
    "max_matches_per_query",
    "max_matches_per_answer",
    "max_pending_body_bytes",
    "send_timeout_seconds",
    "max_streams",
    "max_streams_per_key",
    "entries_page_bytes",
    "database_pool_size",
)
_NON_NEGATIVE = (
    "min_free_bytes",
    "min_send_bytes_per_second",
    "min_body_bytes_per_second",
    "max_queued",
    "rate_limit_per_second",
    "rate_limit_burst",
)


@dataclass(frozen=True)
class HubConfig:
    name: str
    federation: str
    host: str = "127.0.0.1"
    port: int = 8080
    database: str = ""
    """Where the log is kept: empty for hub.sqlite3 in the data directory, ``sqlite:///PATH``, or
    ``postgresql://USER@HOST:PORT/DB`` (the password from ``PGPASSWORD`` or ``~/.pgpass``), which
    several replicas of the hub share."""
    database_pool_size: int = 8
    """PostgreSQL connections one hub process keeps open at most."""
    max_body_bytes: int = 64 * 1024 * 1024
    max_queries: int = 10_000
    max_items: int = 100_000
    max_labels_per_item: int = 32
    max_label_length: int = 128
    max_note_length: int = 1_000
    max_connections: int = 512
    """Open client connections at most; one more is answered 503 and closed (keep under ``ulimit -n``)."""
    keepalive_timeout_seconds: float = 75.0
    """An idle connection, or one whose request headers are not complete by then, is closed."""
    request_timeout_seconds: float = 60.0
    """Longest time to receive a request body once its headers arrived; then 408 and the connection closes."""
    min_body_bytes_per_second: int = 1_024
    """A body arriving slower than this on average (after a short grace period) is cut likewise; 0 = off."""
    max_inflight: int = 64
    """Requests handled at once; more wait in the queue."""
    max_queued: int = 256
    """Requests waiting for a handling slot at most; one more is shed with 503 ``overloaded``."""
    queue_timeout_seconds: float = 5.0
    """Longest wait in the queue; then 503 ``overloaded``."""
    rate_limit_per_second: float = 0.0
    """Signed requests per second per key (token bucket refill rate); 0 = no rate limit."""
    rate_limit_burst: int = 0
    """Token bucket size: requests a key may make at once; 0 = one second's worth (at least 1)."""
    max_matches_per_query: int = 10_000
    """Matches one lookup query answers at most, nearest first; a result cut short says ``truncated``."""
    max_matches_per_answer: int = 100_000
    """Matches one lookup answers at most in all, in query order; later results are cut the same way."""
    max_pending_body_bytes: int = 256 * 1024 * 1024
    """Request body bytes buffered at once across the hub; a body that would pass it is shed with 503."""
    send_timeout_seconds: float = 30.0
    """Longest a response write may wait for the client to read; then the connection is closed."""
    min_send_bytes_per_second: int = 16_384
    """A response the client reads slower than this on average (after the timeout's grace) is cut; 0 = off."""
    max_streams: int = 16
    """Entries requests (pages and NDJSON streams) served at once, in their own slots; more get 503."""
    max_streams_per_key: int = 4
    """Entries requests one key may have open at once; more get 429."""
    entries_page_bytes: int = 8 * 1024 * 1024
    """Bytes of entries in one JSON page or NDJSON chunk (at least one entry); ``next`` says where to go on."""
    photodna_max_distance: int = 30_000
    """Default squared Euclidean distance for PhotoDNA queries that give none (0-9,363,600)."""
    min_free_bytes: int = 64 * 1024 * 1024
    """Writes are refused (507 ``storage-full``) while the data directory's disk has less free; 0 = off."""
    metrics_allow: str = "127.0.0.0/8 ::1"
    """Networks whose callers may read ``GET /metrics`` (spaces or commas between them; ``*``: anyone)."""
    console_allow: str = "127.0.0.0/8 ::1"
    """Networks whose callers may use the console at ``/console/`` (they still need a login token)."""
    tls_cert: str = ""
    """PEM certificate chain the hub serves HTTPS with (relative to the data directory); empty: plain HTTP."""
    tls_key: str = ""
    """PEM private key of ``tls_cert``."""
    tls_client_ca: str = ""
    """PEM CA file: when set, callers must show a client certificate it issued (mutual TLS)."""
    peers: tuple[PeerConfig, ...] = ()

    def __post_init__(self) -> None:
        for name in _SECONDS_OR_RATES:
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in _POSITIVE:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name in _NON_NEGATIVE:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 or more, got {getattr(self, name)!r}")
        for setting in ("metrics_allow", "console_allow"):
            try:
                parse_networks(getattr(self, setting))
            except ValueError as exc:
                raise ConfigError(f'{setting}: {exc} (give networks like "127.0.0.0/8 ::1", or "*")') from exc
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: set both to serve HTTPS, or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError(
                "tls_client_ca asks callers for certificates over TLS: set tls_cert and tls_key too"
            )
        if self.database and not self.database.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError(
                f"database {self.database!r} is not a database URL: leave it empty for hub.sqlite3, "
                "or give sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE"
            )
        if not 0 <= self.photodna_max_distance <= PHOTODNA_MAX_DISTANCE_LIMIT:
            raise ConfigError(
                f"photodna_max_distance must be from 0 to {PHOTODNA_MAX_DISTANCE_LIMIT:,}, "
                f"got {self.photodna_max_distance!r}"
            )

    @property
    def lookup_defaults(self) -> LookupDefaults:
        """What a lookup query gets when it does not say (served in ``GET /v1/hub`` ``defaults``)."""
        return LookupDefaults(photodna_max_distance=self.photodna_max_distance)

    @property
    def burst(self) -> int:
        """The rate limit's bucket size: ``rate_limit_burst``, or one second's worth when that is 0."""
        return self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_second))

    @property
    def limits(self) -> Limits:
        return Limits(
            max_items=self.max_items,
            max_labels_per_item=self.max_labels_per_item,
            max_label_length=self.max_label_length,
            max_note_length=self.max_note_length,
        )

    def to_toml(self) -> str:
        lines = ["# hashfed hub configuration; see docs/operations.md", ""]
        for key, value in asdict(self).items():
            if key == "peers":
                continue
            lines.append(f"{key} = {value!r}" if isinstance(value, int | float) else f'{key} = "{value}"')
        return "\n".join(lines) + "\n" + "".join(peer.to_toml() for peer in self.peers)

    @classmethod
    def from_toml(cls, text: str, source: str, base: Path | None = None) -> HubConfig:
        """Parse hub.toml; relative ``member_key`` paths of peers are taken from ``base``."""
        try:
            raw: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        peers = _peers(raw.pop("peers"), source, base) if "peers" in raw else ()
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        for key in ("name", "federation"):
            if key not in raw:
                raise ConfigError(f"{source}: missing setting {key!r}")
        for key, value in raw.items():
            if key in _SECONDS_OR_RATES and isinstance(value, int | float) and not isinstance(value, bool):
                raw[key] = float(value)
                continue
            expected = str if key in _STRING_SETTINGS else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be a {expected.__name__}")
        check_name(raw["name"])
        check_name(raw["federation"])
        try:
            return cls(**raw, peers=peers)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from exc


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def signer_file(self) -> Path:
        return self.path / SIGNER_FILE

    @property
    def verifier_file(self) -> Path:
        return self.path / VERIFIER_FILE

    @property
    def database(self) -> Path:
        """The SQLite file of a hub on SQLite; a hub on PostgreSQL names its database in hub.toml."""
        return self.path / DATABASE_FILE

    @property
    def index_dir(self) -> Path:
        """Snapshots of the large index segments; derived data, safe to delete."""
        return self.path / INDEX_DIR

    @property
    def signed_dir(self) -> Path:
        """The last checkpoint signed per collection: what the hub has published and must extend."""
        return self.path / SIGNED_DIR

    @property
    def console_tokens_file(self) -> Path:
        """Hashes and expiries of console login tokens (``hashfed console-token``)."""
        return self.path / "console-tokens.json"

    @property
    def retired_dir(self) -> Path:
        return self.path / RETIRED_DIR

    @property
    def next_signer_file(self) -> Path:
        """A rotation's new key while ``hashfed rotate-key`` hands the collections over to it."""
        return self.path / NEXT_SIGNER_FILE

    @property
    def key_chain_file(self) -> Path:
        return self.path / KEY_CHAIN_FILE

    def retired_signers(self) -> list[SignerKey]:
        """The hub keys this hub rotated away from, oldest first (by file name)."""
        return [load_signer_file(path) for path in sorted(self.retired_dir.glob("*.key"))]

    def check(self) -> None:
        if not self.config_file.exists():
            raise ConfigError(
                f"{self.path} is not a hub data directory (no {CONFIG_FILE}); create one with `hashfed init`"
            )

    def config(self) -> HubConfig:
        self.check()
        return HubConfig.from_toml(self.config_file.read_text(), str(self.config_file), self.path)

    def signer(self) -> SignerKey:
        return load_signer_file(self.signer_file)
