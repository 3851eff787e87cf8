"""A member's client for a hashfed hub (aiohttp), used by the CLI and usable on its own.

    async with HubClient("http://127.0.0.1:8080", SignerKey.parse(...)) as hub:
        info = await hub.info()
        await hub.submit(collection, additions=[Addition("pdq", h, ("csam",))])
        answer = await hub.lookup([("pdq", h)])

Every request except the public ones is signed (RFC 9421). Submissions are
idempotent under retry: an envelope is signed once and re-sent as is, and the
hub answers a repeat with the original log index.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
from yarl import URL

from .envelope import (
    BATCH_TYPE,
    OPINION_TYPE,
    Addition,
    Envelope,
    Header,
    OpinionItem,
    Removal,
    batch_payload,
    opinion_payload,
    sign_envelope,
    utc_now,
)
from .httpsig import sign_request
from .keys import SignerKey
from .tls import ClientTls

RETRY_STATUSES = frozenset({429, 502, 503, 504})

# What one answer may hold: a hub (or anything on the path) that sends more is
# not read further. Bodies are never decompressed (``Accept-Encoding: identity``;
# an answer in another coding is refused), so these bound the bytes held.
MAX_NOTE_BYTES = 64 * 1024
"""A signed checkpoint is a few hundred bytes."""
MAX_PROBLEM_BYTES = 64 * 1024
MAX_JSON_BYTES = 16 * 1024 * 1024
"""Hub information, proofs, submissions' answers, entries pages of small entries, sources, peers."""
MAX_LOOKUP_BYTES = 512 * 1024 * 1024
"""A lookup answer: at most the hub's ``max_matches_per_answer`` matches (100,000 by default)."""
MAX_ENTRY_BYTES = 128 * 1024 * 1024
"""One NDJSON entry line: an envelope from a 64 MiB request body, base64 encoded, with framing."""
MAX_SPAN_BYTES = 512 * 1024 * 1024
"""One span of entries read whole (``entry_lines``); a span of one entry may always take MAX_ENTRY_BYTES."""


class HubError(Exception):
    """The hub refused a request (an RFC 9457 problem) or could not be reached."""

    def __init__(self, status: int, detail: str, kind: str = "") -> None:
        super().__init__(f"{status}: {detail}" if status else detail)
        self.status = status
        self.detail = detail
        self.kind = kind


class AnswerRefused(HubError, ValueError):
    """An answer this client will not read: too large, or in a content coding it did not ask for."""

    def __init__(self, detail: str) -> None:
        super().__init__(0, detail, "answer-refused")


async def read_limited(response: aiohttp.ClientResponse, limit: int, what: str) -> bytes:
    """The whole body of ``response``, or :class:`AnswerRefused` once it would pass ``limit`` bytes."""
    _check_coding(response, what)
    declared = response.content_length
    if declared is not None and declared > limit:
        raise AnswerRefused(
            f"{what}: the answer declares {declared} bytes, over this client's limit of {limit}"
        )
    parts: list[bytes] = []
    held = 0
    async for chunk in response.content.iter_any():
        held += len(chunk)
        if held > limit:
            raise AnswerRefused(
                f"{what}: the answer passed this client's limit of {limit} bytes; not read further"
            )
        parts.append(chunk)
    return b"".join(parts)


def _check_coding(response: aiohttp.ClientResponse, what: str) -> None:
    coding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if coding not in ("", "identity"):
        raise AnswerRefused(
            f"{what}: the answer is in the {coding!r} content coding; this client asks for identity and "
            "does not inflate answers (something between it and the hub re-encoded the answer)"
        )


def new_client_session(
    timeout: aiohttp.ClientTimeout, tls: ClientTls | None = None, **kwargs: Any
) -> aiohttp.ClientSession:
    """A session that never decompresses answers (:func:`read_limited` bounds the bytes as sent),
    verifying ``https://`` hubs against the system's CAs or ``tls.ca``."""
    context = tls.context() if tls is not None else None
    if context is not None:
        kwargs["connector"] = aiohttp.TCPConnector(ssl=context)
    return aiohttp.ClientSession(timeout=timeout, auto_decompress=False, **kwargs)


@dataclass(frozen=True)
class Submitted:
    index: int
    leaf_hash: bytes
    created: bool


_STALE_SEQ = re.compile(r"is not greater than (\d+), the last seq accepted")


def _last_accepted_seq(exc: HubError) -> int | None:
    """The last seq a ``stale-seq`` refusal says the hub accepted from this key, or None."""
    match = _STALE_SEQ.search(exc.detail) if exc.kind.rpartition(":")[2] == "stale-seq" else None
    return int(match.group(1)) if match else None


def next_seq() -> int:
    """A fresh seq: microseconds since the epoch, so a member needs no local counter."""
    return time.time_ns() // 1000


class HubClient:
    def __init__(
        self,
        base_url: str,
        signer: SignerKey | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        retries: int = 4,
        timeout: float = 120.0,
        tls: ClientTls | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self._base_path = urlsplit(self.base_url).path
        self._own_session = session is None
        self._session = session or new_client_session(aiohttp.ClientTimeout(total=timeout), tls)
        self.retries = retries
        self._info: dict[str, Any] | None = None
        self._last_seq = 0

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    async def __aenter__(self) -> HubClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._own_session:
            await self._session.close()

    # ---- transport ------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, int | str] | None = None,
        body: bytes | None = None,
        signed: bool = True,
        accept: str = "application/json",
    ) -> aiohttp.ClientResponse:
        query = urlencode(params or {})
        url = f"{self.base_url}{path}" + (f"?{query}" if query else "")
        for attempt in range(self.retries + 1):
            headers = {"Accept": accept, "Accept-Encoding": "identity"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            if signed:
                if self.signer is None:
                    raise HubError(0, "this request must be signed: give the client a signer key")
                headers.update(sign_request(self.signer, method, self._base_path + path, query, body))
            try:
                response = await self._session.request(
                    method, URL(url, encoded=True), data=body, headers=headers
                )
            except aiohttp.ClientConnectorCertificateError as exc:  # retrying cannot help
                raise HubError(
                    0,
                    f"the TLS certificate of {self.base_url} did not verify ({exc.certificate_error}); "
                    "for a hub with a private certificate authority, give its CA file with --ca",
                ) from exc
            except (TimeoutError, aiohttp.ClientConnectionError) as exc:
                if attempt == self.retries:
                    reason = str(exc) or ("timeout" if isinstance(exc, TimeoutError) else type(exc).__name__)
                    raise HubError(0, f"cannot reach the hub at {self.base_url}: {reason}") from exc
            else:
                if response.status < 400:
                    return response
                if response.status not in RETRY_STATUSES or attempt == self.retries:
                    raise await _problem(response)
                retry_after = response.headers.get("Retry-After", "")
                response.release()
                if retry_after.isdigit():
                    await asyncio.sleep(min(int(retry_after), 30))
                    continue
            await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
        raise HubError(0, "unreachable")  # the loop always returns or raises

    async def _json(self, method: str, path: str, *, limit: int = MAX_JSON_BYTES, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        async with response:
            return json.loads(await read_limited(response, limit, f"{method} {path}"))

    # ---- public endpoints -----------------------------------------------

    async def info(self) -> dict[str, Any]:
        if self._info is None:
            self._info = await self._json("GET", "/v1/hub", signed=False)
        return self._info

    async def ready(self) -> bool:
        try:
            await self._json(
                "GET",
                "/v1/ready",
                signed=False,
            )
        except HubError:
            return False
        return True

    async def checkpoint(self, collection: str) -> str:
        path = f"/v1/collections/{collection}/checkpoint"
        response = await self._request("GET", path, signed=False)
        async with response:
            return (await read_limited(response, MAX_NOTE_BYTES, f"GET {path}")).decode("utf-8")

    # ---- member endpoints -----------------------------------------------

    async def post_envelope(self, collection: str, envelope: Envelope) -> Submitted:
        body = envelope.canonical()
        response = await self._request("POST", f"/v1/collections/{collection}/entries", body=body)
        async with response:
            answer = json.loads(await read_limited(response, MAX_JSON_BYTES, "POST entries"))
            return Submitted(answer["index"], base64.b64decode(answer["leaf_hash"]), response.status == 201)

    async def _header(self, collection: str) -> Header:
        info = await self.info()
        self._last_seq = max(next_seq(), self._last_seq + 1)
        return Header(info["federation"], collection, self._last_seq, utc_now())

    def _member(self) -> SignerKey:
        if self.signer is None:
            raise HubError(0, "submitting needs a signer key")
        return self.signer

    async def submit(
        self,
        collection: str,
        additions: Sequence[Addition] = (),
        removals: Sequence[Removal] = (),
    ) -> Submitted:
        """Sign one batch and post it (retries re-send the same envelope)."""
        name = self._member().name
        return await self._sign_and_post(
            collection,
            BATCH_TYPE,
            lambda header: batch_payload(header, name, tuple(additions), tuple(removals)),
        )

    async def give_opinions(self, collection: str, opinions: Sequence[OpinionItem]) -> Submitted:
        name = self._member().name
        return await self._sign_and_post(
            collection, OPINION_TYPE, lambda header: opinion_payload(header, name, tuple(opinions))
        )

    async def _sign_and_post(
        self, collection: str, payload_type: str, payload: Callable[[Header], bytes]
    ) -> Submitted:
        """Sign a payload under a fresh header and post it; once more above the hub's seq if it was stale.

        Seqs come from the clock. A clock that ran ahead and was set back
        gives seqs below ones the hub already accepted from this key; the hub
        refuses them (``stale-seq``) naming the last accepted seq, and the
        envelope is signed again above it. The refused envelope was not
        appended, so re-signing cannot submit anything twice.
        """
        signer = self._member()
        for attempt in (1, 2):
            envelope = sign_envelope(signer, payload_type, payload(await self._header(collection)))
            try:
                return await self.post_envelope(collection, envelope)
            except HubError as exc:
                accepted = _last_accepted_seq(exc)
                if accepted is None or attempt == 2:
                    raise
                self._last_seq = max(self._last_seq, accepted)
        raise AssertionError("unreachable")

    async def lookup(
        self,
        queries: Sequence[tuple[str, str] | Mapping[str, Any]],
        *,
        max_distance: int | None = None,
        collections: Sequence[str] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """Matches per query, in order (each a dict as in the wire format).

        A query is ``(type, hash)`` or a query object as the wire has it (a
        vpdq query with its ``frames``, a query with its own ``max_distance``).
        """
        request: dict[str, Any] = {
            "queries": [
                dict(query) if isinstance(query, Mapping) else {"type": query[0], "hash": query[1]}
                for query in queries
            ]
        }
        if max_distance is not None:
            request["max_distance"] = max_distance
        if collections is not None:
            request["collections"] = list(collections)
        body = json.dumps(request, separators=(",", ":")).encode()
        answer = await self._json("POST", "/v1/lookup", body=body, limit=MAX_LOOKUP_BYTES)
        return [result["matches"] for result in answer["results"]]

    async def entries(
        self, collection: str, start: int = 0, limit: int = 1000
    ) -> tuple[list[tuple[int, Envelope]], int]:
        answer = await self._json(
            "GET", f"/v1/collections/{collection}/entries", params={"start": start, "limit": limit}
        )
        return [(e["index"], Envelope.from_json(e["envelope"])) for e in answer["entries"]], answer["next"]

    async def stream_entries(self, collection: str, start: int = 0) -> AsyncIterator[tuple[int, Envelope]]:
        """Every entry from ``start`` to the end of the log, as one NDJSON stream."""
        response = await self._request(
            "GET",
            f"/v1/collections/{collection}/entries",
            params={"start": start},
            accept="application/x-ndjson",
        )
        async with response:
            _check_coding(response, "GET entries")
            # Split by hand: one entry may be a line of many megabytes, longer
            # than aiohttp's line reader accepts.
            partial: list[bytes] = []
            held = 0
            async for chunk in response.content.iter_any():
                *complete, rest = chunk.split(b"\n")
                if complete:
                    complete[0] = b"".join([*partial, complete[0]])
                    partial, held = [], 0
                    for line in complete:
                        if len(line) > MAX_ENTRY_BYTES:
                            raise AnswerRefused(f"an entry line passed {MAX_ENTRY_BYTES} bytes")
                        if line.strip():
                            yield _entry(line)
                partial.append(rest)
                held += len(rest)
                if held > MAX_ENTRY_BYTES:
                    raise AnswerRefused(f"an entry line passed {MAX_ENTRY_BYTES} bytes; not read further")
            last = b"".join(partial)
            if last.strip():
                yield _entry(last)

    async def entry_lines(
        self, collection: str, start: int, limit: int, max_bytes: int | None = None
    ) -> bytes:
        """Entries ``start`` to ``start + limit - 1`` as the raw NDJSON body, read whole.

        Unlike :meth:`stream_entries` this takes lines of any length (one
        entry may hold 100,000 hashes) and leaves parsing to the caller, so a
        mirror can parse and verify in a worker thread.
        """
        response = await self._request(
            "GET",
            f"/v1/collections/{collection}/entries",
            params={"start": start, "limit": limit},
            accept="application/x-ndjson",
        )
        if max_bytes is None:
            max_bytes = max(MAX_ENTRY_BYTES, min(limit * MAX_ENTRY_BYTES, MAX_SPAN_BYTES))
        async with response:
            return await read_limited(response, max_bytes, f"entries {start}..{start + limit - 1}")

    async def sources(self) -> list[dict[str, Any]]:
        """The collections this hub mirrors, with the latest checkpoint it verified of each."""
        answer = await self._json("GET", "/v1/sources", signed=False)
        return list(answer["sources"])

    async def peers(self) -> list[dict[str, Any]]:
        """This hub's peers and the state of each mirrored collection."""
        answer = await self._json("GET", "/v1/peers", signed=False)
        return list(answer["peers"])

    async def inclusion_proof(self, collection: str, index: int, size: int) -> list[bytes]:
        answer = await self._json(
            "GET",
            f"/v1/collections/{collection}/proof/inclusion",
            params={"index": index, "size": size},
        )
        return [base64.b64decode(h) for h in answer["hashes"]]

    async def consistency_proof(self, collection: str, old: int, new: int) -> list[bytes]:
        answer = await self._json(
            "GET",
            f"/v1/collections/{collection}/proof/consistency",
            params={"old": old, "new": new},
        )
        return [base64.b64decode(h) for h in answer["hashes"]]


async def _problem(response: aiohttp.ClientResponse) -> HubError:
    async with response:
        text = (await response.content.read(MAX_PROBLEM_BYTES)).decode("utf-8", "replace")
    try:
        problem = json.loads(text)
        return HubError(response.status, str(problem.get("detail", text)), str(problem.get("type", "")))
    except (ValueError, AttributeError):
        return HubError(response.status, text[:500] or response.reason or "error")


def _entry(line: bytes) -> tuple[int, Envelope]:
    item = json.loads(line)
    return item["index"], Envelope.from_json(item["envelope"])
