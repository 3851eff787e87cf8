"""HTTP Message Signatures (RFC 9421) and Content-Digest (RFC 9530) for hashfed.

Requests that are not open to anyone carry a signature made with the caller's
member key (design §7). This module implements exactly one profile of RFC 9421:

- one signature, labelled ``sig1``, in the ``Signature-Input`` and ``Signature``
  dictionaries (other labels may be present; they are parsed and ignored);
- covered components exactly ``"@method" "@path" "@query"``, followed by
  ``"content-digest"`` when the request has a body;
- parameters ``created`` (integer seconds, required), ``keyid`` (the key id
  ``<name>+<8 hex>``, required) and ``alg`` (optional, ``"ed25519"``); any other
  parameter (``expires``, ``nonce``, ``tag``...) is covered through
  ``@signature-params``; ``expires``, when present, is honoured, and
  ``sign_request`` adds a random ``nonce`` so identical requests differ;
- ``Content-Digest: sha-256=:<base64>:`` (RFC 9530) binds the body.

The signature base (RFC 9421 §2.5) is one line ``"<component>": <value>`` per
covered component followed by ``"@signature-params": <inner list>``, joined by
``\\n`` without a trailing newline. ``@method`` is the uppercase method,
``@path`` the raw request path as sent (``/`` when empty), ``@query`` is ``?``
followed by the raw query string (just ``?`` when there is none). Both sides
must use the raw, still percent-encoded path and query: with aiohttp that is
``request.rel_url.raw_path`` and ``request.rel_url.raw_query_string`` on the
hub, and a ``yarl.URL(..., encoded=True)`` on the client so nothing is
re-encoded after signing.

The header values are read with :mod:`federation.sfv`, a small strict reader
for the subset of RFC 8941 structured fields this profile needs (dictionaries
whose members are inner lists of strings or byte sequences; parameter values
that are integers, strings, tokens or booleans) rather than a general one:
anything else is refused with a detail that says what was found.

Everything here is synchronous and free of I/O; ``ReplayGuard`` is the only
stateful piece and keeps its state per instance.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from federation.keys import KeyFormatError, SignerKey, VerifierKey, split_key_id
from federation.sfv import (
    BareItem,
    InnerList,
    Item,
    Member,
    StructuredFieldError,
    parse_dictionary,
    serialize_bare_item,
    serialize_inner_list,
    serialize_params,
)

SIGNATURE_LABEL = "sig1"
MAX_CLOCK_SKEW = 300
ALGORITHM = "ed25519"
DIGEST_ALGORITHM = "sha-256"
COMPONENTS_WITHOUT_BODY = ("@method", "@path", "@query")
COMPONENTS_WITH_BODY = (*COMPONENTS_WITHOUT_BODY, "content-digest")
ED25519_SIGNATURE_SIZE = 64


class SignatureRefused(Exception):
    """A request signature that the hub does not accept.

    ``detail`` says precisely what is wrong and what the caller should do;
    ``status`` is the HTTP status the hub answers with (401 unless the fault is
    in the body rather than in the authentication).
    """

    def __init__(self, detail: str, status: int = 401) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


# --- the signature base ----------------------------------------------------


_NOT_VISIBLE_ASCII = re.compile(r"[^\t -~]")


def _checked(name: str, value: str) -> str:
    """Refuse component values that would change the shape of the signature base."""
    if _NOT_VISIBLE_ASCII.search(value):
        raise ValueError(
            f"the {name} value {value!r} holds characters other than visible ASCII; "
            "send the path and query percent-encoded"
        )
    return value


def _signature_base(
    *, method: str, path: str, query: str, digest: str | None, signature_input: InnerList
) -> bytes:
    """Build the RFC 9421 §2.5 signature base for the profile's components.

    The ``@signature-params`` line is the RFC 8941 serialization of the parsed
    ``Signature-Input`` member, parameters in the order they were sent; for the
    canonical form every conforming signer emits, that is the header text itself.
    """
    lines: list[str] = []
    for item in signature_input.items:
        name = item.value
        if name == "@method":
            value = method.upper()
        elif name == "@path":
            value = path or "/"
        elif name == "@query":
            value = "?" + query
        elif name == "content-digest" and digest is not None:
            value = digest
        else:  # callers check the components first; this is a programming error
            raise ValueError(f"component {name!r} cannot be part of this profile's base")
        lines.append(f'"{name}": {_checked(str(name), value)}')
    lines.append(f'"@signature-params": {serialize_inner_list(signature_input)}')
    return "\n".join(lines).encode("ascii")


def content_digest(body: bytes) -> str:
    """The RFC 9530 ``Content-Digest`` value for ``body``: ``sha-256=:<base64>:``."""
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode("ascii")
    return f"{DIGEST_ALGORITHM}=:{digest}:"


def sign_request(
    signer: SignerKey,
    method: str,
    path: str,
    query: str,
    body: bytes | None,
    *,
    created: int | None = None,
    nonce: str | None = None,
) -> dict[str, str]:
    """Sign a request; return the headers to add to it.

    ``path`` and ``query`` are the raw (percent-encoded) path and query string
    exactly as they will be sent, ``query`` without its leading ``?``. The
    result holds ``Signature-Input`` and ``Signature``, plus ``Content-Digest``
    when ``body`` is non-empty. ``created`` defaults to the current time.

    A fresh random ``nonce`` parameter is added unless one is given: Ed25519 is
    deterministic, so without it two identical requests signed within the same
    second would carry the same signature and the second would be refused by
    the hub's ``ReplayGuard`` as a replay.
    """
    if created is None:
        created = int(time.time())
    if nonce is None:
        nonce = secrets.token_urlsafe(16)
    elif not all(" " <= char <= "~" for char in nonce):
        raise ValueError("a nonce must be printable ASCII")
    headers: dict[str, str] = {}
    digest: str | None = None
    components: tuple[str, ...] = COMPONENTS_WITHOUT_BODY
    if body:
        digest = content_digest(body)
        headers["Content-Digest"] = digest
        components = COMPONENTS_WITH_BODY
    signature_input = InnerList(
        tuple(Item(name, ()) for name in components),
        (
            ("created", created),
            ("keyid", signer.key_id),
            ("alg", ALGORITHM),
            ("nonce", nonce),
        ),
    )
    base = _signature_base(
        method=method, path=path, query=query, digest=digest, signature_input=signature_input
    )
    signature = base64.b64encode(signer.sign(base)).decode("ascii")
    headers["Signature-Input"] = f"{SIGNATURE_LABEL}={serialize_inner_list(signature_input)}"
    headers["Signature"] = f"{SIGNATURE_LABEL}=:{signature}:"
    return headers


# --- verification -----------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRequest:
    """Who signed a verified request, when, and the signature itself (for the replay guard)."""

    key_id: str
    created: int
    signature: bytes
    key: VerifierKey | None = None
    """The key whose signature verified (one key id may name several keys)."""
    digest: str | None = None
    """The Content-Digest header the signature covers, if it covers one."""


def _field(headers: Mapping[str, str], name: str) -> str | None:
    """The combined value of every field line named ``name``, in order (RFC 9110 §5.3).

    A case-insensitive multidict (aiohttp's headers) gives every line of the
    name with ``getall``; any other mapping is scanned, names compared
    case-insensitively.
    """
    if isinstance(headers, CIMultiDictProxy | CIMultiDict):  # aiohttp's headers: a lookup, not a scan
        values = [value.strip(" \t") for value in headers.getall(name, ())]
    else:
        wanted = name.lower()
        values = [value.strip(" \t") for key, value in headers.items() if key.lower() == wanted]
    if not values:
        return None
    return ", ".join(values)


def _dictionary(field: str, text: str) -> dict[str, Member]:
    """The header ``field`` read as a structured-field dictionary; a malformed one is refused (401)."""
    try:
        return parse_dictionary(field, text)
    except StructuredFieldError as exc:
        raise SignatureRefused(exc.detail) from None


def _components_text(names: tuple[str, ...]) -> str:
    return "(" + " ".join(f'"{name}"' for name in names) + ")"


def _check_components(inner: InnerList, has_body: bool, digest_present: bool) -> bool:
    """Check the covered components against the profile; return whether the digest is covered."""
    for item in inner.items:
        if item.params:
            raise SignatureRefused(
                f"covered component {serialize_bare_item(item.value)} carries parameters "
                f"{serialize_params(item.params)!r}; this hub accepts plain component names only"
            )
    names = tuple(str(item.value) for item in inner.items)
    if has_body:
        if names != COMPONENTS_WITH_BODY:
            raise SignatureRefused(
                f"covered components are {_components_text(names)}; a request with a body must "
                f"cover exactly {_components_text(COMPONENTS_WITH_BODY)}, in that order"
            )
        return True
    if names == COMPONENTS_WITH_BODY:
        if not digest_present:
            raise SignatureRefused(
                '"content-digest" is covered but the request has no Content-Digest header; '
                "send the header or leave the component out"
            )
        return True
    if names != COMPONENTS_WITHOUT_BODY:
        raise SignatureRefused(
            f"covered components are {_components_text(names)}; a request without a body must "
            f"cover exactly {_components_text(COMPONENTS_WITHOUT_BODY)}, in that order "
            '(optionally followed by "content-digest")'
        )
    return False


def _param(inner: InnerList, name: str) -> BareItem | None:
    for key, value in inner.params:
        if key == name:
            return value
    return None


def _check_key_id(inner: InnerList) -> str:
    key_id = _param(inner, "keyid")
    if key_id is None:
        raise SignatureRefused(
            f'the {SIGNATURE_LABEL} signature has no keyid parameter; add keyid="<name>+<hash>" '
            "naming the key that signed"
        )
    if not isinstance(key_id, str):
        raise SignatureRefused(
            f'keyid is {serialize_bare_item(key_id)}; it must be a quoted string keyid="<name>+<hash>"'
        )
    try:
        split_key_id(key_id)
    except KeyFormatError as exc:
        raise SignatureRefused(f"keyid: {exc}") from None
    return key_id


def _check_alg(inner: InnerList) -> None:
    alg = _param(inner, "alg")
    if alg is not None and alg != ALGORITHM:
        raise SignatureRefused(
            f'alg is {serialize_bare_item(alg)}; this hub accepts only alg="{ALGORITHM}" '
            "(or no alg parameter)"
        )


def _integer_param(inner: InnerList, name: str) -> int | None:
    value = _param(inner, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignatureRefused(
            f"{name} is {serialize_bare_item(value)}; it must be an integer number of "
            "seconds since the Unix epoch"
        )
    return value


def _check_times(inner: InnerList, now: int, max_skew: int) -> int:
    created = _integer_param(inner, "created")
    if created is None:
        raise SignatureRefused(
            f"the {SIGNATURE_LABEL} signature has no created parameter; add created=<unix seconds> "
            "set when signing"
        )
    skew = created - now
    if abs(skew) > max_skew:
        direction = "ahead of" if skew > 0 else "behind"
        raise SignatureRefused(
            f"created={created} is {abs(skew)} seconds {direction} the hub's clock "
            f"(now {now}); the limit is {max_skew} seconds: sign each request just before "
            "sending it and keep the client's clock synchronised (NTP)"
        )
    expires = _integer_param(inner, "expires")
    if expires is not None and now > expires:
        raise SignatureRefused(
            f"the signature expired at expires={expires} (now {now}); sign the request again"
        )
    return created


def _check_content_digest(value: str, body: bytes) -> None:
    digests: dict[str, bytes] = {}
    for algorithm, member in _dictionary("Content-Digest", value).items():
        if not isinstance(member, Item) or not isinstance(member.value, bytes):
            raise SignatureRefused(
                f"malformed Content-Digest header: the {algorithm} member must be a byte sequence :<base64>:"
            )
        digests[algorithm] = member.value
    expected = digests.get(DIGEST_ALGORITHM)
    if expected is None:
        raise SignatureRefused(
            f"Content-Digest lists {', '.join(digests) or 'no algorithm'} but not "
            f"{DIGEST_ALGORITHM}; send {DIGEST_ALGORITHM}=:<base64 SHA-256 of the body>:"
        )
    actual = hashlib.sha256(body).digest()
    if not hmac.compare_digest(expected, actual):
        raise SignatureRefused(
            f"the digest of the body does not match Content-Digest: the header says "
            f"{DIGEST_ALGORITHM}=:{base64.b64encode(expected).decode('ascii')}: but the "
            f"{len(body)} bytes received hash to {content_digest(body)}; compute the digest over "
            "exactly the bytes sent (after any encoding) and check nothing alters the body",
            status=400,
        )


def verify_request(
    *,
    method: str,
    path: str,
    query: str,
    headers: Mapping[str, str],
    body: bytes | None,
    resolve_key: Callable[[str], VerifierKey | Sequence[VerifierKey] | None],
    now: int,
    max_skew: int = MAX_CLOCK_SKEW,
    has_body: bool | None = None,
) -> VerifiedRequest:
    """Verify the ``sig1`` signature of a request, or raise ``SignatureRefused``.

    ``path`` and ``query`` are the raw path and query string as received
    (``query`` without its ``?``); ``headers`` is looked up case-insensitively
    and ``body`` is the complete body (``b""`` when there is none). A hub
    verifies before it reads a body: with ``body=None`` and ``has_body`` from
    the request's framing, everything the headers decide is checked and the
    caller checks the body later with :func:`check_body_digest`.
    ``resolve_key`` maps a key id to the member key it names, or ``None`` when
    the key is not one the caller may use; it may also give several keys (a
    key id is a 32-bit hash, so different keys can share one): each is tried,
    and the result names the one whose signature verified. Replays are not checked here: pass
    the result's ``signature`` to a ``ReplayGuard``.
    """
    input_text = _field(headers, "Signature-Input")
    signature_text = _field(headers, "Signature")
    if input_text is None or signature_text is None:
        missing = "Signature-Input" if input_text is None else "Signature"
        raise SignatureRefused(
            f"the request has no {missing} header; sign it with HTTP Message Signatures "
            f"(RFC 9421), label {SIGNATURE_LABEL}, using your member key"
        )
    inputs = _dictionary("Signature-Input", input_text)
    signatures = _dictionary("Signature", signature_text)
    for field, members in (("Signature-Input", inputs), ("Signature", signatures)):
        if SIGNATURE_LABEL not in members:
            found = ", ".join(members) or "none"
            raise SignatureRefused(
                f"the {field} header has no {SIGNATURE_LABEL} member (labels found: {found}); "
                f"this hub verifies the signature labelled {SIGNATURE_LABEL}"
            )
    inner = inputs[SIGNATURE_LABEL]
    if not isinstance(inner, InnerList):
        raise SignatureRefused(
            f"malformed Signature-Input header: {SIGNATURE_LABEL} must be an inner list of "
            'covered components with parameters, like ("@method" "@path" "@query");created=...'
        )
    signature_item = signatures[SIGNATURE_LABEL]
    if not isinstance(signature_item, Item) or not isinstance(signature_item.value, bytes):
        raise SignatureRefused(
            f"malformed Signature header: {SIGNATURE_LABEL} must be a byte sequence :<base64 signature>:"
        )
    signature = signature_item.value

    key_id = _check_key_id(inner)
    _check_alg(inner)
    created = _check_times(inner, now, max_skew)

    digest = _field(headers, "Content-Digest")
    if body is not None:
        has_body = len(body) > 0
    elif has_body is None:
        raise ValueError("verify_request needs the body, or has_body when the body is not read yet")
    if has_body and digest is None:
        raise SignatureRefused(
            "the request has a body but no Content-Digest header; send Content-Digest: "
            f'{DIGEST_ALGORITHM}=:<base64 SHA-256 of the body>: and cover "content-digest"'
        )
    covers_digest = _check_components(inner, has_body, digest is not None)

    resolved = resolve_key(key_id)
    candidates: list[VerifierKey] = (
        list(resolved) if isinstance(resolved, list | tuple) else [] if resolved is None else [resolved]  # type: ignore[list-item]
    )
    if not candidates:
        raise SignatureRefused(f"unknown key id {key_id}; is this key a member of the collection?")
    try:
        base = _signature_base(
            method=method,
            path=path,
            query=query,
            digest=digest if covers_digest else None,
            signature_input=inner,
        )
    except ValueError as exc:
        raise SignatureRefused(str(exc), status=400) from None
    key = next(
        (k for k in candidates if len(signature) == ED25519_SIGNATURE_SIZE and k.verify(base, signature)),
        None,
    )
    if key is None:
        raise SignatureRefused(
            f"signature does not verify with key {key_id} ({len(signature)}-byte signature; "
            f"Ed25519 gives {ED25519_SIGNATURE_SIZE}): sign the request exactly as it is sent, "
            "over the uppercase method, the raw path and query, the Content-Digest header when "
            "covered and the Signature-Input parameters, with the key that keyid names"
        )
    covered_digest = digest if covers_digest else None
    if covered_digest is not None and body is not None:
        _check_content_digest(covered_digest, body)
    return VerifiedRequest(
        key_id=key_id, created=created, signature=signature, key=key, digest=covered_digest
    )


def check_body_digest(verified: VerifiedRequest, body: bytes) -> None:
    """Check a body read after its request was verified with ``body=None``; raise SignatureRefused."""
    if verified.digest is not None:
        _check_content_digest(verified.digest, body)
    elif body:
        raise SignatureRefused(
            "the request has a body but its signature does not cover Content-Digest; send Content-Digest: "
            f'{DIGEST_ALGORITHM}=:<base64 SHA-256 of the body>: and cover "content-digest"'
        )


def replayed(seconds_ago: int) -> SignatureRefused:
    """The refusal of a signature first used ``seconds_ago`` seconds ago."""
    return SignatureRefused(
        f"replayed signature: this exact signature was already used {seconds_ago} seconds ago; "
        "sign every request afresh, with a new nonce parameter"
    )


class ReplayGuard:
    """Remembers signatures seen within the skew window so a replay is refused.

    Memory is bounded: entries expire.

    A signature is acceptable only while its ``created`` lies within the skew
    of the hub's clock, so from its first use it can be replayed for at most
    twice the skew: that is the default ``window``. Each signature is
    forgotten ``window`` seconds after it was first seen. At ``max_entries``
    the entry closest to expiry is forgotten early to keep memory bounded;
    reaching that needs that many distinct valid signatures within the window.
    """

    def __init__(self, window: int = 2 * MAX_CLOCK_SKEW, max_entries: int = 1_000_000) -> None:
        if window <= 0 or max_entries <= 0:
            raise ValueError("window and max_entries must be positive")
        self._window = window
        self._max_entries = max_entries
        self._lock = threading.Lock()
        self._expiry: dict[bytes, int] = {}
        self._queue: list[tuple[int, bytes]] = []  # (expires at, signature), a min-heap

    def __len__(self) -> int:
        with self._lock:
            return len(self._expiry)

    def check_and_remember(self, signature: bytes, now: int) -> None:
        """Refuse ``signature`` if it was seen within the window; otherwise remember it."""
        with self._lock:
            # Kept through its last acceptable second: ``created`` may still be
            # within the skew at exactly ``first use + window``.
            while self._queue and self._queue[0][0] < now:
                _, expired = heapq.heappop(self._queue)
                del self._expiry[expired]
            if signature in self._expiry:
                raise replayed(now - (self._expiry[signature] - self._window))
            while len(self._expiry) >= self._max_entries:
                _, evicted = heapq.heappop(self._queue)
                del self._expiry[evicted]
            expires = now + self._window
            self._expiry[signature] = expires
            heapq.heappush(self._queue, (expires, signature))
