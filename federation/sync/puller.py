"""Pulling one mirrored log from a hub: checkpoint, consistency, entries, proven spans.

One round of :meth:`Puller.sync`:

1. fetch the source's checkpoint and check its signature against the pinned
   key and its origin line (``<hub>/<collection>``);
2. judge it against what is trusted (:func:`federation.sync.verify.plan`);
   when it is newer, fetch the consistency proof from the trusted target to
   it and check it; a checkpoint that cannot be true is fork evidence: kept,
   logged, and the source is stopped;
3. fetch the entries from the local cursor to the checkpoint in spans
   (NDJSON, one request per span, the next span fetched while the current
   one is applied);
4. apply each span in a worker thread through :meth:`Node.ingest_remote` —
   the same ``check_entry``/``apply_entry`` as the hub's own ingest, against
   the membership entries of the same log — and, in the same transaction,
   require the new local root to be proven against the signed checkpoint:
   equal to it at its size, or linked to it by the source's consistency proof
   below it. Only then does the span commit, with the checkpoints reached.

So the local log is always a proven prefix of a checkpoint signed by the
origin hub, a crash loses at most the span in flight, and the next round
resumes at the local log's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar

import aiohttp

from ..client import AnswerRefused, HubClient, HubError, new_client_session
from ..envelope import Envelope, EnvelopeError, parse_payload
from ..keys import VerifierKey
from ..node import Node
from ..replay import REPLAY_LIMITS
from ..state import Refusal
from ..store.base import SourceRecord
from ..tls import ClientTls
from .verify import (
    Evidence,
    ForkDetected,
    Known,
    Origin,
    Plan,
    SignedCheckpoint,
    VerificationError,
    check_link,
    check_span,
    plan,
)

T = TypeVar("T")


class Runner(Protocol):
    """Runs a synchronous function in a worker thread; awaits its result."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...


log = logging.getLogger("hashfed.sync")

SEPARATOR = ":"
_NAME = r"[A-Za-z0-9._-]{1,64}"
_REMOTE = re.compile(rf"(?:({_NAME}){SEPARATOR})?({_NAME})")
FIRST_SPAN = 1
"""Spans start at one entry and grow at most fourfold each time: one entry may hold 100,000 hashes."""
MAX_SPAN = 10_000
SPAN_BYTES = 8 * 1024 * 1024
"""Aim for spans of about this many bytes: big enough to amortise a request, small enough to hold."""


def local_name(hub: str, collection: str) -> str:
    """A mirrored collection's local name; ``:`` never occurs in a hub's own collection names."""
    return f"{hub}{SEPARATOR}{collection}"


class SourceStopped(ForkDetected):
    """The source was stopped by fork evidence recorded earlier."""


@dataclass(frozen=True)
class SourceSpec:
    """One log to mirror: where to pull it from, under which name there, and whose key signs it."""

    url: str
    remote: str
    """The collection's name at ``url``: ``c`` at its origin hub, ``<hub>:c`` at a hub that relays it."""
    origin: Origin

    @property
    def name(self) -> str:
        return local_name(self.origin.hub, self.origin.collection)

    @classmethod
    def make(cls, url: str, keys: VerifierKey | Sequence[VerifierKey], remote: str) -> SourceSpec:
        """``remote`` as named at ``url``; ``keys`` is the origin hub's key (its name is the hub's name),
        or its keys oldest first after rotations."""
        chain = (keys,) if isinstance(keys, VerifierKey) else tuple(keys)
        key = chain[0]
        match = _REMOTE.fullmatch(remote)
        if match is None or match.group(2) in {".", ".."}:
            raise ValueError(
                f"collection {remote!r} must be NAME or HUB{SEPARATOR}NAME (letters, digits, '.', '_', '-'; "
                "NAME not '.' or '..')"
            )
        hub, collection = match.group(1), match.group(2)
        if hub is not None and hub != key.name:
            raise ValueError(
                f"collection {remote!r} is relayed from hub {hub!r}: pin that hub's key, not {key.key_id}"
            )
        return cls(url.rstrip("/"), remote, Origin(key.name, collection, key, url.rstrip("/"), chain[1:]))


@dataclass(frozen=True)
class SyncProgress:
    name: str
    size: int
    goal: int
    bytes: int
    seconds: float


@dataclass(frozen=True)
class SyncResult:
    name: str
    before: int
    after: int
    checkpoint: int
    """Size of the checkpoint the local log has reached (after == checkpoint on success)."""
    source_size: int
    """Size of the newest checkpoint the source showed."""
    bytes: int
    seconds: float


class ByteCounter:
    """Counts the bytes of the answers a puller read: checkpoints, entries and proofs.

    Counted where the answers are read (the client reads bodies in chunks,
    which aiohttp's response tracing does not see).
    """

    def __init__(self) -> None:
        self.total = 0

    def add(self, size: int) -> None:
        self.total += size


PROOF_HASH_BYTES = 32
READ_TIMEOUT = 30.0
"""Seconds a source may send nothing while an answer is being read before it is given up on."""


def new_session(
    timeout: float, counter: ByteCounter, read_timeout: float = READ_TIMEOUT, tls: ClientTls | None = None
) -> aiohttp.ClientSession:
    """A session whose every request must finish within ``timeout`` seconds (spans are sized to allow it),
    and whose answers may not stall for more than ``read_timeout`` seconds between two reads."""
    return new_client_session(
        aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(timeout, 10.0), sock_read=min(timeout, read_timeout)
        ),
        tls,
    )


def _timeout_reason(session: aiohttp.ClientSession | None) -> str:
    """What a bare timeout means, naming the limits it can come from."""
    limits = session.timeout if session is not None else None
    if limits is None or limits.sock_read is None:
        return "timed out"
    return (
        f"timed out: no data for {limits.sock_read:g} s (the read timeout) "
        f"or the request took over {limits.total:g} s"
    )


@dataclass(frozen=True)
class _Span:
    start: int
    count: int
    body: bytes
    proof: list[bytes]


def parse_entry_lines(body: bytes, start: int, count: int) -> list[Envelope]:
    """The envelopes of an NDJSON entries answer, which must be exactly indexes start..start+count-1."""
    envelopes: list[Envelope] = []
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        expected = start + len(envelopes)
        try:
            item = json.loads(line)
            index = item["index"]
            envelope = Envelope.from_json(item["envelope"])
        except (ValueError, KeyError, TypeError, EnvelopeError) as exc:
            raise VerificationError(f"entry {expected}: malformed entry line: {exc}") from exc
        if index != expected or isinstance(index, bool):
            raise VerificationError(f"the source sent entry {index!r} where entry {expected} belongs")
        envelopes.append(envelope)
    if len(envelopes) != count:
        raise VerificationError(
            f"the source sent {len(envelopes)} entries from {start}, where its checkpoint needs {count}"
        )
    return envelopes


class Puller:
    """Keeps one mirrored collection of ``node`` in step with a source, verifying everything."""

    def __init__(
        self,
        node: Node,
        spec: SourceSpec,
        client: HubClient,
        run: Runner,
        *,
        counter: ByteCounter | None = None,
        index: bool = True,
        span_bytes: int = SPAN_BYTES,
        first_span: int = FIRST_SPAN,
        on_progress: Callable[[SyncProgress], None] | None = None,
    ) -> None:
        self.node = node
        self.spec = spec
        self.client = client
        self._run = run
        self.counter = counter or ByteCounter()
        self.index = index
        self.span_bytes = span_bytes
        self.on_progress = on_progress
        self.source_size: int | None = None
        """Size of the newest checkpoint the source showed (for lag)."""
        self._span = first_span

    async def _ask(self, request: Awaitable[T]) -> T:
        """One request to the source: a lost connection is a HubError, an unusable answer a VerificationError."""
        try:
            return await request
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
            # A connection reset mid-answer surfaces as an incomplete payload: the
            # network failed, not the source's data, so it is retried like any outage.
            if isinstance(exc, TimeoutError):
                reason = _timeout_reason(self.client.session)
            else:
                reason = str(exc) or type(exc).__name__
            raise HubError(0, f"lost the connection to {self.spec.url}: {reason}") from exc
        except (aiohttp.ClientError, ValueError, KeyError, TypeError) as exc:
            raise VerificationError(
                f"{self.spec.url} sent an answer that is not valid: {exc!r}"[:500]
            ) from exc

    # ---- reading what is held (worker thread) -----------------------------

    def _record(self) -> SourceRecord | None:
        record = self.node.store.source(self.spec.name)
        if record is None:
            return None
        if record.key != self.spec.origin.key.encode():
            raise VerificationError(
                f"{self.spec.name} is mirrored here with key {VerifierKey.parse(record.key).key_id}, "
                f"not {self.spec.origin.key.key_id}"
            )
        if record.forked:
            evidence = self.node.store.evidence(self.spec.name)
            raise SourceStopped(Evidence.from_json(json.loads(evidence[-1])))
        return record

    def _origin(self, *, held: bool = False) -> Origin:
        """The origin with the hub keys whose checkpoints are accepted now (worker thread).

        The key in force is the pinned first key handed on by every rotation
        verified in the local log; during a rotation's overlap the key before
        it is accepted too, and so are keys pinned ahead of the local log (a
        new mirror that pinned ``hub.keys``). A key rotated away from whose
        overlap has ended is refused. Notes already ``held`` were verified
        when they came, so every key of the log's history opens them.
        """
        origin = self.spec.origin
        rotations = self.node.store.hub_keys(self.spec.name) if self.node.store.source(self.spec.name) else []
        history = {key.key_id: key for key in (origin.key, *origin.later)}
        for rotation in rotations:
            history.setdefault(rotation.previous.key_id, rotation.previous)
            history.setdefault(rotation.key.key_id, rotation.key)
        if held:
            return replace(origin, accepted=tuple(history.values()))
        now = time.time()
        ended = {rotation.previous.key_id for rotation in rotations if rotation.previous_until <= now}
        in_force = rotations[-1].key if rotations else origin.key
        candidates = [in_force, *origin.later, *(r.previous for r in rotations if r.previous_until > now)]
        accepted = {key.key_id: key for key in candidates if key.key_id not in ended or key == in_force}
        return replace(origin, accepted=tuple(accepted.values()))

    def _known(self, record: SourceRecord | None) -> Known:
        if record is None:
            return Known(None, None, 0)
        origin = self._origin(held=True)
        reached = None if record.checkpoint is None else SignedCheckpoint.open(record.checkpoint, origin)
        target = None if record.target is None else SignedCheckpoint.open(record.target, origin)
        return Known(reached, target, self.node.store.log_size(self.spec.name))

    def _judge(self, new: SignedCheckpoint) -> tuple[SourceRecord | None, Known, Plan]:
        record = self._record()
        known = self._known(record)
        step = plan(
            new,
            known,
            self._origin(held=True),
            lambda size: self.node.root(self.spec.name, size),
            lambda old, new_size: self.node.consistency_proof(self.spec.name, old, new_size),
        )
        return record, known, step

    async def _fork(self, exc: ForkDetected) -> None:
        """Keep the evidence, stop the source, and say so loudly."""
        body = exc.evidence.dumps()
        await self._run(lambda: self.node.record_fork(self.spec.name, body))
        log.error(
            "FORK DETECTED for %s; applying from it stopped. %s",
            self.spec.name,
            exc.evidence.detail,
            extra={"event": "fork-detected", "source": self.spec.name, "reason": exc.evidence.reason},
        )

    async def _link(self, small: SignedCheckpoint, large: SignedCheckpoint, trusted_is_large: bool) -> None:
        proof = await self._ask(self.client.consistency_proof(self.spec.remote, small.size, large.size))
        self.counter.add(PROOF_HASH_BYTES * len(proof))
        origin = await self._run(lambda: self._origin(held=True))
        check_link(small, large, proof, origin, trusted_is_large)

    # ---- one round ---------------------------------------------------------

    async def sync(self) -> SyncResult:
        """Bring the local copy up to the source's current checkpoint, verified; return what happened."""
        started, bytes_before = time.monotonic(), self.counter.total
        await self._run(self._record)  # a stopped source is not even asked
        note = await self._ask(self.client.checkpoint(self.spec.remote))
        self.counter.add(len(note))
        origin = await self._run(self._origin)
        try:
            new = SignedCheckpoint.open(note, origin)
        except VerificationError as exc:
            raise VerificationError(
                f"{exc}; if the hub rotated its key and the overlap has passed, check the new key with the "
                "hub's operator and pin it (a new mirror pins the hub's hub.keys)"
            ) from exc
        self.source_size = new.size
        try:
            record, known, step = await self._run(lambda: self._judge(new))
            if step.link is not None:
                small, large = step.link
                await self._link(small, large, trusted_is_large=not step.newer)
        except SourceStopped:
            raise
        except ForkDetected as exc:
            await self._fork(exc)
            raise
        goal: SignedCheckpoint = step.goal
        if known.reached is not None and new.size < known.reached.size:
            log.warning(
                "%s: %s showed a checkpoint of %d entries, older than the %d already verified here "
                "(consistent with it; a stale replica or cache in front of the hub?)",
                self.spec.name,
                self.spec.url,
                new.size,
                known.reached.size,
            )
        if record is None:
            origin = self.spec.origin
            record = SourceRecord(
                self.spec.name, origin.hub, origin.collection, origin.key.encode(), "", self.spec.url
            )
        size = await self._pull(record, known.size, goal, started, bytes_before)
        return SyncResult(
            self.spec.name,
            known.size,
            size,
            goal.size if size == goal.size else (known.reached.size if known.reached else 0),
            new.size,
            self.counter.total - bytes_before,
            time.monotonic() - started,
        )

    async def _fetch(self, start: int, count: int, goal: SignedCheckpoint) -> _Span:
        try:
            body = await self._ask(self.client.entry_lines(self.spec.remote, start, count))
        except VerificationError as exc:
            if count == 1 or not isinstance(exc.__cause__, AnswerRefused):
                raise
            count = 1  # a span of several large entries: take them one at a time
            body = await self._ask(self.client.entry_lines(self.spec.remote, start, count))
        end = start + count
        proof = (
            []
            if end >= goal.size
            else await self._ask(self.client.consistency_proof(self.spec.remote, end, goal.size))
        )
        self.counter.add(len(body) + PROOF_HASH_BYTES * len(proof))
        return _Span(start, count, body, proof)

    def _next_count(self, span: _Span) -> int:
        scaled = span.count * self.span_bytes // max(len(span.body), 1)
        self._span = max(1, min(MAX_SPAN, scaled, span.count * 4))
        return self._span

    async def _pull(
        self, record: SourceRecord, size: int, goal: SignedCheckpoint, started: float, bytes_before: int
    ) -> int:
        if size >= goal.size:
            return size
        pending: asyncio.Future[_Span] | None = asyncio.ensure_future(
            self._fetch(size, min(self._span, goal.size - size), goal)
        )
        try:
            while pending is not None:
                span = await pending
                end = span.start + span.count
                count = self._next_count(span)
                pending = (
                    asyncio.ensure_future(self._fetch(end, min(count, goal.size - end), goal))
                    if end < goal.size
                    else None
                )
                record = await self._run(functools.partial(self._apply, record, goal, span))
                size = end
                if self.on_progress is not None:
                    self.on_progress(
                        SyncProgress(
                            self.spec.name,
                            size,
                            goal.size,
                            self.counter.total - bytes_before,
                            time.monotonic() - started,
                        )
                    )
        finally:
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await pending
        return size

    def _apply(self, record: SourceRecord, goal: SignedCheckpoint, span: _Span) -> SourceRecord:
        """Verify and apply one span (worker thread); return the source record as committed."""
        envelopes = parse_entry_lines(span.body, span.start, span.count)
        federation = record.federation
        if span.start == 0:
            # The log's federation is the one its first entry names; that entry is a
            # membership entry, and check_entry verifies it against the pinned key.
            try:
                federation = parse_payload(
                    envelopes[0].payload_type, envelopes[0].payload, REPLAY_LIMITS
                ).header.federation
            except EnvelopeError as exc:
                raise VerificationError(f"{self.spec.name} entry 0: {exc}") from exc
        end = span.start + span.count
        updated = replace(
            record,
            federation=federation,
            url=self.spec.url,
            target=goal.note,
            checkpoint=goal.note if end == goal.size else record.checkpoint,
        )
        try:
            self.node.ingest_remote(
                updated,
                span.start,
                envelopes,
                lambda size, root: check_span(size, root, goal, span.proof),
                index=self.index,
            )
        except Refusal as exc:
            raise VerificationError(f"{self.spec.name}: refused from {self.spec.url}: {exc.detail}") from exc
        return updated

    async def verified_checkpoint(self) -> str | None:
        """The newest checkpoint the local log has reached, as the origin hub signed it."""
        record = await self._run(lambda: self.node.store.source(self.spec.name))
        return None if record is None else record.checkpoint

    # ---- comparing with what others were shown -----------------------------

    async def compare(self, note: str) -> tuple[bool, str]:
        """Check another party's signed checkpoint of this log against the local one.

        Returns (True, how) when they are consistent, (False, why) when that
        cannot be decided yet (the other is ahead of what the source can
        prove); raises ForkDetected, with the evidence kept, when they conflict.
        """
        other = SignedCheckpoint.open(note, await self._run(lambda: self._origin(held=True)))
        try:
            _, known, step = await self._run(lambda: self._judge(other))
            if known.reached is None:
                return False, f"{self.spec.name} has no verified checkpoint yet to compare with"
            if step.link is not None:
                small, large = step.link
                try:
                    await self._link(small, large, trusted_is_large=not step.newer)
                except ForkDetected:
                    raise
                except (HubError, VerificationError) as exc:
                    reason = exc.detail if isinstance(exc, HubError) else str(exc)
                    return False, (
                        f"the source cannot prove size {small.size} consistent with size {large.size} yet "
                        f"({reason}); sync and compare again"
                    )
        except SourceStopped:
            raise
        except ForkDetected as exc:
            await self._fork(exc)
            raise
        return True, f"consistent with the local log (checkpoint {known.reached.describe()})"
