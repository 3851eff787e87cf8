"""The operator's console, over HTTP: login, sessions, CSRF, who may use it, and what each page shows.

tests/test_console_browser.py drives the same pages in a real headless Chromium.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from federation.console.access import ConsoleAccess
from federation.hub import create_app, open_node
from tests.conftest import Federation
from tests.helpers import batch_doc, envelope, flip, item, pdq


@dataclasses.dataclass
class Console:
    url: str
    access: ConsoleAccess
    session: aiohttp.ClientSession


@pytest.fixture
async def console(federation: Federation) -> AsyncIterator[Console]:
    node = open_node(federation.data)
    for seed in range(3):
        node.submit("main", envelope(federation.members["acme"], batch_doc("acme", [item("pdq", pdq(seed))])))
    access = ConsoleAccess(federation.data.console_tokens_file)
    server = TestServer(create_app(node, federation.data.config(), access), host="127.0.0.1")
    await server.start_server()
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield Console(str(server.make_url("/console/")), access, session)
    await server.close()


async def log_in(console: Console, token: str) -> aiohttp.ClientResponse:
    async with console.session.post(
        console.url + "login", data={"token": token}, allow_redirects=False
    ) as reply:
        await reply.read()
        return reply


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


async def test_pages_need_a_session_from_a_valid_token(console: Console) -> None:
    async with console.session.get(console.url + "members", allow_redirects=False) as reply:
        assert reply.status == 303 and reply.headers["Location"] == "/console/login"
    forged = await log_in(console, "not-a-token-this-hub-issued")
    assert forged.status == 401 and "hashfed_console" not in forged.cookies
    expired, _ = console.access.issue(1, now=time.time() - 7200)
    async with console.session.post(console.url + "login", data={"token": expired}) as reply:
        assert reply.status == 401 and "has expired" in await reply.text()

    token, _ = console.access.issue(1)
    accepted = await log_in(console, token)
    assert accepted.status == 303
    cookie = accepted.cookies["hashfed_console"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/console/"
    for page in ("", "members", "log", "log/main/1", "peers", "refusals", "lookup"):
        async with console.session.get(console.url + page) as reply:
            assert reply.status == 200, page
            assert reply.content_type == "text/html"
            assert "script-src 'self'" in reply.headers["Content-Security-Policy"]
    assert "token" not in console.access.token_file.read_text()  # only hashes are kept
    assert token not in console.access.token_file.read_text()


async def test_forms_need_the_sessions_csrf_token_and_lookup_finds_near_duplicates(console: Console) -> None:
    token, _ = console.access.issue(1)
    await log_in(console, token)
    async with console.session.get(console.url + "lookup") as reply:
        csrf = csrf_of(await reply.text())
    near = flip(pdq(1), 5)
    async with console.session.post(console.url + "lookup", data={"hashes": f"pdq:{near}"}) as reply:
        assert reply.status == 403
        assert (await reply.json(content_type=None))["type"].endswith("console-csrf")
    form = {"hashes": f"pdq:{near}\nmd5:nothex\n", "csrf": csrf}
    async with console.session.post(console.url + "lookup", data=form) as reply:
        page = await reply.text()
    assert reply.status == 200
    assert pdq(1) in page and 'class="distance">5<' in page
    assert "md5:nothex" in page and 'class="error"' in page
    form = {"hashes": f"pdq:{near}", "max_distance": "ten", "csrf": csrf}
    async with console.session.post(console.url + "lookup", data=form) as reply:
        assert "the max distance must be a whole number" in await reply.text()
    form = {"hashes": f"pdq:{near}", "max_distance": "4", "csrf": csrf}
    async with console.session.post(console.url + "lookup", data=form) as reply:
        assert pdq(1) not in await reply.text()  # distance 5 is past the 4 asked

    async with console.session.post(
        console.url + "logout", data={"csrf": csrf}, allow_redirects=False
    ) as reply:
        assert reply.status == 303
    async with console.session.get(console.url, allow_redirects=False) as reply:
        assert reply.status == 303  # logged out: back to the login page


async def test_the_overview_shows_what_the_api_shows(console: Console, federation: Federation) -> None:
    token, _ = console.access.issue(1)
    await log_in(console, token)
    async with console.session.get(console.url) as reply:
        page = await reply.text()
    base = console.url.removesuffix("/console/")
    async with console.session.get(base + "/v1/collections/main/checkpoint") as reply:
        note = await reply.text()
    size, root = note.split("\n")[1:3]
    assert f'log-size">{size}<' in page and root in page
    assert '<span class="listed" data-signal="pdq">pdq 3</span>' in page
    assert 'id="readiness" class="ok"' in page


async def test_only_allowed_networks_reach_the_console(federation: Federation) -> None:
    config = dataclasses.replace(federation.data.config(), console_allow="10.0.0.0/8")
    access = ConsoleAccess(federation.data.console_tokens_file)
    server = TestServer(create_app(open_node(federation.data), config, access), host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(server.make_url("/console/login")) as reply,
        ):
            assert reply.status == 403
            assert (await reply.json(content_type=None))["type"].endswith("console-not-allowed")
    finally:
        await server.close()
