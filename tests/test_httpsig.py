"""Tests for federation.httpsig: RFC 9421 request signatures and RFC 9530 Content-Digest.

Refusal tests mostly build a correctly signed request whose only fault is the
one under test (see ``custom_headers``), so each fails if its check is removed
instead of passing because the signature happens to break.
"""

from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from federation.httpsig import (
    MAX_CLOCK_SKEW,
    SIGNATURE_LABEL,
    ReplayGuard,
    SignatureRefused,
    VerifiedRequest,
    content_digest,
    sign_request,
    verify_request,
)
from federation.keys import SignerKey, VerifierKey

NOW = 1_700_000_000
SIGNER = SignerKey("acme", bytes(range(32)))
KEY_ID = "acme+3cc396f7"
OTHER = SignerKey("globex", bytes(range(1, 33)))
PATH = "/v1/collections/main/entries"
BODY = b'{"hello": "world"}'
# RFC 9530 §2 gives this digest for the body {"hello": "world"}.
BODY_DIGEST = "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:"
EMPTY_DIGEST = "sha-256=:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=:"
PARAMS = f';created={NOW};keyid="{KEY_ID}"'


def resolve(key_id: str) -> VerifierKey | None:
    keys = {SIGNER.key_id: SIGNER.verifier, OTHER.key_id: OTHER.verifier}
    return keys.get(key_id)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def verify(
    headers: Mapping[str, str],
    *,
    method: str = "POST",
    path: str = PATH,
    query: str = "",
    body: bytes = BODY,
    now: int = NOW,
) -> VerifiedRequest:
    return verify_request(
        method=method,
        path=path,
        query=query,
        headers=headers,
        body=body,
        resolve_key=resolve,
        now=now,
    )


def refused(headers: Mapping[str, str], match: str, status: int = 401, **request: object) -> None:
    with pytest.raises(SignatureRefused, match=match) as info:
        verify(headers, **request)  # type: ignore[arg-type]
    assert info.value.status == status
    assert info.value.detail == str(info.value)


def custom_headers(
    components: list[tuple[str, str]],
    params: str = PARAMS,
    *,
    digest: str | None = BODY_DIGEST,
    signer: SignerKey = SIGNER,
    label: str = SIGNATURE_LABEL,
) -> dict[str, str]:
    """Sign an arbitrary Signature-Input by building its base by hand (independently of httpsig)."""
    inner = "(" + " ".join(f'"{name}"' for name, _ in components) + ")" + params
    lines = [f'"{name}": {value}' for name, value in components]
    lines.append(f'"@signature-params": {inner}')
    signature = signer.sign("\n".join(lines).encode())
    headers = {"Signature-Input": f"{label}={inner}", "Signature": f"{label}=:{b64(signature)}:"}
    if digest is not None:
        headers["Content-Digest"] = digest
    return headers


BASE = [("@method", "POST"), ("@path", PATH), ("@query", "?")]
WITH_DIGEST = [*BASE, ("content-digest", BODY_DIGEST)]


def signed(**overrides: object) -> dict[str, str]:
    request: dict[str, object] = {
        "method": "POST",
        "path": PATH,
        "query": "",
        "body": BODY,
        "created": NOW,
    }
    request.update(overrides)
    return sign_request(SIGNER, **request)  # type: ignore[arg-type]


# --- the format, pinned --------------------------------------------------------


def test_key_fixture() -> None:
    assert SIGNER.key_id == KEY_ID


def test_content_digest_matches_rfc9530_example() -> None:
    assert content_digest(BODY) == BODY_DIGEST
    assert content_digest(b"") == EMPTY_DIGEST


def test_signature_base_with_body_is_pinned() -> None:
    headers = sign_request(SIGNER, "post", PATH, "", BODY, created=NOW, nonce="n0nce")
    expected_input = (
        'sig1=("@method" "@path" "@query" "content-digest")'
        ';created=1700000000;keyid="acme+3cc396f7";alg="ed25519";nonce="n0nce"'
    )
    expected_base = (
        '"@method": POST\n'
        '"@path": /v1/collections/main/entries\n'
        '"@query": ?\n'
        '"content-digest": sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:\n'
        '"@signature-params": ("@method" "@path" "@query" "content-digest")'
        ';created=1700000000;keyid="acme+3cc396f7";alg="ed25519";nonce="n0nce"'
    )
    assert headers == {
        "Content-Digest": BODY_DIGEST,
        "Signature-Input": expected_input,
        # Ed25519 is deterministic, so the signature pins the base byte for byte.
        "Signature": f"sig1=:{b64(SIGNER.sign(expected_base.encode()))}:",
    }
    assert verify(headers).key_id == KEY_ID


def test_signature_base_without_body_is_pinned() -> None:
    headers = sign_request(SIGNER, "GET", PATH, "start=0&limit=10", None, created=NOW, nonce="abc")
    expected_base = (
        '"@method": GET\n'
        '"@path": /v1/collections/main/entries\n'
        '"@query": ?start=0&limit=10\n'
        '"@signature-params": ("@method" "@path" "@query")'
        ';created=1700000000;keyid="acme+3cc396f7";alg="ed25519";nonce="abc"'
    )
    assert headers == {
        "Signature-Input": (
            'sig1=("@method" "@path" "@query")'
            ';created=1700000000;keyid="acme+3cc396f7";alg="ed25519";nonce="abc"'
        ),
        "Signature": f"sig1=:{b64(SIGNER.sign(expected_base.encode()))}:",
    }
    result = verify(headers, method="GET", query="start=0&limit=10", body=b"")
    assert result == VerifiedRequest(
        key_id=KEY_ID, created=NOW, signature=SIGNER.sign(expected_base.encode()), key=SIGNER.verifier
    )


def test_empty_path_is_signed_as_slash() -> None:
    headers = custom_headers([("@method", "GET"), ("@path", "/"), ("@query", "?")], digest=None)
    assert verify(headers, method="GET", path="", body=b"").key_id == KEY_ID


def test_fresh_nonce_makes_identical_requests_differ() -> None:
    first = sign_request(SIGNER, "GET", PATH, "", None, created=NOW)
    second = sign_request(SIGNER, "GET", PATH, "", None, created=NOW)
    assert first["Signature"] != second["Signature"]
    assert verify(first, method="GET", body=b"").created == NOW


def test_sign_request_defaults_created_to_now() -> None:
    headers = sign_request(SIGNER, "GET", "/v1/hub", "", b"")
    assert "Content-Digest" not in headers
    verify_request(
        method="GET",
        path="/v1/hub",
        query="",
        headers=headers,
        body=b"",
        resolve_key=resolve,
        now=int(time.time()),
    )


# --- round trip ---------------------------------------------------------------

visible = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "get", "Post"]) | st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=10
)
paths = st.text(alphabet=visible, max_size=60).map(lambda text: "/" + text.replace("?", "%3F"))
queries = st.text(alphabet=visible, max_size=60)


@settings(max_examples=200, deadline=None)
@given(
    method=methods,
    path=paths,
    query=queries,
    body=st.binary(max_size=300),
    offset=st.integers(-MAX_CLOCK_SKEW, MAX_CLOCK_SKEW),
)
def test_round_trip(method: str, path: str, query: str, body: bytes, offset: int) -> None:
    headers = sign_request(SIGNER, method, path, query, body, created=NOW + offset)
    assert ("Content-Digest" in headers) == bool(body)
    # The hub hands over aiohttp's case-insensitive multidict proxy.
    proxy = CIMultiDictProxy(CIMultiDict((name.lower(), value) for name, value in headers.items()))
    for given_headers in (headers, proxy):
        result = verify_request(
            method=method,
            path=path,
            query=query,
            headers=given_headers,
            body=body,
            resolve_key=resolve,
            now=NOW,
        )
        assert result.key_id == KEY_ID
        assert result.created == NOW + offset


def test_other_labels_and_extra_params_are_accepted() -> None:
    headers = custom_headers(WITH_DIGEST, PARAMS + ';expires=1700000060;nonce="x";tag="hashfed"')
    headers["Signature-Input"] = 'sig0=("@method");created=1, ' + headers["Signature-Input"]
    headers["Signature"] += ", sig2=:AAAA:"
    assert verify(headers).key_id == KEY_ID


def test_field_lines_are_combined() -> None:
    headers = CIMultiDict(custom_headers(WITH_DIGEST))
    headers.add("signature", "other=:AAAA:")
    assert verify(CIMultiDictProxy(headers)).key_id == KEY_ID


def test_empty_body_with_covered_digest_is_verified() -> None:
    components = [*BASE, ("content-digest", EMPTY_DIGEST)]
    headers = custom_headers(components, digest=EMPTY_DIGEST)
    assert verify(headers, body=b"").key_id == KEY_ID
    wrong = custom_headers([*BASE, ("content-digest", BODY_DIGEST)])
    refused(wrong, "digest of the body does not match", status=400, body=b"")


def test_uncovered_digest_without_body_is_ignored() -> None:
    headers = custom_headers(BASE, digest="sha-256=:AAAA:")
    assert verify(headers, body=b"").key_id == KEY_ID


def test_other_digest_algorithms_may_be_listed() -> None:
    digest = f"sha-512=:{b64(bytes(64))}:, {BODY_DIGEST}"
    headers = custom_headers([*BASE, ("content-digest", digest)], digest=digest)
    assert verify(headers).key_id == KEY_ID


def test_unpadded_base64_is_accepted() -> None:
    headers = signed()
    headers["Signature"] = headers["Signature"].replace("=", "").replace("sig1", "sig1=", 1)
    assert verify(headers).key_id == KEY_ID


# --- refusals -------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["Signature", "Signature-Input"])
def test_missing_header(missing: str) -> None:
    headers = signed()
    del headers[missing]
    refused(headers, f"no {missing} header")


def test_no_sig1_label() -> None:
    headers = custom_headers(WITH_DIGEST, label="sig2")
    refused(headers, "no sig1 member .labels found: sig2")


def test_sig1_only_in_signature_input() -> None:
    headers = signed()
    headers["Signature"] = headers["Signature"].replace("sig1", "sig2")
    refused(headers, "Signature header has no sig1 member")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("Signature-Input", 'sig1=("@method" "@path"', "not closed"),
        ("Signature-Input", 'sig1=("@method" "@path" "@query");created=1.5', "decimal"),
        ("Signature-Input", "sig1", "has no value"),
        ("Signature-Input", 'SIG1=("@method")', "expected a key"),
        ("Signature-Input", 'sig1=("@method"),', "ends with a ','"),
        ("Signature-Input", 'sig1=("@method") x', "expected ','"),
        ("Signature-Input", 'sig1=("@method" @path)', "dates are not used"),
        ("Signature-Input", "sig1=(@method)", "dates are not used"),
        ("Signature-Input", "sig1=(method)", "must be strings"),
        ("Signature-Input", 'sig1=("@method""@path")', "space or '.'"),
        ("Signature-Input", 'sig1=("@method");created=1;created=2', "more than once"),
        ("Signature-Input", 'sig1=("a"), sig1=("b")', "more than once"),
        ("Signature-Input", 'sig1=("a");keyid="x\\y"', "may be escaped"),
        ("Signature-Input", 'sig1=("a");keyid="caf\u00e9"', "printable ASCII"),
        ("Signature-Input", 'sig1=("a");keyid=:AAAA:', "byte sequence"),
        ("Signature-Input", 'sig1=("a");created=1234567890123456', "at most 15 digits"),
        ("Signature-Input", 'sig1=("a");nonce=%"x"', "display strings"),
        ("Signature-Input", 'sig1=("a");flag=?2', "boolean"),
        ("Signature-Input", 'sig1=("a");n=-', "expected a digit"),
        ("Signature-Input", 'sig1=("a");n=!', "expected an integer"),
        ("Signature-Input", "sig1=:AAAA:", "must be an inner list"),
        ("Signature", "sig1=:not base64!:", "standard base64 only"),
        ("Signature", "sig1=:AAAAA:", "not valid base64"),
        ("Signature", "sig1=:AAAA", "not closed with ':'"),
        ("Signature", 'sig1="AAAA"', "must be a byte sequence"),
        ("Signature", 'sig1=("AAAA")', "must be a byte sequence"),
    ],
)
def test_malformed_structured_fields(field: str, value: str, match: str) -> None:
    headers = signed()
    headers[field] = value
    refused(headers, match)
    refused(headers, f"malformed {field} header")


def test_keyid_missing() -> None:
    refused(custom_headers(WITH_DIGEST, f";created={NOW}"), "no keyid parameter")


@pytest.mark.parametrize(
    ("keyid", "match"),
    [
        ('"acme"', "not of the form"),
        ('"acme+3CC396F7"', "not of the form"),
        ('"acme+3cc396f7+extra"', "not of the form"),
        ("acme", "must be a quoted string"),
        ("7", "must be a quoted string"),
    ],
)
def test_keyid_malformed(keyid: str, match: str) -> None:
    refused(custom_headers(WITH_DIGEST, f";created={NOW};keyid={keyid}"), match)


@pytest.mark.parametrize("alg", ['"rsa-pss-sha512"', '"ED25519"', "ed25519", "?1"])
def test_alg_other_than_ed25519(alg: str) -> None:
    refused(custom_headers(WITH_DIGEST, PARAMS + f";alg={alg}"), 'only alg="ed25519"')


def test_alg_ed25519_and_absent_are_accepted() -> None:
    assert verify(custom_headers(WITH_DIGEST, PARAMS + ';alg="ed25519"')).key_id == KEY_ID
    assert verify(custom_headers(WITH_DIGEST, PARAMS)).key_id == KEY_ID


def test_created_missing() -> None:
    refused(custom_headers(WITH_DIGEST, f';keyid="{KEY_ID}"'), "no created parameter")


@pytest.mark.parametrize("created", [f'"{NOW}"', "?1", "now"])
def test_created_not_an_integer(created: str) -> None:
    params = f';created={created};keyid="{KEY_ID}"'
    refused(custom_headers(WITH_DIGEST, params), "created is .* must be an integer")


@pytest.mark.parametrize(
    ("offset", "match"),
    [
        (
            MAX_CLOCK_SKEW + 1,
            "301 seconds ahead of the hub's clock .now 1700000000.; the limit is 300",
        ),
        (
            -MAX_CLOCK_SKEW - 1,
            "301 seconds behind the hub's clock .now 1700000000.; the limit is 300",
        ),
        (-86_400, "86400 seconds behind"),
    ],
)
def test_created_outside_skew(offset: int, match: str) -> None:
    refused(signed(created=NOW + offset), match)


@pytest.mark.parametrize("offset", [MAX_CLOCK_SKEW, -MAX_CLOCK_SKEW, 0])
def test_created_at_the_limit_is_accepted(offset: int) -> None:
    assert verify(signed(created=NOW + offset)).created == NOW + offset


def test_max_skew_is_honoured() -> None:
    headers = signed(created=NOW - 10)
    with pytest.raises(SignatureRefused, match="the limit is 5 seconds"):
        verify_request(
            method="POST",
            path=PATH,
            query="",
            headers=headers,
            body=BODY,
            resolve_key=resolve,
            now=NOW,
            max_skew=5,
        )


def test_expired_signature() -> None:
    refused(custom_headers(WITH_DIGEST, PARAMS + f";expires={NOW - 1}"), "expired")
    refused(custom_headers(WITH_DIGEST, PARAMS + ';expires="soon"'), "expires is")
    assert verify(custom_headers(WITH_DIGEST, PARAMS + f";expires={NOW}")).key_id == KEY_ID


@pytest.mark.parametrize(
    "components",
    [
        [("@path", PATH), ("@method", "POST"), ("@query", "?"), ("content-digest", BODY_DIGEST)],
        [("@method", "POST"), ("@path", PATH), ("content-digest", BODY_DIGEST)],
        [("@method", "POST"), ("@path", PATH), ("@query", "?")],
        [*WITH_DIGEST, ("content-type", "application/json")],
        [*WITH_DIGEST, ("content-digest", BODY_DIGEST)],
        [],
    ],
)
def test_components_not_as_required_with_body(components: list[tuple[str, str]]) -> None:
    refused(custom_headers(components), "a request with a body must cover exactly")


@pytest.mark.parametrize(
    "components",
    [
        [("@method", "GET"), ("@path", PATH)],
        [("@query", "?"), ("@method", "GET"), ("@path", PATH)],
        [("@method", "GET"), ("@path", PATH), ("@query", "?"), ("date", "x")],
    ],
)
def test_components_not_as_required_without_body(components: list[tuple[str, str]]) -> None:
    refused(
        custom_headers(components, digest=None),
        "a request without a body must cover exactly",
        method="GET",
        body=b"",
    )


def test_component_parameters_are_refused() -> None:
    headers = custom_headers(WITH_DIGEST)
    headers["Signature-Input"] = headers["Signature-Input"].replace('"content-digest"', '"content-digest";sf')
    refused(headers, "carries parameters ';sf'")


def test_covered_digest_without_header() -> None:
    components = [("@method", "GET"), ("@path", PATH), ("@query", "?"), ("content-digest", "")]
    refused(
        custom_headers(components, digest=None),
        "covered but the request has no Content-Digest header",
        method="GET",
        body=b"",
    )


def test_body_without_content_digest() -> None:
    headers = signed()
    del headers["Content-Digest"]
    refused(headers, "has a body but no Content-Digest header")


def test_body_without_signed_body() -> None:
    """A body added to a request signed without one: the digest header is required."""
    headers = signed(body=None)
    refused(headers, "has a body but no Content-Digest header")
    headers["Content-Digest"] = BODY_DIGEST
    refused(headers, "a request with a body must cover exactly")


def test_tampered_body() -> None:
    refused(signed(), "digest of the body does not match Content-Digest", status=400, body=b"{}")


def test_tampered_content_digest_header() -> None:
    headers = signed()
    headers["Content-Digest"] = content_digest(b"{}")
    refused(headers, "signature does not verify", body=b"{}")


def test_content_digest_without_sha256() -> None:
    digest = f"sha-512=:{b64(bytes(64))}:"
    refused(custom_headers([*BASE, ("content-digest", digest)], digest=digest), "not sha-256")


def test_content_digest_malformed() -> None:
    digest = 'sha-256="abc"'
    headers = custom_headers([*BASE, ("content-digest", digest)], digest=digest)
    refused(headers, "malformed Content-Digest header")


def test_unknown_key() -> None:
    stranger = SignerKey("stranger", bytes(32))
    headers = sign_request(stranger, "POST", PATH, "", BODY, created=NOW)
    refused(
        headers,
        re.escape(f"unknown key id {stranger.key_id}; is this key a member of the collection?"),
    )


@pytest.mark.parametrize(
    "request_change",
    [
        {"method": "PUT"},
        {"path": PATH + "x"},
        {"path": "/v1/collections/other/entries"},
        {"query": "start=1"},
    ],
)
def test_tampered_request_line(request_change: dict[str, str]) -> None:
    refused(signed(), "signature does not verify", 401, **request_change)


def test_method_case_does_not_matter() -> None:
    assert verify(signed(method="post"), method="Post").key_id == KEY_ID


def test_tampered_created() -> None:
    headers = signed()
    headers["Signature-Input"] = headers["Signature-Input"].replace(f"created={NOW}", f"created={NOW + 1}")
    refused(headers, "signature does not verify")


def test_tampered_keyid() -> None:
    headers = signed()
    headers["Signature-Input"] = headers["Signature-Input"].replace(KEY_ID, OTHER.key_id)
    refused(headers, re.escape(f"signature does not verify with key {OTHER.key_id}"))


def test_tampered_alg_param_is_covered() -> None:
    headers = signed()
    headers["Signature-Input"] = headers["Signature-Input"].replace(';alg="ed25519"', "")
    refused(headers, "signature does not verify")


def test_tampered_signature_bytes() -> None:
    headers = signed()
    raw = bytearray(base64.b64decode(headers["Signature"][len("sig1=:") : -1]))
    raw[0] ^= 1
    headers["Signature"] = f"sig1=:{b64(bytes(raw))}:"
    refused(headers, "signature does not verify")
    headers["Signature"] = f"sig1=:{b64(bytes(raw[:32]))}:"
    refused(headers, "32-byte signature")


def test_signature_by_another_member() -> None:
    headers = custom_headers(WITH_DIGEST, signer=OTHER)
    refused(headers, re.escape(f"signature does not verify with key {KEY_ID}"))


def test_unsignable_path_is_a_bad_request() -> None:
    refused(signed(), "visible ASCII", status=400, path="/a\nb")
    with pytest.raises(ValueError, match="visible ASCII"):
        sign_request(SIGNER, "GET", "/caf\u00e9", "", None)
    with pytest.raises(ValueError, match="printable ASCII"):
        sign_request(SIGNER, "GET", "/", "", None, nonce="\u00e9")


# --- replay guard ----------------------------------------------------------------


def test_replay_guard_refuses_second_use() -> None:
    guard = ReplayGuard()
    guard.check_and_remember(b"sig-a", NOW)
    guard.check_and_remember(b"sig-b", NOW)
    with pytest.raises(SignatureRefused, match="replayed signature") as info:
        guard.check_and_remember(b"sig-a", NOW + 10)
    assert info.value.status == 401
    assert "10 seconds ago" in info.value.detail


def test_replay_guard_forgets_after_window() -> None:
    guard = ReplayGuard(window=60)
    guard.check_and_remember(b"sig", NOW)
    with pytest.raises(SignatureRefused):
        guard.check_and_remember(b"sig", NOW + 60)  # still remembered through its last second
    guard.check_and_remember(b"other", NOW + 30)
    guard.check_and_remember(b"sig", NOW + 61)
    assert len(guard) == 2
    guard.check_and_remember(b"third", NOW + 1000)
    assert len(guard) == 1


def test_replay_guard_default_window_covers_the_skew() -> None:
    guard = ReplayGuard()
    guard.check_and_remember(b"sig", NOW)
    with pytest.raises(SignatureRefused):
        guard.check_and_remember(b"sig", NOW + 2 * MAX_CLOCK_SKEW)
    guard.check_and_remember(b"sig", NOW + 2 * MAX_CLOCK_SKEW + 1)


def test_replay_guard_memory_is_bounded() -> None:
    guard = ReplayGuard(window=600, max_entries=3)
    for index in range(10):
        guard.check_and_remember(f"sig-{index}".encode(), NOW + index)
        assert len(guard) <= 3
    with pytest.raises(SignatureRefused):
        guard.check_and_remember(b"sig-9", NOW + 10)
    guard.check_and_remember(b"sig-0", NOW + 10)  # evicted as the oldest


def test_replay_guard_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        ReplayGuard(window=0)
    with pytest.raises(ValueError):
        ReplayGuard(max_entries=0)


def test_replay_guard_is_thread_safe() -> None:
    guard = ReplayGuard()
    accepted: list[int] = []
    barrier = threading.Barrier(16)

    def attempt(index: int) -> None:
        barrier.wait()
        for signature in range(200):
            try:
                guard.check_and_remember(signature.to_bytes(2, "big"), NOW)
            except SignatureRefused:
                continue
            accepted.append(index)

    threads = [threading.Thread(target=attempt, args=(index,)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(accepted) == 200
    assert len(guard) == 200


def test_verified_signature_feeds_the_guard() -> None:
    guard = ReplayGuard()
    headers = signed()
    guard.check_and_remember(verify(headers).signature, NOW)
    with pytest.raises(SignatureRefused, match="replayed"):
        guard.check_and_remember(verify(headers, now=NOW + 1).signature, NOW + 1)
