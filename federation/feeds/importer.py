"""Turning a feed into signed batches: what to add and remove, resumably and idempotently.

The feed's records are applied in order to decide each hash's final state
(the last word wins: a hash added then withdrawn is removed). An import
keeps a state file of what it has listed, with the labels it gave, and which
feed entry ids stood for which hashes (an NCMEC deletion names only the
entry). The state is written durably after every batch the hub
acknowledged, so an interrupted import resumes where it stopped; running
the same import again submits nothing. Removals touch only hashes this
importer listed, so a feed's withdrawal never reaches another member's
listing, and a removal already made (acknowledged, then interrupted before
the state was saved) is checked against the hub and not sent again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..durable import write_atomically
from .formats import FeedReport

Key = tuple[str, str]
STATE_FORMAT = 1


def key_text(key: Key) -> str:
    return f"{key[0]}:{key[1]}"


def text_key(text: str) -> Key:
    signal, _, value = text.partition(":")
    return signal, value


@dataclass
class ImportState:
    """What earlier runs of this import listed, and the feed's entry ids (``--state FILE``)."""

    path: Path
    collection: str
    listed: dict[Key, tuple[str, ...]] = field(default_factory=dict)
    entries: dict[str, list[Key]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, collection: str) -> ImportState:
        if not path.exists():
            return cls(path, collection)
        try:
            raw = json.loads(path.read_text())
            if raw.get("format") != STATE_FORMAT or raw.get("collection") != collection:
                raise ValueError(
                    f"it is the state of an import into {raw.get('collection')!r}, not {collection!r}"
                )
            listed = {text_key(k): tuple(v) for k, v in raw["listed"].items()}
            entries = {str(k): [text_key(v) for v in values] for k, values in raw["entries"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"import state {path} cannot be used: {exc}") from exc
        return cls(path, collection, listed, entries)

    def save(self) -> None:
        document = {
            "format": STATE_FORMAT,
            "collection": self.collection,
            "listed": {key_text(k): list(v) for k, v in sorted(self.listed.items())},
            "entries": {k: [key_text(v) for v in values] for k, values in sorted(self.entries.items())},
        }
        write_atomically(self.path, json.dumps(document, indent=1) + "\n")


@dataclass
class ImportPlan:
    additions: dict[Key, tuple[str, ...]]
    """Hashes to list, with their labels; already listed with the same labels: left out."""
    removals: list[Key]
    """Hashes this importer listed that the feed withdrew."""
    unchanged: int
    """Hashes the feed lists that an earlier run already listed with the same labels."""
    not_ours: int
    """Withdrawals of hashes this importer never listed: left alone."""
    unknown_entries: int
    """Deletions of feed entries no run of this import has seen."""
    entries: dict[str, list[Key]]
    """Entry ids to record once the additions are acknowledged."""


def plan_import(report: FeedReport, state: ImportState) -> ImportPlan:
    """The net effect of the feed on what this importer lists."""
    final: dict[Key, tuple[str, ...] | None] = {}
    entries: dict[str, list[Key]] = {}
    unknown = 0
    for record in report.records:
        if record.signal is None:  # a deletion of a feed entry, by its id
            assert record.entry_id is not None
            keys = entries.pop(record.entry_id, None) or state.entries.get(record.entry_id)
            if keys is None:
                unknown += 1
                continue
            for key in keys:
                final[key] = None
            continue
        assert record.hash is not None
        key = (record.signal, record.hash)
        if record.remove:
            final[key] = None
            continue
        earlier = final.get(key) or ()
        final[key] = tuple(dict.fromkeys((*earlier, *record.labels)))
        if record.entry_id is not None:
            entries.setdefault(record.entry_id, []).append(key)
    additions: dict[Key, tuple[str, ...]] = {}
    removals: list[Key] = []
    unchanged = not_ours = 0
    for key, labels in final.items():
        if labels is None:
            if key in state.listed:
                removals.append(key)
            else:
                not_ours += 1
        elif state.listed.get(key) == labels:
            unchanged += 1
        else:
            additions[key] = labels
    return ImportPlan(additions, removals, unchanged, not_ours, unknown, entries)
