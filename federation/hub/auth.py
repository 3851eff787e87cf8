"""Who is calling: RFC 9421 request signatures checked against the log's keys."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from aiohttp import web

from ..httpsig import SignatureRefused, verify_request
from ..keys import VerifierKey
from ..node import Node
from ..state import KeyRecord
from .limits import RequestGuard
from .problems import Problem


@dataclass(frozen=True)
class Caller:
    key_id: str
    is_hub: bool
    memberships: dict[str, KeyRecord] = field(default_factory=dict)
    """Active key records of the caller's key, by collection."""

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


def authenticate(
    node: Node, guard: RequestGuard, method: str, path: str, query: str, headers: object, body: bytes
) -> Caller:
    """Verify the request signature (synchronously; call from a worker thread).

    ``guard`` then refuses a replay (401) and a key over its rate limit (429).
    """
    memberships: dict[str, KeyRecord] = {}

    def resolve(key_id: str) -> VerifierKey | None:
        if key_id == node.hub_key.key_id:
            return node.hub_key
        records = node.store.key_memberships(key_id)
        for collection, record in records:
            if record.active:
                memberships[collection] = record
        if memberships:
            return next(iter(memberships.values())).key
        if records:
            collection, record = records[0]
            raise SignatureRefused(
                f"key {key_id} was revoked at log index {record.revoked_index} of collection {collection}; "
                "sign with a current key"
            )
        return None

    now = int(time.time())
    try:
        verified = verify_request(
            method=method,
            path=path,
            query=query,
            headers=headers,  # type: ignore[arg-type]
            body=body,
            resolve_key=resolve,
            now=now,
        )
        guard.admit(verified, now)
    except SignatureRefused as exc:
        digest = exc.status == 400 and "digest" in exc.detail
        raise Problem(
            exc.status, "content-digest-mismatch" if digest else "bad-request-signature", exc.detail
        ) from exc
    return Caller(verified.key_id, verified.key_id == node.hub_key.key_id, memberships)


def raw_query(request: web.Request) -> str:
    return request.rel_url.raw_query_string
