"""Data and helpers for `hashfed demo`: reference hashes, generated batches, a log audit.

The PDQ hashes are the ones the PDQ reference implementation prints for the
eight dihedral orientations of its "bridge" test photograph (rotations and
flips), carried here as literals so the demo needs no files outside the repo.
Everything else is generated from fixed seeds, so every run shows the same
hashes.

:func:`audit_log` is what a mirror does with the entries it pulls: it checks
every envelope's signature against the membership that the log itself records
(replaying the hub-signed grants and revokes in order), and rebuilds the Merkle
tree so its root can be compared with a signed checkpoint.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import merkle
from .envelope import (
    BatchPayload,
    Envelope,
    EnvelopeError,
    HubKeyPayload,
    MembershipPayload,
    OpinionPayload,
    parse_payload,
)
from .keys import VerifierKey

HUB_NAME = "demo-hub"
FEDERATION = "demo"
MAIN = "csam-hashes"
SECOND = "terror-hashes"

WRITE = frozenset({"read", "write"})
READ = frozenset({"read"})
MEMBERS: tuple[tuple[str, frozenset[str]], ...] = (
    ("acme", WRITE),
    ("globex", WRITE),
    ("initech", WRITE),
    ("safety-lab", READ),
)
"""Demo members and their rights: three writers and a read-only reviewer."""

BRIDGE: dict[str, str] = {
    "bridge-1-original": "f8f8f0cce0f4e84d0e370a22028f67f0b36e2ed596623e1d33e6339c4e9c9b22",
    "bridge-2-rotate-90": "b0a10efd71cc3f429413d48d0ffffe12e34e0e17ada952a9d29684210aa9e5af",
    "bridge-3-rotate-180": "adad5a64b5a142e55362a09057dacd5ae63b847fc23794b766b319361fc93188",
    "bridge-4-rotate-270": "a5f4a457a48995e8c9065c275aaa5498b61ba4bdf8fcf80387c32f8b0bfc4f05",
    "bridge-5-flipx": "f8f80f31e0f417b00e37f5cd028f980fb36ed02a9662c1e233e6cc634e9c64dd",
    "bridge-6-flipy": "8dad2599b1a1bd1853625f6553da32a1e63b7280c2374b4866b366c91bc9ce77",
    "bridge-7-flip-plus-1": "f0a1f102f1dcc0bd9c5309720fff018de34ef1e8ada9a956d2967ade0ea91a50",
    "bridge-8-flip-minus-1": "a5f05ba8a4896a17c106a3da5aaaab07b61b5b42f8fc07fc83c3d0740bfcb0fa",
}
"""PDQ reference hashes of the bridge photo in its eight orientations (label -> hash)."""

GLOBEX_ALSO_LISTS = ("bridge-1-original", "bridge-5-flipx")
"""Bridge hashes that globex submits too, under its own labels."""

FILE_SAMPLES = ("demo file: recruitment-video.mp4", "demo file: manifesto.pdf")
"""Stand-ins for files: globex submits their md5 and sha256 digests."""

FLIP_COUNTS = (0, 8, 20, 31, 32)
"""How many bits of the bridge hash the near-duplicate lookups flip."""

INITECH_SEED = 20261121
INITECH_COUNT = 2_000
INITECH_NEAR_SHARE = 0.1


def md5_hex(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def flip_bits(hash_hex: str, positions: Sequence[int]) -> str:
    """The PDQ hash with the given bit positions (0 = least significant) inverted."""
    value = int(hash_hex, 16)
    for position in positions:
        value ^= 1 << position
    return format(value, "064x")


def flip_positions(count: int, seed: int = 31) -> list[int]:
    """``count`` distinct bit positions; a larger count extends a smaller one."""
    order = np.random.default_rng(seed).permutation(256)
    return [int(p) for p in order[:count]]


def generated_batch(
    count: int = INITECH_COUNT, seed: int = INITECH_SEED, near_share: float = INITECH_NEAR_SHARE
) -> list[str]:
    """``count`` distinct PDQ hashes: random ones, plus near-duplicates (1-12 bits off) of some."""
    rng = np.random.default_rng(seed)
    near = int(count * near_share)
    rows = rng.integers(0, 256, size=(count - near, 32), dtype=np.uint8)
    hashes = list(dict.fromkeys(bytes(row).hex() for row in rows))
    while len(hashes) < count:
        source = hashes[int(rng.integers(0, count - near))]
        positions = rng.choice(256, size=int(rng.integers(1, 13)), replace=False)
        candidate = flip_bits(source, [int(p) for p in positions])
        if candidate not in hashes:
            hashes.append(candidate)
    return hashes


# ---- the audit a mirror performs --------------------------------------------


class AuditError(ValueError):
    """The log does not verify: a bad signature, an unknown key, a root that differs."""


class MemoryTree:
    """An RFC 6962 tree built leaf by leaf in memory (a :class:`merkle.HashReader`)."""

    def __init__(self) -> None:
        self._hashes: dict[merkle.HashKey, bytes] = {}
        self.size = 0

    def append(self, leaf: bytes) -> None:
        siblings = [self._hashes[key] for key in merkle.append_keys(self.size)]
        self._hashes.update(merkle.hashes_to_store(self.size, leaf, siblings))
        self.size += 1

    def read_hashes(self, keys: Sequence[merkle.HashKey]) -> list[bytes]:
        return [self._hashes[key] for key in keys]

    def root(self, size: int) -> bytes:
        if size > self.size:
            raise AuditError(f"the tree has {self.size} leaves, not {size}")
        return merkle.root(self, size)


@dataclass
class LogAudit:
    """What replaying one collection's log showed."""

    tree: MemoryTree = field(default_factory=MemoryTree)
    leaves: list[bytes] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=lambda: {"membership": 0, "batch": 0, "opinion": 0})
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    listed: dict[tuple[str, str], set[str]] = field(default_factory=dict)


def audit_log(
    entries: Sequence[tuple[int, Envelope]], hub_key: VerifierKey, federation: str, collection: str
) -> LogAudit:
    """Verify every entry against the membership recorded before it; raise AuditError if one fails."""
    audit = LogAudit()
    keys: dict[str, tuple[VerifierKey, frozenset[str]]] = {}
    last_seq: dict[str, int] = {}
    for position, (index, envelope) in enumerate(entries):
        where = f"{collection} entry {index}"
        if index != position:
            raise AuditError(f"{where}: expected index {position}; the stream skipped or repeated entries")
        try:
            payload = parse_payload(envelope.payload_type, envelope.payload)
        except EnvelopeError as exc:
            raise AuditError(f"{where}: {exc}") from exc
        header, key_id = payload.header, envelope.signer_key_id
        if (header.federation, header.collection) != (federation, collection):
            raise AuditError(f"{where} belongs to {header.federation}/{header.collection}")
        if header.seq <= last_seq.get(key_id, 0):
            raise AuditError(f"{where}: seq {header.seq} does not increase for {key_id}")
        last_seq[key_id] = header.seq
        if isinstance(payload, MembershipPayload):
            if key_id != hub_key.key_id or not envelope.verify(hub_key):
                raise AuditError(f"{where}: membership entry not signed by the hub key {hub_key.key_id}")
            for grant in payload.grant:
                keys[grant.key.key_id] = (grant.key, grant.rights)
                audit.members[grant.member] = grant.rights
            for revoked in payload.revoke:
                keys.pop(revoked, None)
            audit.kinds["membership"] += 1
        elif isinstance(payload, HubKeyPayload):
            if key_id != hub_key.key_id or payload.previous != hub_key or not envelope.verify(hub_key):
                raise AuditError(f"{where}: hub key rotation not signed by the hub key {hub_key.key_id}")
            hub_key = payload.key
            audit.kinds["rotation"] = audit.kinds.get("rotation", 0) + 1
        else:
            _check_member_entry(where, envelope, payload, keys.get(key_id))
            _apply_member_entry(audit, payload)
        leaf = merkle.leaf_hash(envelope.canonical())
        audit.leaves.append(leaf)
        audit.tree.append(leaf)
    return audit


def _check_member_entry(
    where: str,
    envelope: Envelope,
    payload: BatchPayload | OpinionPayload,
    key: tuple[VerifierKey, frozenset[str]] | None,
) -> None:
    if key is None:
        raise AuditError(f"{where}: {envelope.signer_key_id} is not a granted, unrevoked key at this point")
    verifier, rights = key
    if not envelope.verify(verifier):
        raise AuditError(f"{where}: the signature by {verifier.key_id} does not verify")
    needed = "write" if isinstance(payload, BatchPayload) else "read"
    if needed not in rights or payload.member != verifier.name:
        raise AuditError(f"{where}: {verifier.key_id} may not do this for member {payload.member}")


def _apply_member_entry(audit: LogAudit, payload: BatchPayload | OpinionPayload) -> None:
    if isinstance(payload, OpinionPayload):
        audit.kinds["opinion"] += 1
        return
    audit.kinds["batch"] += 1
    for addition in payload.add:
        audit.listed.setdefault((addition.signal, addition.hash), set()).add(payload.member)
    for removal in payload.remove:
        listers = audit.listed.get((removal.signal, removal.hash), set())
        listers.discard(payload.member)
        if not listers:
            audit.listed.pop((removal.signal, removal.hash), None)


# ---- PhotoDNA and video samples ----------------------------------------------

PHOTODNA_SEED = 144
VIDEO_SEED = 2024
VIDEO_FRAMES = 40


def photodna_samples(count: int = 3, seed: int = PHOTODNA_SEED) -> list[bytes]:
    """Made-up PhotoDNA hashes: 144 random bytes each. Real PhotoDNA hashing is licensed, so the
    demo generates vectors of the right shape rather than hashing images."""
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 144, dtype=np.uint8)) for _ in range(count)]


def edited(vector: bytes, changes: int, by: int, seed: int = 7) -> bytes:
    """``vector`` with ``changes`` of its bytes moved by ``by`` (as a re-encode or a crop would)."""
    rng = np.random.default_rng(seed)
    out = bytearray(vector)
    for position in rng.choice(144, changes, replace=False):
        out[position] = min(255, out[position] + by) if out[position] < 128 else out[position] - by
    return bytes(out)


def video_frames(count: int = VIDEO_FRAMES, seed: int = VIDEO_SEED) -> list[str]:
    """PDQ hashes of a made-up video's frames, one per second."""
    rng = np.random.default_rng(seed)
    return [bytes(rng.integers(0, 256, 32, dtype=np.uint8)).hex() for _ in range(count)]
