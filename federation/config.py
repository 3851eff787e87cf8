"""A hub's data directory: configuration, keys and database in one place.

Layout::

    DIR/hub.toml      name, federation, listen address, limits (edit by hand)
    DIR/hub.key       the hub's signer key (mode 0600; back it up, never share it)
    DIR/hub.pub       the hub's verifier key (give it to members and peers)
    DIR/hub.sqlite3   the log and its projection (SQLite, WAL)
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from .envelope import Limits
from .keys import SignerKey, check_name, load_signer_file

CONFIG_FILE = "hub.toml"
SIGNER_FILE = "hub.key"
VERIFIER_FILE = "hub.pub"
DATABASE_FILE = "hub.sqlite3"


class ConfigError(ValueError):
    """A data directory or configuration that cannot be used; the message says how to fix it."""


@dataclass(frozen=True)
class HubConfig:
    name: str
    federation: str
    host: str = "127.0.0.1"
    port: int = 8080
    max_body_bytes: int = 64 * 1024 * 1024
    max_queries: int = 10_000
    max_items: int = 100_000
    max_labels_per_item: int = 32
    max_label_length: int = 128
    max_note_length: int = 1_000

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
            lines.append(f"{key} = {value!r}" if isinstance(value, int) else f'{key} = "{value}"')
        return "\n".join(lines) + "\n"

    @classmethod
    def from_toml(cls, text: str, source: str) -> HubConfig:
        try:
            raw: dict[str, Any] = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from exc
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ConfigError(f"{source}: unknown setting {unknown[0]!r}; known: {', '.join(known)}")
        for key in ("name", "federation"):
            if key not in raw:
                raise ConfigError(f"{source}: missing setting {key!r}")
        for key, value in raw.items():
            expected = str if key in ("name", "federation", "host") else int
            if not isinstance(value, expected) or isinstance(value, bool):
                raise ConfigError(f"{source}: {key} must be a {expected.__name__}")
        check_name(raw["name"])
        check_name(raw["federation"])
        return cls(**raw)


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
        return self.path / DATABASE_FILE

    def check(self) -> None:
        if not self.config_file.exists():
            raise ConfigError(
                f"{self.path} is not a hub data directory (no {CONFIG_FILE}); create one with `hashfed init`"
            )

    def config(self) -> HubConfig:
        self.check()
        return HubConfig.from_toml(self.config_file.read_text(), str(self.config_file))

    def signer(self) -> SignerKey:
        return load_signer_file(self.signer_file)
