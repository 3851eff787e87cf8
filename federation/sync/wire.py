"""JSON shapes that sync adds to the wire: lookup matches from mirrored collections, sources.

A match from a hub's own collection keeps the v1 shape exactly. A match from
a mirrored collection names the collection as its origin hub does and adds
``"hub"``: the origin hub's name. A member mirror answers in the same shape,
so its answers can be compared with the origin hub's, hash for hash.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from ..checkpoint import Checkpoint, CheckpointError, split_note
from ..node import Match
from ..store.base import SourceRecord


def match_json(match: Match, source: SourceRecord | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "collection": match.collection if source is None else source.collection,
        "type": match.signal,
        "hash": match.hash,
        "distance": match.distance,
        **dict(match.fields),
        "submitters": list(match.submitters),
        "labels": list(match.labels),
        "first_index": match.first_index,
        "opinions": {"positive": match.positive, "negative": match.negative},
    }
    if source is not None:
        answer["hub"] = source.hub
    return answer


def checkpoint_summary(note: str | None) -> dict[str, Any] | None:
    """Size and root of a stored (already verified) note, for status answers."""
    if note is None:
        return None
    try:
        checkpoint = Checkpoint.parse_text(split_note(note)[0])
    except CheckpointError:
        return None
    return {"size": checkpoint.size, "root": base64.b64encode(checkpoint.root).decode()}


def source_json(record: SourceRecord, log_size: int, evidence: list[str]) -> dict[str, Any]:
    """One entry of ``GET /v1/sources``: the latest checkpoint verified of a mirrored collection."""
    return {
        "name": record.name,
        "hub": record.hub,
        "collection": record.collection,
        "key": record.key,
        "federation": record.federation,
        "log_size": log_size,
        "checkpoint": record.checkpoint,
        "forked": record.forked,
        "evidence": [json.loads(body) for body in evidence],
    }
