"""The OpenAPI 3.1 description of the v1 API, served as shipped at ``GET /v1/openapi.yaml``.

The canonical file is ``federation/hub/openapi.yaml``, package data, so an
installed hub (editable or not) serves it; ``docs/openapi.yaml`` is a copy
that ``tests/test_openapi.py`` keeps byte-equal. The bytes are served as they
are: the hub never parses YAML, so it needs no YAML library at run time.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from aiohttp import web

OPENAPI_FILE = "openapi.yaml"
OPENAPI_CONTENT_TYPE = "application/yaml"  # RFC 9512


@cache
def openapi_bytes() -> bytes:
    """The document exactly as shipped with the package (read once)."""
    return files(__package__).joinpath(OPENAPI_FILE).read_bytes()


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=openapi_bytes(), content_type=OPENAPI_CONTENT_TYPE, charset="utf-8")
