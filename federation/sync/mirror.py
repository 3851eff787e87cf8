"""A member's mirror directory: one collection of one hub, verified, answering lookups offline.

Layout::

    DIR/mirror.toml       hub URL, member key file, collection, pinned hub key
    DIR/mirror.sqlite3    the mirrored log and its projection (the hub's own schema)
    DIR/checkpoint.txt    the latest checkpoint verified, as the hub signed it: compare it with others
    DIR/evidence/         fork evidence, one JSON file per fork found
"""

from __future__ import annotations

import asyncio
import contextlib
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..client import HubClient
from ..config import INDEX_DIR, ConfigError
from ..durable import make_private_directory, write_atomically
from ..keys import KeyFormatError, SignerKey, parse_key_chain
from ..node import Node
from ..signals import Query
from ..store.sqlite import SqliteStore
from ..tls import ClientTls
from .puller import READ_TIMEOUT, ByteCounter, Puller, SourceSpec, SyncProgress, new_session
from .verify import Evidence
from .wire import match_json

T = TypeVar("T")

CONFIG_FILE = "mirror.toml"
DATABASE_FILE = "mirror.sqlite3"
CHECKPOINT_FILE = "checkpoint.txt"
EVIDENCE_DIR = "evidence"
OPTIONAL_SETTINGS = frozenset({"ca", "client_cert"})


@dataclass(frozen=True)
class MirrorConfig:
    hub: str
    """URL of the hub pulled from: the collection's origin hub or a hub that relays it."""
    key: str
    """The member's signer key file, used to sign requests to that hub."""
    collection: str
    """The collection as named at ``hub``: ``NAME``, or ``HUB:NAME`` when relayed."""
    pin: str
    """The origin hub's verifier key."""
    ca: str = ""
    """PEM file of the CA of an ``https://`` hub's certificate, if not a public one."""
    client_cert: str = ""
    """PEM file with a TLS client certificate and key, for a hub that requires mutual TLS."""

    @property
    def tls(self) -> ClientTls:
        return ClientTls(self.ca or None, self.client_cert or None)

    def spec(self) -> SourceSpec:
        try:
            return SourceSpec.make(self.hub, parse_key_chain(self.pin), self.collection)
        except (KeyFormatError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc

    def to_toml(self) -> str:
        lines = ["# hashfed mirror configuration; see docs/operations.md"]
        for name, value in asdict(self).items():
            if name in OPTIONAL_SETTINGS and not value:
                continue
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'{name} = "{escaped}"')
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, source: str) -> MirrorConfig:
        try:
            raw: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        names = ("hub", "key", "collection", "pin")
        allowed = set(names) | OPTIONAL_SETTINGS
        if not set(names) <= set(raw) <= allowed or not all(isinstance(value, str) for value in raw.values()):
            raise ConfigError(
                f"{source}: needs the string settings {', '.join(names)} "
                f"(and may have {', '.join(sorted(OPTIONAL_SETTINGS))})"
            )
        config = cls(**raw)
        config.spec()
        return config


@dataclass(frozen=True)
class MirrorDir:
    path: Path

    @property
    def config_file(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def database(self) -> Path:
        return self.path / DATABASE_FILE

    @property
    def checkpoint_file(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def evidence_dir(self) -> Path:
        return self.path / EVIDENCE_DIR

    def exists(self) -> bool:
        return self.config_file.exists()

    def config(self) -> MirrorConfig:
        if not self.exists():
            raise ConfigError(
                f"{self.path} is not a mirror directory (no {CONFIG_FILE}); create one with `hashfed mirror`"
            )
        return MirrorConfig.from_toml(self.config_file.read_text(), str(self.config_file))

    def write_config(self, config: MirrorConfig) -> None:
        make_private_directory(self.path)
        write_atomically(self.config_file, config.to_toml())

    def open_node(self) -> Node:
        """The mirror as a node with no collections of its own (it never signs anything)."""
        spec = self.config().spec()
        return Node(
            SqliteStore(self.database),
            name="mirror",
            federation="mirror",
            hub_key=spec.origin.key,
            index_dir=self.path / INDEX_DIR,
        )

    def save_checkpoint(self, note: str | None) -> None:
        if note is not None:
            write_atomically(self.checkpoint_file, note)

    def save_evidence(self, evidence: Evidence) -> Path:
        make_private_directory(self.evidence_dir)
        stamp = evidence.detected.replace(":", "").replace("-", "")
        path = self.evidence_dir / f"{stamp}-{evidence.reason}.json"
        counter = 1
        while path.exists():
            counter += 1
            path = self.evidence_dir / f"{stamp}-{evidence.reason}-{counter}.json"
        write_atomically(path, evidence.dumps() + "\n")
        return path


@contextlib.asynccontextmanager
async def open_puller(
    mirror: MirrorDir,
    config: MirrorConfig,
    signer: SignerKey,
    *,
    read_timeout: float = READ_TIMEOUT,
    on_progress: Callable[[SyncProgress], None] | None = None,
) -> AsyncIterator[Puller]:
    """The verifying puller of a mirror directory, with its store, worker thread and session.

    ``hashfed mirror`` and the python-threatexchange exchange both sync
    through it, so every copy of a collection is checked the same way.
    """
    node = mirror.open_node()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hashfed-mirror")
    loop = asyncio.get_running_loop()
    counter = ByteCounter()
    session = new_session(300.0, counter, read_timeout, config.tls)
    client = HubClient(config.hub, signer, session=session, retries=2)

    def run(fn: Callable[[], T]) -> Awaitable[T]:
        return loop.run_in_executor(executor, fn)

    try:
        yield Puller(node, config.spec(), client, run, counter=counter, index=False, on_progress=on_progress)
    finally:
        await session.close()
        executor.shutdown(wait=True)
        node.store.close()


def lookup(
    node: Node,
    queries: Sequence[Query],
    collections: Sequence[str] = (),
) -> list[list[dict[str, Any]]]:
    """Matches per query from a mirror's collections, in the hub's wire shape (with ``hub``).

    ``collections`` may name a collection locally (``HUB:NAME``) or as its
    origin does (``NAME``); empty means all of them.
    """
    sources = node.sources()
    chosen = [
        name
        for name, record in sources.items()
        if not collections or name in collections or record.collection in collections
    ]
    unknown = [
        c for c in collections if c not in sources and all(r.collection != c for r in sources.values())
    ]
    if unknown:
        known = ", ".join(sources) or "none yet"
        raise ConfigError(f"the mirror has no collection {unknown[0]!r} (it has: {known})")
    results = node.lookup(chosen, queries)
    return [[match_json(match, sources[match.collection]) for match in matches] for matches in results]
