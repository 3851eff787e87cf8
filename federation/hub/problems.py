"""RFC 9457 problem details: every refused request answers one of these."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

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
    503: "Not ready",
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


def _kind_of(exc: web.HTTPException) -> str:
    return {404: "not-found", 405: "method-not-allowed", 413: "body-too-large"}.get(exc.status, "http-error")


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Problem as exc:
        response = problem_response(exc.status, exc.kind, exc.detail)
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response
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
