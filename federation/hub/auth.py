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
    records: list[tuple[str, KeyRecord]] = []

    def resolve(key_id: str) -> VerifierKey | None:
        if key_id == node.hub_key.key_id:
            return node.hub_key
        records.extend(node.store.key_memberships(key_id))
        keys = {record.key for _, record in records}
        if len(keys) > 1:
            # A key id names a key by a 32-bit hash: two different keys granted
            # under one id (in different collections) must not lend each other rights.
            raise SignatureRefused(f"key id {key_id} names more than one key on this hub; use another key")
        return next(iter(keys)) if keys else None

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
        memberships = {collection: record for collection, record in records if record.active}
        if records and not memberships:
            # Said only now that the signature has verified with that very key, so
            # a caller without it learns nothing about the key's history.
            collection, record = records[0]
            raise SignatureRefused(
                f"key {verified.key_id} was revoked at log index {record.revoked_index} "
                f"of collection {collection}; sign with a current key"
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
