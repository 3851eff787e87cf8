"""Who is calling: RFC 9421 request signatures checked against the log's keys."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from aiohttp import web

from ..httpsig import SignatureRefused, VerifiedRequest, check_body_digest, verify_request
from ..keys import VerifierKey
from ..node import Node
from ..state import KeyRecord
from .limits import Guard
from .problems import Problem


@dataclass(frozen=True)
class Caller:
    key_id: str
    is_hub: bool
    memberships: dict[str, KeyRecord] = field(default_factory=dict)
    """Active key records of the caller's key, by collection."""
    verified: VerifiedRequest | None = None
    """The verified signature, kept to check a body read after authentication."""

    def may(self, collection: str, right: str) -> bool:
        record = self.memberships.get(collection)
        return self.is_hub or (record is not None and right in record.rights)

    def is_member(self, collection: str) -> bool:
        return self.is_hub or collection in self.memberships

    def require(self, collection: str, right: str) -> None:
        if not self.may(collection, right):
            raise Problem(
                403,
                "missing-right",
                f"key {self.key_id} lacks the {right!r} right on collection {collection}",
            )


@dataclass(frozen=True)
class SignedRequest:
    """What a request's signature covers, taken on the event loop for a worker thread to verify."""

    method: str
    path: str
    """The raw path, without the query."""
    query: str
    """The raw query string, without its ``?``."""
    headers: Mapping[str, str]
    early: Caller | None = None
    """The caller, when the request was authenticated from its headers before its body was read."""

    @classmethod
    def of(cls, request: web.Request) -> SignedRequest:
        return cls(
            request.method,
            request.raw_path.split("?", 1)[0],
            request.rel_url.raw_query_string,
            request.headers,
            request.get(CALLER),
        )


def authenticate(
    node: Node,
    guard: Guard,
    signed: SignedRequest,
    body: bytes | None,
    *,
    has_body: bool | None = None,
) -> Caller:
    """Verify the request signature (synchronously; call from a worker thread).

    ``guard`` then refuses a replay (401) and a key over its rate limit (429).
    With ``body=None`` only what the headers decide is checked (the body is
    not read yet; ``has_body`` says whether one follows). A request already
    authenticated that way (``signed.early``) has only its body checked
    against the signed Content-Digest.
    """
    if signed.early is not None:
        if body is not None:
            _check_body(signed.early, body)
        return signed.early
    now = int(time.time())
    caller = _verified_caller(node, signed, body, now, has_body)
    assert caller.verified is not None
    refusal = guard.admit_many([caller.verified], now)[0]
    if refusal is not None:
        raise _as_problem(refusal)
    return caller


def authenticate_many(
    node: Node, guard: Guard, requests: Sequence[tuple[SignedRequest, bytes]]
) -> list[Caller | Problem]:
    """:func:`authenticate` for several requests with their bodies: each one's caller or refusal, in order.

    Each key's records are read once for the batch, and the guard admits
    them all at once: with several workers one transaction on their shared
    state, with PostgreSQL replicas one statement, instead of one per request.
    """
    now = int(time.time())
    known: dict[str, list[tuple[str, KeyRecord]]] = {}

    def read_records(key_id: str) -> list[tuple[str, KeyRecord]]:
        # Read once per key for the batch: one query to a PostgreSQL store per key, not per request.
        if key_id not in known:
            known[key_id] = node.store.key_memberships(key_id)
        return known[key_id]

    outcomes: list[Caller | Problem] = []
    to_admit: list[tuple[int, VerifiedRequest]] = []  # (position, its verified signature)
    for signed, body in requests:
        try:
            if signed.early is not None:
                outcomes.append(authenticate(node, guard, signed, body))
                continue
            caller = _verified_caller(node, signed, body, now, None, read_records)
        except Problem as refusal:
            outcomes.append(refusal)
            continue
        assert caller.verified is not None
        to_admit.append((len(outcomes), caller.verified))
        outcomes.append(caller)
    refusals = guard.admit_many([verified for _, verified in to_admit], now)
    for (position, _), refused in zip(to_admit, refusals, strict=True):
        if refused is not None:
            outcomes[position] = _as_problem(refused)
    return outcomes


def _verified_caller(
    node: Node,
    signed: SignedRequest,
    body: bytes | None,
    now: int,
    has_body: bool | None,
    read_records: Callable[[str], list[tuple[str, KeyRecord]]] | None = None,
) -> Caller:
    """The caller whose key verifies the request's signature, with its memberships (the guard not asked).

    ``read_records`` reads a key id's records (by default from the store).
    """
    records: list[tuple[str, KeyRecord]] = []
    read_memberships = read_records or node.store.key_memberships

    def resolve(key_id: str) -> list[VerifierKey]:
        # A key id names a key by a 32-bit hash, so several keys may share one
        # (granted here, or in a log mirrored from a peer): every one is tried,
        # and only the records of the key that verifies give rights.
        records.extend(read_memberships(key_id))
        keys = list(dict.fromkeys(record.key for _, record in records))
        return [node.hub_key, *keys] if key_id == node.hub_key.key_id else keys

    try:
        verified = verify_request(
            method=signed.method,
            path=signed.path,
            query=signed.query,
            headers=signed.headers,
            body=body,
            resolve_key=resolve,
            now=now,
            has_body=has_body,
        )
        own = [(collection, record) for collection, record in records if record.key == verified.key]
        memberships = {collection: record for collection, record in own if record.active}
        if own and not memberships and verified.key != node.hub_key:
            # Said only now that the signature has verified with that very key, so
            # a caller without it learns nothing about the key's history.
            collection, record = own[0]
            raise SignatureRefused(
                f"key {verified.key_id} was revoked at log index {record.revoked_index} "
                f"of collection {collection}; sign with a current key"
            )
    except SignatureRefused as exc:
        raise _refused(exc) from exc
    return Caller(verified.key_id, verified.key == node.hub_key, memberships, verified)


def _as_problem(refusal: Exception) -> Problem:
    """A guard's refusal as the problem answered: a replay is a refused signature (401)."""
    if isinstance(refusal, SignatureRefused):
        return _refused(refusal)
    if isinstance(refusal, Problem):  # RateLimited: answered 429 by the rate-limit middleware
        return refusal
    raise refusal


def _check_body(caller: Caller, body: bytes) -> None:
    if caller.verified is None:
        return
    try:
        check_body_digest(caller.verified, body)
    except SignatureRefused as exc:
        raise _refused(exc) from exc


def _refused(exc: SignatureRefused) -> Problem:
    digest = exc.status == 400 and "digest" in exc.detail
    return Problem(exc.status, "content-digest-mismatch" if digest else "bad-request-signature", exc.detail)


CALLER = web.RequestKey("caller", Caller)
"""The caller of a request authenticated from its headers, before its body was read."""
