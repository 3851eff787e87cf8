"""The hub keys a node holds, and which of them signs each of its own collections now.

A hub key can be rotated in the log (docs/protocol.md, "Hub key rotation"):
each collection's log starts with the key that signed its first entry and is
handed on by every rotation entry since. The hub keeps every key it had
(``hub.key`` and ``retired/``), so entries signed by an earlier key still
verify on replay, and during a rotation's overlap it signs checkpoints with
both the key in force and the one before it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from .envelope import Envelope
from .keys import SignerKey, VerifierKey
from .store.base import HubStore


class HubKeyring:
    def __init__(self, store: HubStore, hub_key: VerifierKey, signers: Iterable[SignerKey]) -> None:
        self._store = store
        self.hub_key = hub_key
        """The current hub key (``hub.key``): a new collection starts with it."""
        self._signers = {signer.key_id: signer for signer in signers}
        self._first: dict[str, VerifierKey] = {}

    def add(self, signer: SignerKey) -> None:
        """Hold one more key (the new key of a rotation under way)."""
        self._signers[signer.key_id] = signer

    def holds(self, key_id: str) -> bool:
        return key_id in self._signers

    def verifiers(self) -> list[VerifierKey]:
        """Every key held, and the current one: the keys this hub signs or signed with."""
        keys = {self.hub_key.key_id: self.hub_key}
        keys.update((key_id, signer.verifier) for key_id, signer in self._signers.items())
        return list(keys.values())

    def first_key(self, collection: str) -> VerifierKey:
        """The hub key an own collection's log started with: the signer of its first entry."""
        known = self._first.get(collection)
        if known is not None:
            return known
        first = self._store.entries(collection, 0, 1)
        if not first:
            return self.hub_key  # a new collection: its first entry is about to be signed
        signer = self._signers.get(Envelope.parse(first[0].data).signer_key_id)
        key = signer.verifier if signer is not None else self.hub_key
        self._first[collection] = key
        return key

    def in_force(self, collection: str) -> VerifierKey:
        """The key that signs an own collection's membership entries, rotations and checkpoints now."""
        rotations = self._store.hub_keys(collection)
        return rotations[-1].key if rotations else self.first_key(collection)

    def signer(self, collection: str) -> SignerKey:
        in_force = self.in_force(collection)
        signer = self._signers.get(in_force.key_id)
        if signer is None:
            raise RuntimeError(
                f"collection {collection} is signed by hub key {in_force.key_id}, which this hub does not "
                "hold: put the key file in hub.key or retired/"
            )
        return signer

    def checkpoint_signers(self, collection: str) -> list[SignerKey]:
        """The key in force, and during a rotation's overlap the key before it as well."""
        signers = [self.signer(collection)]
        rotations = self._store.hub_keys(collection)
        if rotations and rotations[-1].previous_until > time.time():
            previous = self._signers.get(rotations[-1].previous.key_id)
            if previous is not None:
                signers.append(previous)
        return signers
