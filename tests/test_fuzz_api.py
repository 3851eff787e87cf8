"""Fuzzing the HTTP API from its OpenAPI description (schemathesis) and the parsers behind it (hypothesis).

Each operation of docs/openapi.yaml gets schemathesis-generated requests, valid
and invalid, against a live hub on loopback, signed (RFC 9421) by a member, the
hub, a key the hub does not know, or not at all. Whatever comes back:

- never a 5xx;
- every 4xx is an RFC 9457 problem (``application/problem+json`` with
  ``type``, ``title``, ``status`` and ``detail``);
- the answer is one the document describes (status, media type, schema);
- a refused request changes nothing: the hub's collections, every
  collection's checkpoint and the lookup answers for the listed hashes are
  the same after it as before the fuzzing started.

Schemathesis and its requests are synchronous while the hub runs on the test's
event loop, so the fuzzing runs in a worker thread (``asyncio.to_thread``).
Requests are signed at the transport: a ``requests`` auth hook signs the
prepared request, the exact method, path, query and body bytes that go on the
wire, as the hub will see them.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
import schemathesis
from aiohttp.test_utils import TestServer
from helpers import (
    COLLECTION,
    PROBLEM_PREFIX,
    Hub,
    Reply,
    assert_problem,
    batch_doc,
    fresh_seq,
    item,
    md5,
    open_hub,
    opinion_doc,
    pdq,
    sha256,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.parameters import ParameterLocation
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from federation.admin import add_collection
from federation.client import HubClient
from federation.envelope import (
    BATCH_TYPE,
    MEMBERSHIP_TYPE,
    OPINION_TYPE,
    Envelope,
    Grant,
    Signature,
    compact_json,
    sign_envelope,
    utc_now,
)
from federation.httpsig import sign_request
from federation.keys import SignerKey
from federation.signals import SIGNAL_TYPES, SignalError, signal_type

SPEC_FILE = Path(__file__).resolve().parent.parent / "federation" / "hub" / "openapi.yaml"
MAX_EXAMPLES = 50
"""Per operation; the whole file stays well under a minute."""

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

LISTED = [("pdq", pdq(1)), ("md5", md5(1)), ("sha256", sha256(1)), ("pdq", pdq(2))]
"""Listed in the fuzzed hub; the lookup part of the state snapshot asks for these."""

fuzz_settings = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)


# ---- signing at the transport -------------------------------------------------------------


class HttpSignature(requests.auth.AuthBase):
    """Sign a prepared request with RFC 9421 (federation.httpsig), replacing any signature headers on it."""

    def __init__(self, key: SignerKey) -> None:
        self.key = key

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        assert isinstance(body, bytes), "streamed bodies are not signed here"
        path, _, query = (request.path_url or "/").partition("?")
        for name in ("Signature", "Signature-Input", "Content-Digest"):
            request.headers.pop(name, None)
        request.headers.update(sign_request(self.key, request.method or "GET", path, query, body))
        return request


# ---- the hub under test and what a refusal must leave alone ---------------------------------


@dataclass
class Target:
    url: str
    keys: dict[str, SignerKey | None]
    """Who may sign a fuzzed request: members, the hub, a stranger, or no one (None)."""
    hub_key: SignerKey
    session: requests.Session = field(default_factory=requests.Session)
    observer: requests.Session = field(default_factory=requests.Session)

    def snapshot(self) -> Any:
        """Everything a refused request must not change, in a few cheap reads."""
        info = self.observer.get(f"{self.url}/v1/hub", timeout=10)
        assert info.status_code == 200, info.text
        collections = info.json()["collections"]
        notes = []
        for collection in collections:
            note = self.observer.get(f"{self.url}/v1/collections/{collection}/checkpoint", timeout=10)
            assert note.status_code == 200, note.text
            notes.append(note.text)
        query = {"queries": [{"type": t, "hash": h} for t, h in LISTED], "max_distance": 63}
        answer = self.observer.post(
            f"{self.url}/v1/lookup",
            data=json.dumps(query).encode(),
            auth=HttpSignature(self.hub_key),
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return collections, notes, answer.json()


@pytest.fixture
async def target(
    federation: Any, hub_server: TestServer, clients: dict[str, HubClient]
) -> AsyncIterator[Target]:
    """A hub with listed hashes and opinions in ``main``, and a second collection only ``outsider`` reads."""
    async with aiohttp.ClientSession() as session:
        hub: Hub = await open_hub(federation, hub_server, clients, session)
        adds = [item(t, h, ["fuzz"], quality=90 if t == "pdq" else None) for t, h in LISTED[:3]]
        await hub.submit("acme", batch_doc("acme", adds))
        await hub.submit("beta", batch_doc("beta", [item(*LISTED[3], ["other"])]))
        await hub.submit("reader", opinion_doc("reader", [(LISTED[0][0], LISTED[0][1], "positive")]))
        add_collection(hub.data, "other", [Grant(hub.members["outsider"].verifier, frozenset({"read"}))])
        keys: dict[str, SignerKey | None] = {name: key for name, key in hub.members.items()}
        keys |= {"hub": hub.hub_signer, "stranger": SignerKey.generate("stranger"), "unsigned": None}
        made = Target(hub.url, keys, hub.hub_signer)
        yield made
        made.session.close()
        made.observer.close()


def refusal_kind(status: int, headers: Mapping[str, str], body: bytes, where: str) -> str:
    """Check that a 4xx answer is an RFC 9457 problem with exactly its four members; return its kind."""
    lowered = {name.lower(): value for name, value in headers.items()}
    media_type = lowered.get("content-type", "").split(";")[0].strip()
    try:
        problem = assert_problem(Reply(status, media_type, lowered, body), status)
        assert set(problem) == {"type", "title", "status", "detail"}, problem
    except AssertionError as exc:
        raise AssertionError(f"{where}: {exc}") from None
    return str(problem["type"]).removeprefix(PROBLEM_PREFIX)


# ---- schemathesis, one test per operation ------------------------------------------------------


def _operations() -> list[str]:
    """The labels (``METHOD /path``) of the document's operations, read from the shipped file."""
    labels = []
    for result in schemathesis.openapi.from_path(SPEC_FILE).get_all_operations():
        assert isinstance(result, Ok), result
        labels.append(result.ok().label)
    return sorted(labels)


def _strategies(operation: Any) -> st.SearchStrategy[Any]:
    has_input = bool(operation.body) or any(
        parameter.location is not ParameterLocation.HEADER for parameter in operation.iter_parameters()
    )
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if has_input else [GenerationMode.POSITIVE]
    options = [operation.as_strategy(mode) for mode in modes]
    if any(parameter.name == "collection" for parameter in operation.path_parameters):
        # Random names are unknown collections (404 before anything else); aim at real ones too.
        for mode in modes:
            for collection in (COLLECTION, "other"):
                options.append(operation.as_strategy(mode, path_parameters={"collection": collection}))
    return st.one_of(options)


def still_invalid(case: Any, *, signed: bool) -> bool:
    """Whether a negative case is still invalid as sent, so the hub must refuse it.

    Signing replaces the signature headers, the only declared headers; and unknown query parameters
    or headers are ignored, as HTTP servers do (the document does not forbid them). A query said to
    miss a required parameter is judged by what is sent: schemathesis sometimes reports that
    mutation together with an extra parameter while the required ones are still there.
    """
    if case.meta is None or not case.meta.generation.mode.is_negative:
        return False
    sent = case.query or {}
    required = {parameter.name for parameter in case.operation.query if parameter.is_required}
    for mutation in getattr(case.meta.phase.data, "mutations", ()):
        location = mutation.parameter_location
        if location is ParameterLocation.HEADER and signed:
            continue
        keywords = set(mutation.keywords) - {"additionalProperties"}
        if location in (ParameterLocation.QUERY, ParameterLocation.HEADER) and not keywords:
            continue
        if location is ParameterLocation.QUERY and keywords == {"required"} and required <= set(sent):
            continue
        return True
    return False


def fuzz_operation(target: Target, label: str) -> dict[str, int]:
    """Run schemathesis against one operation of the served document; return the statuses seen."""
    schema = schemathesis.openapi.from_url(f"{target.url}/v1/openapi.yaml")
    operation = schema.find_operation_by_label(label)
    assert operation is not None, label
    baseline = target.snapshot()
    seen: dict[str, int] = {}
    who_names = sorted(target.keys)

    @fuzz_settings
    @given(
        case=_strategies(operation),
        who=st.sampled_from(who_names),
        accept=st.sampled_from([None, "application/x-ndjson", "application/json, application/x-ndjson"]),
    )
    def run(case: Any, who: str, accept: str | None) -> None:
        nonlocal baseline
        negative = case.meta is not None and case.meta.generation.mode.is_negative
        negated = {
            location
            for location, component in (case.meta.components if case.meta is not None else {}).items()
            if component.mode.is_negative
        }
        key = target.keys[who]
        # The only declared headers are the signature's: when they are all that is invalid, send them as
        # generated rather than sign over them, so the request stays the invalid one it was made to be.
        auth = HttpSignature(key) if key is not None and negated != {ParameterLocation.HEADER} else None
        extra = {"Accept": accept} if accept is not None else None
        response = case.call(
            base_url=target.url, session=target.session, auth=auth, headers=extra, timeout=30
        )
        status = response.status_code
        signer = "unsigned" if auth is None else who
        where = f"{case.method} {case.formatted_path} ({signer}, {'negative' if negative else 'positive'})"
        seen[f"{status}"] = seen.get(f"{status}", 0) + 1

        assert status < 500, f"{where}: {status} {response.content[:500]!r}"
        if status >= 400:
            headers = {name: values[0] for name, values in response.headers.items()}
            refusal_kind(status, headers, response.content, where)
            assert target.snapshot() == baseline, (
                f"{where}: refused with {status}, yet the hub's state changed"
            )
        elif status == 201:
            baseline = target.snapshot()  # an accepted entry (not expected from random signatures)
        checks = (
            [*CHECKS, negative_data_rejection] if still_invalid(case, signed=auth is not None) else CHECKS
        )
        case.validate_response(response, checks=checks)

    run()
    return seen


@pytest.mark.parametrize("label", _operations())
async def test_schemathesis(target: Target, label: str) -> None:
    seen = await asyncio.to_thread(fuzz_operation, target, label)
    assert seen, label
    if "{collection}" in label or label.endswith("/v1/lookup"):
        # Signed requests get past authentication: not everything is 401 or 404.
        assert set(seen) - {"401", "404"}, f"{label}: only {seen}"


# ---- hypothesis: parsers behind the endpoints -------------------------------------------------------

text_or_json = st.one_of(
    st.text(max_size=80),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=30, max_size=66),
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.lists(st.text(max_size=4), max_size=3),
    st.binary(max_size=40),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SIGNAL_TYPES)), text_or_json)
def test_signal_parse_raises_only_signal_error(name: str, value: Any) -> None:
    signal = SIGNAL_TYPES[name]
    try:
        parsed = signal.parse(value)
    except SignalError:
        return
    assert isinstance(value, str)
    assert len(parsed) == signal.hex_length and parsed == value.lower()
    assert set(parsed) <= set("0123456789abcdef")
    assert signal.parse(parsed) == parsed
    assert signal.parse(parsed.upper()) == parsed


@settings(max_examples=100, deadline=None)
@given(text_or_json)
def test_signal_type_names_raise_only_signal_error(value: Any) -> None:
    try:
        signal = signal_type(value)
    except SignalError:
        return
    assert value in SIGNAL_TYPES and signal is SIGNAL_TYPES[value]


lookup_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from([*SIGNAL_TYPES, pdq(1), md5(1), sha256(1), pdq(1).upper(), COLLECTION, "other", 31]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
query_objects = st.fixed_dictionaries(
    {"type": st.sampled_from([*SIGNAL_TYPES, "PDQ", "x"]), "hash": lookup_values}
) | st.dictionaries(st.sampled_from(["type", "hash", "distance"]), lookup_values, max_size=3)
lookup_bodies = st.fixed_dictionaries(
    {"queries": st.lists(query_objects, max_size=4)},
    optional={
        "max_distance": st.integers(-2, 70) | lookup_values,
        "collections": st.lists(st.sampled_from([COLLECTION, "other", "nope", "x:y"]), max_size=3)
        | lookup_values,
        "extra": lookup_values,
    },
)


def fuzz_lookup_bodies(target: Target) -> dict[int, int]:
    baseline = target.snapshot()
    statuses: dict[int, int] = {}
    encoders: list[Callable[[Any], bytes]] = [
        lambda value: json.dumps(value).encode(),
        lambda value: json.dumps(value, indent=1, ensure_ascii=False).encode(),
    ]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        body=st.one_of(lookup_bodies, lookup_values).flatmap(
            lambda value: st.sampled_from(encoders).map(lambda encode: encode(value))
        )
        | st.binary(max_size=64),
        who=st.sampled_from(["reader", "acme", "outsider", "hub"]),
    )
    def run(body: bytes, who: str) -> None:
        key = target.keys[who]
        assert key is not None
        response = target.session.post(
            f"{target.url}/v1/lookup", data=body, auth=HttpSignature(key), timeout=30
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code in (200, 400, 403, 404), (body, response.status_code, response.text)
        if response.status_code != 200:
            refusal_kind(response.status_code, response.headers, response.content, f"lookup {body[:200]!r}")
            return
        answer = response.json()
        queries = json.loads(body)["queries"]
        assert len(answer["results"]) == len(queries)

    run()
    assert target.snapshot() == baseline
    return statuses


async def test_lookup_bodies_over_http(target: Target) -> None:
    """Arbitrary lookup bodies, signed: 200 or a 4xx problem, never anything else, and nothing changes."""
    statuses = await asyncio.to_thread(fuzz_lookup_bodies, target)
    assert 200 in statuses and 400 in statuses, statuses


# ---- hypothesis: signed envelopes over HTTP, near-valid ------------------------------------------------

DELETE = object()
"""A mutation that removes the field."""

ENVELOPE_SIGNERS = ["acme", "beta", "reader", "outsider", "hub", "stranger"]
HASH_POOL = [*LISTED, ("md5", md5(2)), ("pdq", pdq(3)), ("sha256", sha256(2))]
MUTATION_FIELDS = ["v", "federation", "collection", "member", "seq", "created", "add", "remove", "opinions"]
MUTATION_FIELDS += ["grant", "revoke", "note"]
mutation_values = st.sampled_from(
    [
        DELETE,
        0,
        2,
        -1,
        True,
        2**53,
        1.5,
        None,
        "",
        "testfed",
        "elsewhere",
        COLLECTION,
        "other",
        "acme",
        "beta",
        "x" * 65,
        "2026-02-30T00:00:00Z",
        "2026-11-21T19:00:00+00:00",
        [],
        {},
        [{"type": "pdq", "hash": "zz"}],
        [{"type": "pdq", "hash": pdq(4), "labels": ["a"] * 40}],
        [{"type": "md5", "hash": md5(5), "quality": 90}],
        [{"type": "pdq", "hash": pdq(5), "quality": 10}],
    ]
)


@dataclass
class Submission:
    kind: str
    signer: str
    relay: str
    collection: str
    hashes: list[tuple[str, str]]
    remove: bool
    verdict: str
    mutation: tuple[str, Any] | None
    wrong_type: bool
    tamper: bool
    resend: bool


def planned(
    kind: str,
    signer: str,
    *,
    hashes: list[tuple[str, str]] | None = None,
    remove: bool = False,
    mutation: tuple[str, Any] | None = None,
    tamper: bool = False,
    resend: bool = False,
) -> Submission:
    """An explicit submission: signed and relayed by ``signer``, to ``main``."""
    return Submission(
        kind, signer, "signer", COLLECTION, hashes or [], remove, "positive", mutation, False, tamper, resend
    )


rarely = st.sampled_from([False] * 9 + [True])
submissions = st.builds(
    Submission,
    kind=st.sampled_from(["batch", "batch", "opinion", "membership"]),
    signer=st.sampled_from(ENVELOPE_SIGNERS),
    relay=st.sampled_from(["signer", "signer", "signer", *ENVELOPE_SIGNERS, "unsigned"]),
    collection=st.sampled_from([COLLECTION, COLLECTION, "other", "nope"]),
    hashes=st.lists(st.sampled_from(HASH_POOL), max_size=3, unique=True),
    remove=st.booleans(),
    verdict=st.sampled_from(["positive", "negative", "withdrawn"]),
    mutation=st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(MUTATION_FIELDS), mutation_values)),
    wrong_type=rarely,
    tamper=rarely,
    resend=rarely,
)


def submission_body(target: Target, plan: Submission) -> bytes:
    signer = target.keys[plan.signer]
    assert signer is not None
    header = {
        "v": 1,
        "federation": "testfed",
        "collection": plan.collection,
        "seq": fresh_seq(),
        "created": utc_now(),
    }
    doc: dict[str, Any]
    if plan.kind == "batch":
        listed = [item(t, h, ["fuzz"]) for t, h in plan.hashes]
        removed = [{"type": t, "hash": h} for t, h in plan.hashes]
        doc = {**header, "member": signer.name, "add": [] if plan.remove else listed}
        doc["remove"] = removed if plan.remove else []
        payload_type = BATCH_TYPE
    elif plan.kind == "opinion":
        opinions = [{"type": t, "hash": h, "verdict": plan.verdict} for t, h in plan.hashes]
        doc = {**header, "member": signer.name, "opinions": opinions}
        payload_type = OPINION_TYPE
    else:
        stranger = target.keys["stranger"]
        assert stranger is not None
        grant = [{"member": "stranger", "key": stranger.verifier.encode(), "rights": ["read"]}]
        revoke = [{"key": stranger.key_id}]
        doc = {**header, "grant": [] if plan.remove else grant, "revoke": revoke if plan.remove else []}
        payload_type = MEMBERSHIP_TYPE
    if plan.mutation is not None:
        name, value = plan.mutation
        if value is DELETE:
            doc.pop(name, None)
        else:
            doc[name] = value
    if plan.wrong_type:
        payload_type = {BATCH_TYPE: OPINION_TYPE, OPINION_TYPE: MEMBERSHIP_TYPE}.get(payload_type, BATCH_TYPE)
    made = sign_envelope(signer, payload_type, compact_json(doc))
    if plan.tamper:
        sig = bytearray(made.signatures[0].sig)
        sig[0] ^= 1
        made = Envelope(made.payload, made.payload_type, (Signature(made.signatures[0].keyid, bytes(sig)),))
    return made.canonical()


def fuzz_envelopes(target: Target) -> dict[str, int]:
    baseline = target.snapshot()
    seen: dict[str, int] = {}
    accepted: list[tuple[str, str, bytes]] = []

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(submission=submissions)
    @example(submission=planned("batch", "acme", hashes=[LISTED[0]]))  # 201
    @example(submission=planned("batch", "acme", hashes=[LISTED[0]], resend=True))  # 200: the same again
    @example(submission=planned("opinion", "reader", hashes=[LISTED[1]]))  # 201
    @example(submission=planned("membership", "hub"))  # 201: stranger may now read main
    @example(submission=planned("batch", "acme", hashes=[LISTED[0]], mutation=("seq", 2)))  # 409 stale-seq
    @example(submission=planned("batch", "beta", hashes=[HASH_POOL[4]], remove=True))  # 422 not-listed
    @example(
        submission=planned("batch", "acme", hashes=[LISTED[0]], tamper=True)
    )  # 400 bad-envelope-signature
    @example(submission=planned("batch", "reader", hashes=[LISTED[0]]))  # 403 missing-right
    @example(
        submission=planned("opinion", "acme", hashes=[LISTED[0]], mutation=("member", "beta"))
    )  # 403 wrong-member
    def run(submission: Submission) -> None:
        nonlocal baseline
        plan = submission
        collection, relay = plan.collection, plan.signer if plan.relay == "signer" else plan.relay
        if plan.resend and accepted:
            collection, relay, body = accepted[-1]
        else:
            body = submission_body(target, plan)
        key = target.keys[relay]
        response = target.session.post(
            f"{target.url}/v1/collections/{collection}/entries",
            data=body,
            auth=HttpSignature(key) if key is not None else None,
            timeout=30,
        )
        status = response.status_code
        where = f"{plan} -> {status} {response.text[:300]}"
        assert status in (200, 201) or 400 <= status < 500, where
        after = target.snapshot()
        if status == 201:
            accepted.append((collection, relay, body))
            assert after != baseline, where  # the checkpoint moved
            baseline = after
            seen["201"] = seen.get("201", 0) + 1
            return
        assert after == baseline, where
        if status == 200:
            seen["200"] = seen.get("200", 0) + 1
            return
        kind = refusal_kind(status, response.headers, response.content, where)
        seen[f"{status} {kind}"] = seen.get(f"{status} {kind}", 0) + 1

    run()
    return seen


async def test_signed_envelopes_over_http(target: Target) -> None:
    """Envelopes signed by members, the hub and strangers, near-valid or broken in one place, relayed by anyone:
    2xx or a 4xx problem; a 201 moves the checkpoint, anything else changes nothing."""
    seen = await asyncio.to_thread(fuzz_envelopes, target)
    assert "201" in seen and len(seen) >= 6, seen
