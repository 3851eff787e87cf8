"""docs/openapi.yaml: valid OpenAPI 3.1, served as shipped, and equal to the routes and answers of the code."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema_rs
import pytest
import schemathesis
import yaml
from aiohttp.test_utils import TestServer
from helpers import (
    COLLECTION,
    PROBLEM,
    Hub,
    Reply,
    assert_problem,
    batch_doc,
    envelope,
    flip,
    item,
    md5,
    open_hub,
    opinion_doc,
    pdq,
    sha256,
)

from federation import __version__
from federation.admin import add_collection
from federation.client import HubClient
from federation.envelope import Grant
from federation.hub.openapi import OPENAPI_CONTENT_TYPE, openapi_bytes
from federation.keys import SignerKey

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "federation" / "hub" / "openapi.yaml"
DOCS = ROOT / "docs" / "openapi.yaml"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def load_spec() -> dict[str, Any]:
    spec = yaml.safe_load(SHIPPED.read_bytes())
    assert isinstance(spec, dict)
    return spec


SPEC = load_spec()


def spec_operations(spec: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec["paths"].items()
        for method in item
        if method in HTTP_METHODS
    }


def resolve(spec: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/a/b``) to the object it names."""
    while "$ref" in node:
        target: Any = spec
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def schema_validator(spec: dict[str, Any], schema: dict[str, Any]) -> jsonschema_rs.Validator:
    """A JSON Schema 2020-12 validator for a schema of the spec, its ``$ref``s resolved in the spec."""
    root = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **schema,
        "components": spec["components"],
    }
    return jsonschema_rs.validator_for(root, validate_formats=True)


@pytest.fixture
async def hub(federation: Any, hub_server: TestServer, clients: dict[str, HubClient]) -> AsyncIterator[Hub]:
    async with aiohttp.ClientSession() as session:
        yield await open_hub(federation, hub_server, clients, session)


# ---- the document itself ------------------------------------------------------------


def test_docs_copy_is_the_shipped_file() -> None:
    """docs/openapi.yaml is for readers; the package ships federation/hub/openapi.yaml. They are one file."""
    assert DOCS.read_bytes() == SHIPPED.read_bytes(), (
        "docs/openapi.yaml differs from federation/hub/openapi.yaml; edit the latter and "
        "copy it: cp federation/hub/openapi.yaml docs/openapi.yaml"
    )
    assert openapi_bytes() == SHIPPED.read_bytes()


def test_is_valid_openapi_3_1() -> None:
    assert re.fullmatch(r"3\.1\.\d+", SPEC["openapi"])
    # The OpenAPI 3.1 meta-schema (schemathesis ships it and checks with jsonschema-rs).
    schemathesis.openapi.from_path(SHIPPED).validate()
    # That meta-schema does not look inside Schema Objects: check each as JSON Schema 2020-12, with
    # its references resolved and its patterns compiled.
    for name, schema in SPEC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
        schema_validator(SPEC, {"$ref": f"#/components/schemas/{name}"})
    for label, schema in inline_schemas(SPEC):
        assert jsonschema_rs.meta.is_valid(schema), label
        schema_validator(SPEC, schema)


def inline_schemas(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "schema" and isinstance(value, dict):
                    found.append((where, value))
                elif key != "schemas":
                    walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for position, value in enumerate(node):
                walk(value, f"{where}/{position}")

    walk(spec["paths"], "paths")
    walk(spec["components"], "components")
    return found


def test_version_is_the_package_version() -> None:
    assert SPEC["info"]["version"] == __version__


def test_every_operation_is_described() -> None:
    seen: set[str] = set()
    for method, path in spec_operations(SPEC):
        operation = SPEC["paths"][path][method.lower()]
        assert operation["operationId"] not in seen
        seen.add(operation["operationId"])
        assert operation.get("summary") and operation.get("description"), (method, path)
        assert "security" in operation, f"{method} {path}: say whether it is signed (security: [] if open)"
        statuses = set(operation["responses"])
        assert {"500", "503"} <= statuses, (method, path)
        assert any(status.startswith("2") for status in statuses), (method, path)
        if operation["security"]:
            assert {"400", "401", "403", "429"} <= statuses, (method, path)
        if "requestBody" in operation:
            assert {"408", "413"} <= statuses, (method, path)
        for parameter in [*SPEC["paths"][path].get("parameters", []), *operation.get("parameters", [])]:
            parameter = resolve(SPEC, parameter)
            if parameter["in"] == "path":
                assert "{" + parameter["name"] + "}" in path
                assert "404" in statuses, (method, path)


def test_problem_kinds_match_the_protocol_document_and_the_code() -> None:
    """Each problem kind of docs/protocol.md's table is documented under its status, and each kind
    documented is one the code answers (the hub's limits add some the protocol does not list)."""
    table = (ROOT / "docs" / "protocol.md").read_text()
    documented: set[tuple[str, int]] = set()
    for response in SPEC["components"]["responses"].values():
        schema = response["content"]["application/problem+json"]["schema"]
        (_, extra) = schema["allOf"]
        status = extra["properties"]["status"]["const"]
        kinds = extra["properties"]["type"].get("enum") or [extra["properties"]["type"]["const"]]
        documented |= {(kind.removeprefix("urn:hashfed:problem:"), status) for kind in kinds}
    listed = {
        (kind, int(status))
        for kind, status in re.findall(r"^\| `([a-z-]+)` \| ([45][0-9]{2}) \|", table, flags=re.MULTILINE)
    }
    assert listed, "the problem table of docs/protocol.md was not found"
    # 405 is answered for methods the document does not list, so no operation documents it.
    assert listed - {("method-not-allowed", 405)} <= documented
    source = "\n".join(path.read_text() for path in (ROOT / "federation").rglob("*.py"))
    invented = sorted(kind for kind, _ in documented if f'"{kind}"' not in source)
    assert not invented, f"problem kinds in the document that no code answers: {invented}"


# ---- the document and the code ----------------------------------------------------------


async def test_served_document_is_the_shipped_file(hub: Hub) -> None:
    reply = await hub.call("GET", "/v1/openapi.yaml")
    assert reply.status == 200
    assert reply.content_type == OPENAPI_CONTENT_TYPE
    assert reply.body == SHIPPED.read_bytes() == DOCS.read_bytes()
    head = await hub.send("HEAD", "/v1/openapi.yaml")
    assert head.status == 200 and head.body == b""


async def test_every_route_is_documented_and_every_operation_routed(hub_server: TestServer) -> None:
    routes: set[tuple[str, str]] = set()
    for route in hub_server.app.router.routes():
        routes.add((route.method, route.resource.canonical if route.resource is not None else ""))
    # aiohttp answers HEAD for each GET route (add_get(allow_head=True)); the document says so once.
    heads = {path for method, path in routes if method == "HEAD"}
    gets = {path for method, path in routes if method == "GET"}
    assert heads <= gets, f"HEAD routes without a GET: {sorted(heads - gets)}"
    routed = {(method, path) for method, path in routes if method != "HEAD"}
    documented = spec_operations(SPEC)
    assert routed - documented == set(), "routes missing from federation/hub/openapi.yaml"
    assert documented - routed == set(), (
        "operations in federation/hub/openapi.yaml that the hub does not route"
    )


async def test_methods_not_documented_are_405_problems_with_allow(hub: Hub) -> None:
    """RFC 9110 §15.5.6: a 405 MUST carry Allow, listing the methods the resource has."""
    for path, path_item in SPEC["paths"].items():
        allowed = {method.upper() for method in path_item if method in HTTP_METHODS}
        if "GET" in allowed:
            allowed.add("HEAD")
        concrete = path.replace("{collection}", COLLECTION)
        for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - allowed):
            reply = await hub.send(method, concrete)
            assert_problem(reply, 405, "method-not-allowed")
            advertised = {m.strip() for m in reply.headers.get("Allow", "").split(",") if m.strip()}
            assert advertised == allowed, f"{method} {concrete}: Allow is {reply.headers.get('Allow')!r}"


# ---- real answers conform to the document ---------------------------------------------------


class Conformance:
    """Check hub replies against the response the document gives for their operation and status."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.checked: set[tuple[str, str, int, str]] = set()

    def check(self, method: str, path: str, reply: Reply) -> Any:
        operation = self.spec["paths"][path][method.lower()]
        responses = operation["responses"]
        assert str(reply.status) in responses, f"{method} {path}: status {reply.status} is not documented"
        response = resolve(self.spec, responses[str(reply.status)])
        media = reply.content_type
        assert media in response["content"], f"{method} {path} {reply.status}: {media} is not documented"
        schema = response["content"][media]["schema"]
        self.checked.add((method, path, reply.status, media))
        if media == "application/x-ndjson":
            entry = schema_validator(self.spec, {"$ref": "#/components/schemas/IndexedEntry"})
            assert reply.body.endswith(b"\n") or not reply.body
            for line in reply.body.splitlines():
                entry.validate(json.loads(line))
            return reply.body
        if media.endswith("json"):
            value = reply.json()
        elif media == "application/yaml":
            value = yaml.safe_load(reply.body)
        else:
            value = reply.text
        errors = list(schema_validator(self.spec, schema).iter_errors(value))
        assert not errors, f"{method} {path} {reply.status}: {[str(e) for e in errors]}"
        return value


async def test_real_answers_conform(hub: Hub) -> None:
    """Drive every operation through its good path (and typical refusals): each answer matches the document."""
    spec = load_spec()
    conformance = Conformance(spec)
    check = conformance.check
    entries = "/v1/collections/{collection}/entries"
    concrete = f"/v1/collections/{COLLECTION}/entries"
    h = pdq(7)

    for path in ("/v1/health", "/v1/ready", "/v1/hub", "/v1/peers", "/v1/sources", "/v1/openapi.yaml"):
        check("GET", path, await hub.call("GET", path))

    batch = envelope(
        hub.members["acme"],
        batch_doc(
            "acme", [item("pdq", h, ["a", "b"], quality=80), item("md5", md5(1)), item("sha256", sha256(1))]
        ),
    )
    created = check("POST", entries, await hub.post(batch))
    assert check("POST", entries, await hub.post(batch)) == created
    await hub.submit("reader", opinion_doc("reader", [("pdq", h, "negative")]))
    size = await hub.size()

    page = check("GET", entries, await hub.call("GET", concrete, "reader", query="start=0&limit=2"))
    assert [e["index"] for e in page["entries"]] == [0, 1]
    check("GET", entries, await hub.call("GET", concrete, "reader", accept="application/x-ndjson"))
    check("GET", entries, await hub.call("GET", concrete, "reader", query=f"start={size}"))
    check("GET", entries, await hub.call("GET", concrete, "reader", query="start=x"))
    check("GET", entries, await hub.call("GET", concrete, None))
    check("GET", entries, await hub.call("GET", concrete, "outsider"))
    # outsider becomes a member of another collection only: known, but without rights on main.
    add_collection(hub.data, "other", [Grant(hub.members["outsider"].verifier, frozenset({"read"}))])
    check("GET", entries, await hub.call("GET", concrete, "outsider"))
    check("GET", entries, await hub.call("GET", "/v1/collections/nope/entries", "reader"))

    checkpoint = "/v1/collections/{collection}/checkpoint"
    check("GET", checkpoint, await hub.call("GET", f"/v1/collections/{COLLECTION}/checkpoint"))
    check("GET", checkpoint, await hub.call("GET", "/v1/collections/nope/checkpoint"))

    inclusion = "/v1/collections/{collection}/proof/inclusion"
    consistency = "/v1/collections/{collection}/proof/consistency"
    base = f"/v1/collections/{COLLECTION}/proof"
    check(
        "GET", inclusion, await hub.call("GET", f"{base}/inclusion", "reader", query=f"index=1&size={size}")
    )
    check(
        "GET",
        inclusion,
        await hub.call("GET", f"{base}/inclusion", "reader", query=f"index={size}&size={size}"),
    )
    check(
        "GET", consistency, await hub.call("GET", f"{base}/consistency", "reader", query=f"old=1&new={size}")
    )
    check("GET", consistency, await hub.call("GET", f"{base}/consistency", "reader", query="old=1"))

    answer = check(
        "POST", "/v1/lookup", await hub.lookup([("pdq", flip(h, 3)), ("md5", md5(1)), ("md5", md5(2))])
    )
    assert [len(result["matches"]) for result in answer["results"]] == [1, 1, 0]
    check("POST", "/v1/lookup", await hub.lookup([("pdq", "zz")]))
    check("POST", "/v1/lookup", await hub.lookup([("pdq", h)], collections=["nope"]))
    check("POST", "/v1/lookup", await hub.call("POST", "/v1/lookup", "reader", body=b"{"))
    check("POST", "/v1/lookup", await hub.lookup([("md5", md5(1))], "outsider", collections=[COLLECTION]))

    stale = envelope(hub.members["acme"], batch_doc("acme", [item("md5", md5(3))], seq=1))
    check("POST", entries, await hub.post(stale))
    not_listed = envelope(hub.members["beta"], batch_doc("beta", remove=[("md5", md5(1))]))
    check("POST", entries, await hub.post(not_listed, "beta"))
    check("POST", entries, await hub.post(batch, "outsider"))
    check("POST", entries, await hub.post(batch, SignerKey.generate("stranger")))
    check("POST", entries, await hub.post(b'{"payload":1}'))

    statuses = {(method, status) for method, _, status, _ in conformance.checked}
    wanted = {("POST", 201), ("POST", 200), ("POST", 409), ("POST", 422), ("POST", 403), ("POST", 401)}
    assert wanted | {("GET", 401), ("GET", 403), ("GET", 404), ("GET", 400)} <= statuses


async def test_problem_answers_are_exactly_rfc_9457(hub: Hub) -> None:
    reply = await hub.call("GET", "/v1/no-such-endpoint")
    problem = assert_problem(reply, 404, "not-found")
    errors = list(schema_validator(SPEC, {"$ref": "#/components/schemas/Problem"}).iter_errors(problem))
    assert not errors
    assert reply.content_type == PROBLEM
