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

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

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
    """Log INFO and above to standard error, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


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
