"""The hub's logs: text for people, or one JSON object per line for a log stack.

``hashfed serve --log-format json`` writes every record as a JSON line:
``time``, ``level``, ``logger``, ``message`` and the record's own fields.
Each request gets one line from :class:`RequestLogger` (route pattern,
method, status, duration, the verified caller's key id, the problem kind of a
refusal, bytes sent), and notable events (an entry appended, a merge, a peer
sync, fork evidence) carry an ``event`` field. No hash value or label is ever
logged: entries are described by their counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import select
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..envelope import BatchPayload, MembershipPayload, OpinionPayload, Payload
from .auth import CALLER
from .metrics import PROBLEM_KIND, route_of

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
CALLER_KEY_ID = web.RequestKey("caller_key_id", str)
"""The verified caller's key id, for the request's log line."""
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def entry_counts(payload: Payload) -> dict[str, int]:
    """What an entry holds, counted (never which hashes or labels): for its log line."""
    if isinstance(payload, BatchPayload):
        return {"additions": len(payload.add), "removals": len(payload.remove)}
    if isinstance(payload, OpinionPayload):
        return {"opinions": len(payload.opinions)}
    if isinstance(payload, MembershipPayload):
        return {"grants": len(payload.grant), "revocations": len(payload.revoke)}
    return {"rotations": 1}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, with the fields given in ``extra=``."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        document.update((key, value) for key, value in record.__dict__.items() if key not in _STANDARD)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, separators=(",", ":"))


def configure_logging(log_format: str) -> None:
    """Log INFO and above to standard error, as text or JSON lines; request lines in batches.

    A line per request, written on its own, cost a busy hub a fifth of the
    event loop's time per lookup (a write to standard error each); they are
    written together instead, at most :data:`REQUEST_LINES_DELAY` seconds late.
    """
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    batched = BatchedStreamHandler(sys.stderr, REQUEST_LINES_DELAY)
    batched.setFormatter(formatter)
    requests = logging.getLogger(REQUEST_LOGGER)
    for old in requests.handlers:
        old.close()
    requests.handlers[:] = [batched]
    requests.propagate = False


REQUEST_LOGGER = "aiohttp.access"
"""The logger aiohttp gives :class:`RequestLogger`."""
REQUEST_LINES_DELAY = 0.5
"""The longest a request's log line waits to be written, in seconds."""


class BatchedStreamHandler(logging.Handler):
    """Writes formatted records to ``stream`` in batches: when ``delay`` seconds have passed, or many wait.

    Each write holds whole lines and at most ``select.PIPE_BUF`` bytes where
    it can, so lines from several worker processes sharing one pipe never
    interleave mid-line. Closing (``logging.shutdown`` at exit) writes what
    is left.
    """

    def __init__(self, stream: TextIO, delay: float, max_lines: int = 512) -> None:
        super().__init__()
        self.stream = stream
        self.max_lines = max_lines
        self._lines: list[str] = []
        self._stop = threading.Event()
        self._writer = threading.Thread(
            target=self._write_every, args=(delay,), daemon=True, name="hashfed-log"
        )
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record) + "\n")
            if len(self._lines) >= self.max_lines:
                self._write()
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        with self.lock if self.lock is not None else contextlib.nullcontext():
            self._write()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()

    def _write_every(self, delay: float) -> None:
        while not self._stop.wait(delay):
            self.flush()

    def _write(self) -> None:
        lines, self._lines = self._lines, []
        chunk: list[str] = []
        size = 0
        try:
            for line in lines:
                if chunk and size + len(line) > select.PIPE_BUF:
                    self.stream.write("".join(chunk))
                    self.stream.flush()
                    chunk, size = [], 0
                chunk.append(line)
                size += len(line)
            if chunk:
                self.stream.write("".join(chunk))
                self.stream.flush()
        except (OSError, ValueError):  # a closed or broken standard error: the lines are lost, not the hub
            pass


class RequestLogger(AbstractAccessLogger):
    """One line per request: the route pattern (never the raw path, which can hold a hash), not the query."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        caller = request.get(CALLER_KEY_ID)
        early = request.get(CALLER)  # a caller authenticated before its body was read
        if caller is None and early is not None:
            caller = early.key_id
        route = route_of(request) if isinstance(request, web.Request) else "unmatched"
        fields = {
            "event": "request",
            "remote": request.remote,
            "route": route,
            "method": request.method,
            "status": response.status,
            "duration_seconds": round(time, 6),
            "caller": caller,
            "problem": request.get(PROBLEM_KIND),
            "bytes": response.body_length,
        }
        self.logger.info(
            "%s %s %s %.1f ms%s",
            request.method,
            route,
            response.status,
            time * 1000,
            f" {fields['problem']}" if fields["problem"] else "",
            extra=fields,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
