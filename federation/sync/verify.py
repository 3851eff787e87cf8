"""Pure verification for sync: a source's signed checkpoints against what a mirror already trusts.

A mirror of one collection holds, besides its local copy of the log:

- ``reached``: the newest signed checkpoint whose size the local log has
  reached, with the local root equal to the checkpoint's root;
- ``target``: the newest signed checkpoint proven consistent with
  ``reached``; the local log is a proven prefix of it (each span appended
  while catching up was checked against it with a consistency proof).

A new checkpoint from the source is judged against these by :func:`plan`:
it is the same, older, or newer. Where the judgement needs the source's tree
(a consistency proof between two signed sizes) the plan says so, and
:func:`check_link` checks the proof. Two signed checkpoints that cannot both
be true become :class:`Evidence`: the two notes and the proof that shows (or
failed to show) how they relate, kept and served so anyone can check it.

Nothing here does I/O; ``local_root`` and ``local_proof`` read the local log.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import merkle
from ..checkpoint import CheckpointError, open_note
from ..envelope import utc_now
from ..keys import KeyFormatError, VerifierKey, parse_key_chain

EVIDENCE_FORMAT = "hashfed-fork-evidence/v1"

SAME_SIZE = "same-size"
"""Two checkpoints of one size with different roots."""
ROLLBACK = "rollback"
"""A smaller checkpoint whose root is not the root of that prefix of a trusted, larger one."""
UNPROVEN = "unproven"
"""A consistency proof between two checkpoints, as served by the source, that does not verify."""
REASONS = (SAME_SIZE, ROLLBACK, UNPROVEN)


class VerificationError(Exception):
    """Data from a source failed verification; nothing of it was applied."""


class ForkDetected(VerificationError):
    """Two signed checkpoints of one log that cannot both be true; the source is stopped."""

    def __init__(self, evidence: Evidence) -> None:
        super().__init__(f"FORK: {evidence.detail}")
        self.evidence = evidence


@dataclass(frozen=True)
class Origin:
    """Which log is being verified: its origin hub, collection and pinned key, and where it came from."""

    hub: str
    collection: str
    key: VerifierKey
    """The pinned key the log started with (its first membership entry is signed by it)."""
    url: str
    later: tuple[VerifierKey, ...] = ()
    """Keys pinned with it that the hub rotated to later (a pinned ``hub.keys``), oldest first."""
    accepted: tuple[VerifierKey, ...] = ()
    """Keys whose checkpoints are accepted now (empty: every pinned key); see ``Puller._origin``."""

    @property
    def checkpoint_keys(self) -> tuple[VerifierKey, ...]:
        return self.accepted or (self.key, *self.later)

    @property
    def checkpoint_origin(self) -> str:
        """The first line every checkpoint of this log must carry."""
        return f"{self.hub}/{self.collection}"


@dataclass(frozen=True)
class SignedCheckpoint:
    """A checkpoint note whose signature by the pinned key and origin line were checked."""

    note: str
    size: int
    root: bytes

    @classmethod
    def open(cls, note: str, origin: Origin) -> SignedCheckpoint:
        try:
            checkpoint = open_note(note, origin.checkpoint_keys)
        except CheckpointError as exc:
            raise VerificationError(f"checkpoint from {origin.url} refused: {exc}") from exc
        if checkpoint.origin != origin.checkpoint_origin:
            raise VerificationError(
                f"checkpoint from {origin.url} is for log {checkpoint.origin!r}, not {origin.checkpoint_origin!r}"
            )
        return cls(note, checkpoint.size, checkpoint.root)

    def describe(self) -> str:
        return f"size {self.size} root {base64.b64encode(self.root).decode()}"


@dataclass(frozen=True)
class Evidence:
    """Two signed checkpoints of one log that contradict each other, and the proof that says so.

    ``trusted`` is the note held before, ``conflicting`` the new one. The
    proof links the smaller size to the larger one: for ``rollback`` it is
    computed from the local log (``old_root`` is the local root at the
    smaller size) and verifies, showing that the smaller note's root is not
    the larger tree's prefix (computed locally, or served by the source and
    leading to the larger signed root); ``same-size`` needs none. Earlier
    versions kept ``unproven`` evidence (a proof that did not verify): it is
    still read, but :meth:`check` refuses it, since it proves nothing.
    """

    reason: str
    hub: str
    collection: str
    key: str
    trusted: str
    conflicting: str
    proof_old: int
    proof_new: int
    proof_hashes: tuple[bytes, ...]
    old_root: bytes | None
    proof_from: str
    detected: str
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {
            "format": EVIDENCE_FORMAT,
            "reason": self.reason,
            "hub": self.hub,
            "collection": self.collection,
            "key": self.key,
            "trusted": self.trusted,
            "conflicting": self.conflicting,
            "proof": {
                "old": self.proof_old,
                "new": self.proof_new,
                "old_root": None if self.old_root is None else _b64(self.old_root),
                "hashes": [_b64(h) for h in self.proof_hashes],
                "from": self.proof_from,
            },
            "detected": self.detected,
            "detail": self.detail,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False)

    @classmethod
    def from_json(cls, obj: Any) -> Evidence:
        try:
            if obj["format"] != EVIDENCE_FORMAT or obj["reason"] not in REASONS:
                raise VerificationError("not hashfed fork evidence of a known format")
            proof = obj["proof"]
            old_root = proof["old_root"]
            return cls(
                reason=str(obj["reason"]),
                hub=str(obj["hub"]),
                collection=str(obj["collection"]),
                key=str(obj["key"]),
                trusted=str(obj["trusted"]),
                conflicting=str(obj["conflicting"]),
                proof_old=int(proof["old"]),
                proof_new=int(proof["new"]),
                proof_hashes=tuple(base64.b64decode(h, validate=True) for h in proof["hashes"]),
                old_root=None if old_root is None else base64.b64decode(old_root, validate=True),
                proof_from=str(proof["from"]),
                detected=str(obj["detected"]),
                detail=str(obj["detail"]),
            )
        except (KeyError, TypeError, ValueError, binascii.Error) as exc:
            raise VerificationError(f"malformed fork evidence: {exc}") from exc

    def check(self) -> str:
        """Re-verify the evidence from its own contents; return what it shows, or raise VerificationError."""
        try:
            keys = parse_key_chain(self.key)  # the hub's keys when it signed them, after rotations
        except KeyFormatError as exc:
            raise VerificationError(f"evidence key: {exc}") from exc
        key = keys[0]
        origin = Origin(self.hub, self.collection, key, "evidence", keys[1:])
        trusted = SignedCheckpoint.open(self.trusted, origin)
        conflicting = SignedCheckpoint.open(self.conflicting, origin)
        small, large = sorted((trusted, conflicting), key=lambda c: c.size)
        if self.reason == SAME_SIZE:
            if trusted.size != conflicting.size or trusted.root == conflicting.root:
                raise VerificationError("same-size evidence needs two notes of one size with different roots")
            return f"two trees of size {trusted.size} signed by hub {key.name}"
        if (self.proof_old, self.proof_new) != (small.size, large.size) or small.size == large.size:
            raise VerificationError("the evidence proof does not link the sizes of its two notes")
        if self.reason == ROLLBACK:
            if self.old_root is None or self.old_root == small.root:
                raise VerificationError(
                    "rollback evidence needs a prefix root that differs from the smaller note"
                )
            try:
                merkle.verify_consistency(
                    small.size, large.size, self.old_root, large.root, self.proof_hashes
                )
            except merkle.ProofError as exc:
                raise VerificationError(f"rollback evidence proof does not verify: {exc}") from exc
            return (
                f"the tree of size {large.size} has a prefix of size {small.size} with another root "
                f"than the signed checkpoint of size {small.size}"
            )
        raise VerificationError(
            "unproven evidence (a consistency proof that does not verify) proves nothing: anyone on the "
            "path can alter a proof; clear the source and sync again"
        )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _evidence(
    reason: str,
    origin: Origin,
    trusted: SignedCheckpoint,
    conflicting: SignedCheckpoint,
    detail: str,
    *,
    proof: Sequence[bytes] = (),
    old_root: bytes | None = None,
    proof_from: str = "",
) -> Evidence:
    small, large = sorted((trusted.size, conflicting.size))
    return Evidence(
        reason=reason,
        hub=origin.hub,
        collection=origin.collection,
        key=" ".join(key.encode() for key in origin.checkpoint_keys),
        trusted=trusted.note,
        conflicting=conflicting.note,
        proof_old=small,
        proof_new=large,
        proof_hashes=tuple(proof),
        old_root=old_root,
        proof_from=proof_from,
        detected=utc_now(),
        detail=f"{origin.checkpoint_origin} (key {origin.key.key_id}, from {origin.url}): {detail}",
    )


@dataclass(frozen=True)
class Known:
    """What a mirror holds for one source (see the module docstring)."""

    reached: SignedCheckpoint | None
    target: SignedCheckpoint | None
    size: int


@dataclass(frozen=True)
class Plan:
    """What to do about a new checkpoint.

    ``goal``: the checkpoint to sync toward (the new one if it is newer,
    else the current target). ``link``: two checkpoints, smaller first, that
    a consistency proof from the source must link before going on.
    """

    goal: SignedCheckpoint
    link: tuple[SignedCheckpoint, SignedCheckpoint] | None = None
    newer: bool = False


def plan(
    new: SignedCheckpoint,
    known: Known,
    origin: Origin,
    local_root: Callable[[int], bytes],
    local_proof: Callable[[int, int], list[bytes]],
) -> Plan:
    """Judge a new signed checkpoint against what is trusted; raise ForkDetected if it cannot be true."""
    target, reached = known.target, known.reached
    if target is None:  # the first checkpoint: every entry will be checked against it
        return Plan(new, newer=True)
    if new.size == target.size:
        if new.root != target.root:
            raise ForkDetected(
                _evidence(
                    SAME_SIZE,
                    origin,
                    target,
                    new,
                    f"two different trees of size {new.size}: {target.describe()} and {new.describe()}",
                )
            )
        return Plan(target)
    if new.size > target.size:
        return Plan(new, link=(target, new), newer=True)
    if reached is not None and new.size <= reached.size:
        # The local log holds this prefix, verified: its root must be the new note's.
        prefix = local_root(new.size)
        if prefix != new.root:
            proof = local_proof(new.size, reached.size)
            raise ForkDetected(
                _evidence(
                    ROLLBACK,
                    origin,
                    reached,
                    new,
                    f"checkpoint {new.describe()} is not a prefix of the trusted {reached.describe()} "
                    f"(that prefix's root is {_b64(prefix)})",
                    proof=proof,
                    old_root=prefix,
                    proof_from="local",
                )
            )
        return Plan(target)
    return Plan(target, link=(new, target))


def check_link(
    small: SignedCheckpoint,
    large: SignedCheckpoint,
    proof: Sequence[bytes],
    origin: Origin,
    trusted_is_large: bool,
) -> None:
    """Check the source's consistency proof between two signed checkpoints.

    A proof that does not verify proves nothing about the hub: anyone on the
    path can flip one of its bits. That is a :class:`VerificationError`, which
    a mirror retries. Only when the proof does lead to the larger signed root
    and shows that tree with another prefix than the smaller signed note is it
    evidence (:class:`ForkDetected`, reason ``rollback``): two signed
    checkpoints and a proof that together cannot be true.
    """
    try:
        merkle.verify_consistency(small.size, large.size, small.root, large.root, proof)
    except merkle.ProofError as exc:
        prefix = merkle.proven_prefix_root(small.size, large.size, large.root, proof)
        if prefix is not None and prefix != small.root:
            trusted, conflicting = (large, small) if trusted_is_large else (small, large)
            raise ForkDetected(
                _evidence(
                    ROLLBACK,
                    origin,
                    trusted,
                    conflicting,
                    f"the signed tree {large.describe()} has a prefix of size {small.size} with root "
                    f"{_b64(prefix)}, not the signed {small.describe()}",
                    proof=proof,
                    old_root=prefix,
                    proof_from=origin.url,
                )
            ) from exc
        raise VerificationError(
            f"the consistency proof from {small.describe()} to {large.describe()} does not verify ({exc}); "
            "it proves nothing either way (it may have been altered on the way): retry, over TLS if you can"
        ) from exc


def check_span(size: int, root: bytes, goal: SignedCheckpoint, proof: Sequence[bytes]) -> None:
    """After appending a span, the local log of ``size`` entries must be a prefix of ``goal``.

    At the goal's size the roots must be equal; below it, ``proof`` (the
    source's consistency proof from ``size`` to the goal's size) must link
    the local root to the goal's root. A mismatch means the entries were not
    the ones the signed checkpoint commits to.
    """
    if size > goal.size:
        raise VerificationError(f"the local log ({size} entries) ran past the checkpoint of size {goal.size}")
    if size == goal.size:
        if root != goal.root:
            raise VerificationError(
                f"the entries up to {size} do not lead to the signed checkpoint: local root {_b64(root)}, "
                f"checkpoint {goal.describe()}"
            )
        return
    try:
        merkle.verify_consistency(size, goal.size, root, goal.root, proof)
    except merkle.ProofError as exc:
        raise VerificationError(
            f"the entries up to {size} are not proven a prefix of the checkpoint of size {goal.size}: {exc}"
        ) from exc
