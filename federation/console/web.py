"""The operator's console at ``/console/``: server-rendered pages (Jinja2), a login of its own.

Callers must come from ``console_allow`` (loopback by default) and hold a
session from a login token (:mod:`.access`); every POST carries the
session's CSRF token. Pages only read; the one form that does work, the
lookup, searches as the hub does for its members. Nothing here changes how
the API authenticates.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import jinja2
from aiohttp import web

from ..config import parse_networks
from ..hub.app import RUNTIME, HubRuntime
from ..hub.metrics import METRICS
from ..hub.problems import Problem
from . import charts, data
from .access import COOKIE, ConsoleAccess, Session, TokenError

ACCESS = web.AppKey("console_access", ConsoleAccess)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
SESSION = web.RequestKey("console_session", Session)
PREFIX = "/console/"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_console(app: web.Application, access: ConsoleAccess, allow: str) -> None:
    """Serve the console on ``app`` for callers from ``allow`` (networks) with a session from ``access``."""
    app[ACCESS] = access
    app[TEMPLATES] = jinja2.Environment(
        loader=jinja2.PackageLoader("federation.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    networks = parse_networks(allow)

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(PREFIX.rstrip("/")):
            return await handler(request)
        try:
            address = ipaddress.ip_address(request.remote or "")
        except ValueError:
            address = None
        if address is None or not any(address in network for network in networks):
            raise Problem(
                403,
                "console-not-allowed",
                f"{request.remote} may not use the console (console_allow in hub.toml)",
            )
        public = request.path in (
            PREFIX + "login",
            PREFIX + "static/console.css",
            PREFIX + "static/console.js",
        )
        session = access.session(request.cookies.get(COOKIE))
        if session is None and not public:
            raise web.HTTPSeeOther(PREFIX + "login")
        if session is not None:
            request[SESSION] = session
            if request.method == "POST":
                form = await request.post()
                if form.get("csrf") != session.csrf:
                    raise Problem(
                        403,
                        "console-csrf",
                        "the form's CSRF token does not match this session; reload the page",
                    )
        response = await handler(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    app.middlewares.append(guard)
    router = app.router
    router.add_get(PREFIX.rstrip("/"), to_console)
    router.add_get(PREFIX, overview)
    router.add_get(PREFIX + "login", login_form)
    router.add_post(PREFIX + "login", log_in)
    router.add_post(PREFIX + "logout", log_out)
    router.add_get(PREFIX + "members", members)
    router.add_get(PREFIX + "log", log_page)
    router.add_get(PREFIX + "log/{collection}/{index:[0-9]+}", entry_page)
    router.add_get(PREFIX + "peers", peers)
    router.add_get(PREFIX + "refusals", refusals)
    router.add_get(PREFIX + "lookup", lookup_page)
    router.add_post(PREFIX + "lookup", lookup_page)
    router.add_get(PREFIX + "static/{name:console\\.(css|js)}", static)


async def to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther(PREFIX)


def _render(request: web.Request, template: str, **context: Any) -> web.Response:
    session = request.get(SESSION)
    runtime = request.app[RUNTIME]
    html = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            csrf=session.csrf if session else "",
            hub=runtime.node.name,
            federation=runtime.node.federation,
            page=template.removesuffix(".html"),
            **context,
        )
    )
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def _runtime(request: web.Request) -> HubRuntime:
    return request.app[RUNTIME]


async def login_form(request: web.Request) -> web.Response:
    return _render(request, "login.html", error=None)


async def log_in(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    token = str(form.get("token", ""))
    try:
        session_id, session = request.app[ACCESS].log_in(token)
    except TokenError as exc:
        response = _render(request, "login.html", error=str(exc))
        response.set_status(401)
        return response
    redirect = web.HTTPSeeOther(PREFIX)
    redirect.set_cookie(
        COOKIE,
        session_id,
        max_age=max(1, int(session.expires - time.time())),
        path=PREFIX,
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )
    raise redirect


async def log_out(request: web.Request) -> web.StreamResponse:
    request.app[ACCESS].log_out(request.cookies.get(COOKIE, ""))
    redirect = web.HTTPSeeOther(PREFIX + "login")
    redirect.del_cookie(COOKIE, path=PREFIX)
    raise redirect


async def overview(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    summaries = await runtime.read(lambda: data.collections(runtime.node))
    return _render(
        request,
        "overview.html",
        collections=summaries,
        ready=runtime.ready,
        uptime=_duration(time.monotonic() - runtime.started),
    )


async def members(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    rows, activity = await runtime.read(lambda: data.members(runtime.node))
    return _render(
        request, "members.html", rows=rows, chart=charts.activity_svg(activity), window=data.ACTIVITY_WINDOW
    )


async def log_page(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    names = await runtime.read(runtime.node.collections)
    collection = request.query.get("collection") or (names[0] if names else "")
    if collection and collection not in names:
        raise Problem(404, "unknown-collection", f"no collection named {collection!r} on this hub")
    rows = await runtime.read(lambda: data.recent_entries(runtime.node, collection)) if collection else []
    return _render(request, "log.html", collections=names, collection=collection, rows=rows)


async def entry_page(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    collection, index = request.match_info["collection"], int(request.match_info["index"])
    if collection not in await runtime.read(runtime.node.collections):
        raise Problem(404, "unknown-collection", f"no collection named {collection!r} on this hub")
    detail = await runtime.read(lambda: data.entry_detail(runtime.node, collection, index))
    if detail is None:
        raise Problem(404, "not-found", f"{collection} has no entry {index}")
    return _render(request, "entry.html", collection=collection, entry=detail)


async def peers(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    status = runtime.peering.status() if runtime.peering is not None else []
    sources = await runtime.read(
        lambda: {s.name: len(runtime.node.store.evidence(s.name)) for s in runtime.node.store.sources()}
    )
    return _render(request, "peers.html", peers=status, evidence=sources)


async def refusals(request: web.Request) -> web.Response:
    counts = request.app[METRICS].refusals_last_hour()
    return _render(request, "refusals.html", counts=counts, total=sum(counts.values()))


async def lookup_page(request: web.Request) -> web.Response:
    runtime = _runtime(request)
    text, results, max_distance = "", [], ""
    if request.method == "POST":
        form = await request.post()
        text = str(form.get("hashes", ""))
        max_distance = str(form.get("max_distance", "")).strip()
        if max_distance and not max_distance.isdigit():
            return _render(
                request,
                "lookup.html",
                text=text,
                results=[
                    data.LookupRow(max_distance, "", [], "the max distance must be a whole number, or empty")
                ],
                max_distance=max_distance,
            )
        distance = int(max_distance) if max_distance else None
        parsed = data.parse_lookup_text(text, runtime.config.lookup_defaults, distance)
        queries = [query for _, query in parsed if not isinstance(query, str)]
        collections = await runtime.read(runtime.node.collections)
        batcher = runtime.batcher
        assert batcher is not None
        answer = await runtime.read(lambda: batcher.lookup(collections, queries)) if queries else None
        found = iter(answer.results if answer is not None else [])
        for line, query in parsed:
            if isinstance(query, str):
                results.append(data.LookupRow(line, "", [], query))
                continue
            matches = [
                {
                    "collection": m.collection,
                    "hash": m.hash,
                    "distance": m.distance,
                    "labels": list(m.labels),
                    "submitters": list(m.submitters),
                }
                for m in next(found)
            ]
            results.append(data.LookupRow(line, query.signal.name, matches))
    return _render(request, "lookup.html", text=text, results=results, max_distance=max_distance)


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = resources.files("federation.console").joinpath("static", name).read_bytes()
    kind = "text/css" if name.endswith(".css") else "text/javascript"
    return web.Response(body=body, content_type=kind)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m {secs}s"
