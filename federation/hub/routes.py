"""HTTP API v1 handlers (design §7). Each parses, authenticates, then calls the node."""

from __future__ import annotations

import base64
import json
import logging
import re
from typing import Any

from aiohttp import web

from .. import __version__
from ..checkpoint_record import HistoryMismatch
from ..envelope import Envelope, EnvelopeError, strict_json
from ..merkle import ProofError
from ..node import Accepted, NoCheckpointYet, NotYetSearchable, Prepared, UnknownCollection
from ..signals import (
    SIGNAL_TYPES,
    DistanceError,
    LookupDefaults,
    Query,
    QueryShapeError,
    SignalError,
    parse_query,
)
from ..signals.pdq import MAX_DISTANCE_LIMIT as REQUEST_MAX_DISTANCE_LIMIT
from ..state import Refusal
from ..store.base import SourceRecord
from ..sync.wire import match_json, source_json
from .app import RUNTIME, HubRuntime
from .auth import Caller, SignedRequest, authenticate, authenticate_many
from .batching import Answer, RequestBatches
from .logs import CALLER_KEY_ID, entry_counts
from .metrics import metrics_endpoint
from .problems import Problem

log = logging.getLogger("hashfed.hub")

ENTRIES_PAGE_CAP = 1000
_DECIMAL = re.compile(r"[0-9]{1,18}")
NDJSON = "application/x-ndjson"


def _runtime(request: web.Request) -> HubRuntime:
    return request.app[RUNTIME]


async def _caller(request: web.Request, body: bytes = b"") -> Caller:
    runtime = _runtime(request)
    signed = SignedRequest.of(request)
    caller = await runtime.read(lambda: authenticate(runtime.node, runtime.guard, signed, body))
    request[CALLER_KEY_ID] = caller.key_id
    return caller


async def _collection(request: web.Request) -> str:
    runtime = _runtime(request)
    collection = request.match_info["collection"]
    try:
        await runtime.read(lambda: runtime.node.require_collection(collection))
    except UnknownCollection as exc:
        raise Problem(404, "unknown-collection", str(exc)) from exc
    return collection


async def _require_read(request: web.Request, caller: Caller, collection: str) -> None:
    """Read right on a collection; a mirrored one is readable by whoever may read an own collection.

    A peering hub shares what it mirrors with its own members (they look it
    up with the hub's own collections); members of the origin log, whose keys
    the mirrored membership entries hold, may read it too.
    """
    if caller.may(collection, "read"):
        return
    runtime = _runtime(request)
    node = runtime.node
    sources = await runtime.read(node.sources)
    if collection in sources:
        own = await runtime.read(node.own_collections)
        if any(caller.may(c, "read") for c in own):
            return
    caller.require(collection, "read")


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    text = request.query.get(name)
    if text is None:
        if default is None:
            raise Problem(400, "invalid-query", f"query parameter {name} is required")
        return default
    if not _DECIMAL.fullmatch(text):
        raise Problem(
            400,
            "invalid-query",
            f"query parameter {name} must be a non-negative integer, got {text!r}",
        )
    return int(text)


def _json_body(body: bytes, what: str) -> Any:
    try:
        return strict_json(body, what)
    except EnvelopeError as exc:
        raise Problem(400, "malformed-json", str(exc)) from exc


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    if not runtime.ready:
        raise Problem(503, "not-ready", "the hub is still loading its indexes; retry shortly")
    store = runtime.node.store
    # Only a database server can become unreachable; asking it takes a reader thread.
    reason = await runtime.read(store.unavailable) if store.shared else store.unavailable()
    if reason is not None:
        raise Problem(503, "not-ready", f"the hub cannot use its storage: {reason}; retry shortly")
    return web.json_response({"status": "ready"})


async def hub_info(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    node = runtime.node
    collections = await runtime.read(node.own_collections)
    return web.json_response(
        {
            "name": node.name,
            "key": node.hub_key.encode(),
            "federation": node.federation,
            "collections": collections,
            "signal_types": list(SIGNAL_TYPES),
            "version": __version__,
            "defaults": {
                name: value
                for name, signal in SIGNAL_TYPES.items()
                if (value := signal.default_json(runtime.config.lookup_defaults)) is not None
            },
            "limits": {
                "max_matches_per_query": runtime.config.max_matches_per_query,
                "max_matches_per_answer": runtime.config.max_matches_per_answer,
            },
        }
    )


async def post_entry(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body = await request.read()
    collection = await _collection(request)
    caller = await _caller(request, body)
    if not caller.is_member(collection):
        raise Problem(403, "not-a-member", f"key {caller.key_id} is not a member of collection {collection}")
    try:
        envelope = await runtime.read(lambda: Envelope.parse(body))
    except EnvelopeError as exc:
        kind = "unknown-payload-type" if "unknown payload type" in str(exc) else "invalid-envelope"
        raise Problem(400, kind, str(exc)) from exc
    node = runtime.node
    try:
        # Signature, signer and payload are checked by the readers; the one
        # writer thread only appends what already passed (and checks again).
        prepared = await runtime.read(lambda: node.prepare(collection, envelope))
        accepted = (
            prepared
            if isinstance(prepared, Accepted)
            else await runtime.write(lambda: node.append(collection, prepared))
        )
    except Refusal as exc:
        raise Problem(exc.status, exc.kind, exc.detail) from exc
    except NotYetSearchable as exc:
        log.error("%s", exc)
        raise Problem(503, "appended-not-indexed", str(exc), retry_after=5) from exc
    if accepted.created and isinstance(prepared, Prepared):
        log.info(
            "appended entry %d to %s",
            accepted.entry.index,
            collection,
            extra={
                "event": "entry-appended",
                "collection": collection,
                "index": accepted.entry.index,
                "signer": envelope.signer_key_id,
                **entry_counts(prepared.payload),
            },
        )
    return web.json_response(
        {
            "index": accepted.entry.index,
            "leaf_hash": base64.b64encode(accepted.entry.leaf_hash).decode(),
        },
        status=201 if accepted.created else 200,
    )


def _serialised_entries(
    runtime: HubRuntime,
    collection: str,
    start: int,
    limit: int,
    *,
    separator: bytes = b"",
    terminator: bytes = b"",
) -> tuple[bytes, int]:
    """Up to ``limit`` entries from ``start`` (at most ``entries_page_bytes`` of them) as the API
    writes them, and the index after the last one (worker thread).

    Each entry's envelope is its stored canonical JSON, spliced in as is.
    """
    records = runtime.node.store.entries(collection, start, limit, runtime.config.entries_page_bytes)
    following = records[-1].index + 1 if records else start
    joined = separator.join(
        b'{"index":%d,"envelope":%s}%s' % (record.index, record.data, terminator) for record in records
    )
    return joined, following


async def get_entries(request: web.Request) -> web.StreamResponse:
    """Entries as a JSON page or an NDJSON stream, in a stream slot and under a send deadline.

    Pages and stream chunks are cut by bytes (``entries_page_bytes``) as well
    as by count, so a log of 100,000-item batches costs the hub a bounded
    amount per request; ``next`` says where the page stopped.
    """
    runtime = _runtime(request)
    collection = await _collection(request)
    caller = await _caller(request)
    await _require_read(request, caller, collection)
    start = _int_param(request, "start", 0)
    async with runtime.streams.slot(caller.key_id):
        if NDJSON in request.headers.get("Accept", ""):
            return await _stream_entries(request, runtime, collection, start, request.query.get("limit"))
        limit = min(_int_param(request, "limit", ENTRIES_PAGE_CAP), ENTRIES_PAGE_CAP)
        entries, following = await runtime.read(
            lambda: _serialised_entries(runtime, collection, start, limit, separator=b",")
        )
        body = b'{"entries":[%s],"next":%d}' % (entries, following)
        del entries
        response = web.Response(body=body, content_type="application/json")
        await runtime.deadline.send(request, response)  # while the slot is held
        return response


async def _stream_entries(
    request: web.Request, runtime: HubRuntime, collection: str, start: int, limit_text: str | None
) -> web.StreamResponse:
    size = await runtime.read(lambda: runtime.node.store.log_size(collection))
    end = size if limit_text is None else min(size, start + _int_param(request, "limit"))
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    position = start
    while position < end:
        chunk = min(ENTRIES_PAGE_CAP, end - position)
        lines, following = await runtime.read(
            lambda p=position, n=chunk: _serialised_entries(runtime, collection, p, n, terminator=b"\n")  # type: ignore[misc]
        )
        if following == position:
            break
        position = following
        await runtime.deadline.write(request, response, lines)
        del lines
    await runtime.deadline.finish(request, response)
    return response


async def get_checkpoint(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    collection = await _collection(request)
    try:
        note = await runtime.read(lambda: runtime.node.checkpoint(collection))
    except NoCheckpointYet as exc:
        raise Problem(503, "not-ready", str(exc)) from exc
    except HistoryMismatch as exc:
        log.critical("refusing to sign a checkpoint: %s", exc)
        raise Problem(503, "signing-refused", f"this hub refuses to sign a checkpoint: {exc}") from exc
    return web.Response(text=note, content_type="text/plain", charset="utf-8")


async def inclusion_proof(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    collection = await _collection(request)
    caller = await _caller(request)
    await _require_read(request, caller, collection)
    index, size = _int_param(request, "index"), _int_param(request, "size")
    try:
        hashes = await runtime.read(lambda: runtime.node.inclusion_proof(collection, index, size))
    except ProofError as exc:
        raise Problem(400, "invalid-proof-request", str(exc)) from exc
    return web.json_response({"hashes": [base64.b64encode(h).decode() for h in hashes]})


async def consistency_proof(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    collection = await _collection(request)
    caller = await _caller(request)
    await _require_read(request, caller, collection)
    old, new = _int_param(request, "old"), _int_param(request, "new")
    try:
        hashes = await runtime.read(lambda: runtime.node.consistency_proof(collection, old, new))
    except ProofError as exc:
        raise Problem(400, "invalid-proof-request", str(exc)) from exc
    return web.json_response({"hashes": [base64.b64encode(h).decode() for h in hashes]})


def _parse_lookup(
    obj: Any, max_queries: int, defaults: LookupDefaults
) -> tuple[list[Query], list[str] | None]:
    """The queries of a lookup body, each resolved by its signal type, and the collections asked for."""
    if not isinstance(obj, dict):
        raise Problem(400, "invalid-lookup", "lookup body must be a JSON object with a queries list")
    unknown = sorted(set(obj) - {"queries", "max_distance", "collections"})
    if unknown:
        raise Problem(400, "invalid-lookup", f"lookup body has unknown field {unknown[0]!r}")
    queries_value = obj.get("queries")
    if not isinstance(queries_value, list):
        raise Problem(400, "invalid-lookup", "lookup body needs queries: a list of {type, hash}")
    if len(queries_value) > max_queries:
        raise Problem(
            400,
            "too-many-queries",
            f"lookup has {len(queries_value)} queries; at most {max_queries} are allowed per request, split it",
        )
    max_distance = obj.get("max_distance")
    if "max_distance" in obj and (
        isinstance(max_distance, bool)
        or not isinstance(max_distance, int)
        or not 0 <= max_distance <= REQUEST_MAX_DISTANCE_LIMIT
    ):
        raise Problem(
            400,
            "invalid-max-distance",
            f"max_distance must be an integer from 0 to {REQUEST_MAX_DISTANCE_LIMIT}, got {max_distance!r}",
        )
    queries: list[Query] = []
    for position, query in enumerate(queries_value):
        try:
            queries.append(parse_query(query, max_distance, defaults))
        except DistanceError as exc:
            raise Problem(400, "invalid-max-distance", f"queries[{position}]: {exc}") from exc
        except QueryShapeError as exc:
            raise Problem(400, "invalid-lookup", f"queries[{position}]: {exc}") from exc
        except SignalError as exc:
            raise Problem(400, "invalid-hash", f"queries[{position}]: {exc}") from exc
    collections = obj.get("collections")
    if collections is not None and (
        not isinstance(collections, list) or not all(isinstance(c, str) for c in collections)
    ):
        raise Problem(400, "invalid-lookup", "collections must be a list of collection names")
    return queries, collections


async def lookup(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    body = await request.read()
    signed = SignedRequest.of(request)
    # Small lookups, the hot path, queue for a batch: one trip to a worker
    # thread answers every lookup that arrived meanwhile (authentication,
    # parsing, one search per collection set, serialisation). Large ones
    # queue apart, so they never hold up the small ones, and run one at a
    # time: several large searches at once in one process fight over the
    # GIL and the caches (measured at 10M hashes, four lookups of 1,000:
    # 510 ms of CPU each at once, 333 ms one at a time); a hub uses more
    # cores through more workers.
    lookups = runtime.lookups if len(body) <= BATCHED_LOOKUP_BYTES else runtime.large_lookups
    assert lookups is not None  # both queues are made with the routes
    answer = await lookups.submit((signed, body, request))
    return web.Response(body=answer, content_type="application/json")


LookupRequest = tuple[SignedRequest, bytes, web.Request]


BATCHED_LOOKUP_BYTES = 64 * 1024
"""Lookup bodies up to this size (about 650 PDQ queries) share batches; larger ones queue apart."""


def lookup_batches(runtime: HubRuntime, max_items: int = 64) -> RequestBatches[LookupRequest, bytes]:
    """A queue of lookups answered ``max_items`` at a time at most (see :func:`lookup`)."""
    return RequestBatches(lambda batch: _answer_lookups(runtime, batch), runtime.readers, max_items)


def _answer_lookups(runtime: HubRuntime, batch: list[LookupRequest]) -> list[bytes | BaseException]:
    """Answers (or refusals) of a batch of lookups, in order, with one search per collection set."""
    node = runtime.node
    existing, sources = node.collections(), node.sources()
    callers = authenticate_many(node, runtime.guard, [(signed, body) for signed, body, _ in batch])
    prepared: list[tuple[list[str], list[Query]] | BaseException] = []
    for (_, body, request), caller in zip(batch, callers, strict=True):
        if isinstance(caller, Exception):  # each refusal is raised in its own request's handler
            prepared.append(caller)
            continue
        try:
            prepared.append(_prepare_lookup(runtime, caller, body, request, existing, sources))
        except Exception as exc:  # a body or a right refused: likewise
            prepared.append(exc)
    accepted = [lookup for lookup in prepared if not isinstance(lookup, BaseException)]
    assert runtime.batcher is not None
    answers = iter(runtime.batcher.lookup_many(accepted))
    outcomes: list[bytes | BaseException] = []
    for lookup in prepared:
        if isinstance(lookup, BaseException):
            outcomes.append(lookup)
            continue
        answer = next(answers)
        if isinstance(answer, BaseException):
            outcomes.append(answer)
        else:
            outcomes.append(_lookup_document(runtime, lookup[1], answer, sources))
    return outcomes


def _prepare_lookup(
    runtime: HubRuntime,
    caller: Caller,
    body: bytes,
    request: web.Request,
    existing: list[str],
    sources: dict[str, SourceRecord],
) -> tuple[list[str], list[Query]]:
    """Parse one authenticated lookup: the collections it searches and its queries."""
    request[CALLER_KEY_ID] = caller.key_id  # for the request's log line
    queries, asked = _parse_lookup(
        _json_body(body, "lookup body"), runtime.config.max_queries, runtime.config.lookup_defaults
    )
    # Mirrored collections (from peers) are searched too; their matches say which hub they come from.
    reads_own = any(caller.may(c, "read") for c in existing if c not in sources)

    def readable(name: str) -> bool:
        return caller.may(name, "read") or (name in sources and reads_own)

    if asked is None:
        collections = [c for c in existing if readable(c)]
        if not collections:
            raise Problem(403, "missing-right", f"key {caller.key_id} may read no collection on this hub")
    else:
        for name in asked:
            if name not in existing:
                raise Problem(404, "unknown-collection", f"no collection named {name!r} on this hub")
            if not readable(name):
                caller.require(name, "read")
        collections = list(dict.fromkeys(asked))
    return collections, queries


def _lookup_document(
    runtime: HubRuntime, queries: list[Query], answer: Answer, sources: dict[str, SourceRecord]
) -> bytes:
    if runtime.metrics is not None:
        runtime.metrics.looked_up(
            (query.signal.name, len(matches)) for query, matches in zip(queries, answer.results, strict=True)
        )
    results: list[dict[str, Any]] = []
    for position, matches in enumerate(answer.results):
        result: dict[str, Any] = {"matches": [match_json(m, sources.get(m.collection)) for m in matches]}
        if position in answer.truncated:
            result["truncated"] = True
        results.append(result)
    document = {"results": results}
    return json.dumps(document, separators=(",", ":")).encode()


async def peers(request: web.Request) -> web.Response:
    """Each peer's mirrored collections: state, last verified checkpoint, lag, last error."""
    peering = _runtime(request).peering
    return web.json_response({"peers": peering.status() if peering is not None else []})


async def sources(request: web.Request) -> web.Response:
    """Every mirrored collection with the latest checkpoint verified of it, and any fork evidence."""
    runtime = _runtime(request)
    store = runtime.node.store

    def read() -> list[dict[str, Any]]:
        return [
            source_json(record, store.log_size(record.name), store.evidence(record.name))
            for record in store.sources()
        ]

    return web.json_response({"sources": await runtime.read(read)})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/health", health)
    app.router.add_get("/v1/ready", ready)
    app.router.add_get("/v1/hub", hub_info)
    app.router.add_post("/v1/collections/{collection}/entries", post_entry)
    app.router.add_get("/v1/collections/{collection}/entries", get_entries)
    app.router.add_get("/v1/collections/{collection}/checkpoint", get_checkpoint)
    app.router.add_get("/v1/collections/{collection}/proof/inclusion", inclusion_proof)
    app.router.add_get("/v1/collections/{collection}/proof/consistency", consistency_proof)
    app.router.add_post("/v1/lookup", lookup)
    app[RUNTIME].lookups = lookup_batches(app[RUNTIME])
    app[RUNTIME].large_lookups = lookup_batches(app[RUNTIME], max_items=1)
    app.router.add_get("/v1/peers", peers)
    app.router.add_get("/v1/sources", sources)
    app.router.add_get("/metrics", metrics_endpoint)
    from .openapi import openapi_document  # the API description (docs/openapi.yaml), as shipped

    app.router.add_get("/v1/openapi.yaml", openapi_document)
