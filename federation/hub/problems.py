"""RFC 9457 problem details: every refused request answers one of these."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from ..store.base import StorageUnavailable

PROBLEM_TYPE_PREFIX = "urn:hashfed:problem:"
PROBLEM_CONTENT_TYPE = "application/problem+json"

_TITLES = {
    400: "Bad request",
    401: "Not authenticated",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    406: "Not acceptable",
    409: "Conflict",
    413: "Request body too large",
    408: "Request timeout",
    411: "Length required",
    415: "Unsupported media type",
    422: "Cannot apply",
    429: "Too many requests",
    500: "Internal error",
    503: "Service unavailable",
    507: "Insufficient storage",
}

MAX_BODY = web.AppKey("max_body_bytes", int)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Problem(Exception):
    """Raise from a handler to refuse a request; the middleware renders it."""

    def __init__(self, status: int, kind: str, detail: str, *, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail
        self.retry_after = retry_after
        """Seconds to wait before trying again (``Retry-After``), for refusals that pass."""


def problem_response(status: int, kind: str, detail: str) -> web.Response:
    body = {
        "type": PROBLEM_TYPE_PREFIX + kind,
        "title": _TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    return web.Response(status=status, text=json.dumps(body), content_type=PROBLEM_CONTENT_TYPE)


STORAGE_RETRY_AFTER = 60
"""Seconds a client is asked to wait after a write the hub's storage refused."""


def storage_problem(exc: StorageUnavailable) -> Problem:
    """507 for a full disk (or one below the reserve), 503 for a read-only or failing one."""
    if exc.reason == "full":
        return Problem(507, "storage-full", str(exc), retry_after=STORAGE_RETRY_AFTER)
    if exc.reason == "read-only":
        return Problem(503, "storage-read-only", str(exc), retry_after=STORAGE_RETRY_AFTER)
    return Problem(503, "storage-failed", str(exc), retry_after=STORAGE_RETRY_AFTER)


def _rendered(exc: Problem) -> web.Response:
    response = problem_response(exc.status, exc.kind, exc.detail)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response


def _kind_of(exc: web.HTTPException) -> str:
    return {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(exc.status, "http-error")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        return _rendered(exc)
    except StorageUnavailable as exc:
        logging.getLogger("hashfed.hub").error("storage unavailable: %s", exc)
        return _rendered(storage_problem(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        detail = exc.text or exc.reason
        if exc.status == 413:
            detail = f"request body exceeds the hub's limit of {request.app[MAX_BODY]} bytes"
        elif exc.status == 404:
            detail = f"no such endpoint: {request.method} {request.path}; see GET /v1/hub"
        elif exc.status == 405:
            detail = f"{request.method} is not allowed on {request.path}"
        response = problem_response(exc.status, _kind_of(exc), detail)
        if "Allow" in exc.headers:  # RFC 9110: a 405 says which methods are allowed
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        logging.getLogger("hashfed.hub").exception("unhandled error in %s %s", request.method, request.path)
        return problem_response(500, "internal", "the hub failed to handle this request; nothing was changed")


class ProblemRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses before any handler runs as a problem.

    Requests aiohttp cannot parse (oversized or malformed headers, a bad
    ``Content-Length``) never reach the middleware; aiohttp answers them
    itself in ``text/plain``. This keeps its logging and connection handling
    and only replaces the body with an RFC 9457 problem.
    """

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if an answer was already begun
        if status >= 500:
            response = problem_response(
                status, "internal", "the hub failed to handle this request; nothing was changed"
            )
        else:
            if isinstance(exc, LineTooLong):
                reason = "its request line or a header is too long (the hub reads at most 8190 bytes of each)"
            else:
                reason = str(getattr(exc, "message", None) or message or exc or "malformed request")[:200]
            response = problem_response(
                status, "http-error", f"the request is not valid HTTP/1.1 and was not read: {reason}"
            )
        response.force_close()
        return response


def problem_request_handlers(server: web.Server) -> Callable[[], ProblemRequestHandler]:
    """A protocol factory like ``server`` itself, whose connections answer parse errors as problems."""

    def make() -> ProblemRequestHandler:
        # What Server.__call__ does, with the subclass: aiohttp offers no hook for the handler class.
        return ProblemRequestHandler(server, loop=server._loop, **server._kwargs)

    return make
