"""DSSE envelopes (design §5): PAE, the envelope, its signature and canonical form.

An envelope carries one payload, signed over its DSSE pre-authentication
encoding. ``Envelope.parse`` checks the envelope's shape strictly; the payload
inside is parsed by ``parse_payload`` (:mod:`federation.payloads`). The strict
JSON reader and writer and ``EnvelopeError`` come from
:mod:`federation.strictjson`. Both modules' public names are re-exported here,
so ``from federation.envelope import ...`` works for all of them.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from .keys import KEY_ID_PATTERN, SignerKey, VerifierKey
from .payloads import (
    BATCH_TYPE,
    HUB_KEY_TYPE,
    HUB_PAYLOAD_TYPES,
    MAX_SEQ,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    PAYLOAD_TYPES,
    RIGHTS,
    VERDICTS,
    Addition,
    BatchPayload,
    Grant,
    Header,
    HubKeyPayload,
    Limits,
    MembershipPayload,
    OpinionItem,
    OpinionPayload,
    Payload,
    Removal,
    batch_payload,
    hub_key_payload,
    membership_payload,
    opinion_payload,
    parse_payload,
    utc_now,
)
from .strictjson import EnvelopeError, compact_json, exact_keys, strict_json

__all__ = [
    "BATCH_TYPE",
    "HUB_KEY_TYPE",
    "HUB_PAYLOAD_TYPES",
    "MAX_SEQ",
    "MEMBERSHIP_TYPE",
    "OPINION_TYPE",
    "PAYLOAD_TYPES",
    "RIGHTS",
    "VERDICTS",
    "Addition",
    "BatchPayload",
    "Envelope",
    "EnvelopeError",
    "Grant",
    "Header",
    "HubKeyPayload",
    "Limits",
    "MembershipPayload",
    "OpinionItem",
    "OpinionPayload",
    "Payload",
    "Removal",
    "Signature",
    "batch_payload",
    "compact_json",
    "hub_key_payload",
    "membership_payload",
    "opinion_payload",
    "pae",
    "parse_payload",
    "sign_envelope",
    "strict_json",
    "utc_now",
]


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what the signature covers."""
    encoded_type = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(encoded_type), encoded_type, len(payload), payload)


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    @property
    def signer_key_id(self) -> str:
        return self.signatures[0].keyid

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode()} for s in self.signatures
            ],
        }

    def canonical(self) -> bytes:
        """The log's leaf data: fixed key order, no whitespace (design §6)."""
        return compact_json(self.to_json())

    def verify(self, key: VerifierKey) -> bool:
        message = pae(self.payload_type, self.payload)
        return any(s.keyid == key.key_id and key.verify(message, s.sig) for s in self.signatures)

    @classmethod
    def parse(cls, data: bytes | str) -> Envelope:
        return cls.from_json(strict_json(data, "envelope"))

    @classmethod
    def from_json(cls, obj: Any) -> Envelope:
        exact_keys(obj, "envelope", required=("payload", "payloadType", "signatures"))
        payload = _base64(obj["payload"], "envelope payload")
        payload_type = obj["payloadType"]
        if not isinstance(payload_type, str):
            raise EnvelopeError("envelope payloadType must be a string")
        if payload_type not in PAYLOAD_TYPES:
            raise EnvelopeError(
                f"unknown payload type {payload_type!r}: expected one of {', '.join(PAYLOAD_TYPES)}"
            )
        signatures = obj["signatures"]
        if not isinstance(signatures, list) or len(signatures) != 1:
            raise EnvelopeError("envelope must carry exactly one signature")
        parsed = []
        for position, sig in enumerate(signatures):
            where = f"envelope signatures[{position}]"
            exact_keys(sig, where, required=("keyid", "sig"))
            keyid = sig["keyid"]
            if not isinstance(keyid, str) or not KEY_ID_PATTERN.fullmatch(keyid):
                raise EnvelopeError(f"{where}.keyid must be a key id <name>+<8 hex digits>")
            raw = _base64(sig["sig"], f"{where}.sig")
            if len(raw) != 64:
                raise EnvelopeError(f"{where}.sig must be a 64-byte Ed25519 signature")
            parsed.append(Signature(keyid, raw))
        return cls(payload, payload_type, tuple(parsed))


def sign_envelope(signer: SignerKey, payload_type: str, payload: bytes) -> Envelope:
    signature = signer.sign(pae(payload_type, payload))
    return Envelope(payload, payload_type, (Signature(signer.key_id, signature),))


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise EnvelopeError(f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"{where} is not valid standard base64 with padding") from exc
