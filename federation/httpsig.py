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

Parsing uses a small strict reader for the subset of RFC 8941 structured
fields this profile needs (dictionaries whose members are inner lists of
strings or byte sequences; parameter values that are integers, strings, tokens
or booleans) rather than a general one: anything else is refused with a detail
that says what was found.

Everything here is synchronous and free of I/O; ``ReplayGuard`` is the only
stateful piece and keeps its state per instance.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import secrets
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from federation.keys import KeyFormatError, SignerKey, VerifierKey, split_key_id

SIGNATURE_LABEL = "sig1"
MAX_CLOCK_SKEW = 300
ALGORITHM = "ed25519"
DIGEST_ALGORITHM = "sha-256"
COMPONENTS_WITHOUT_BODY = ("@method", "@path", "@query")
COMPONENTS_WITH_BODY = (*COMPONENTS_WITHOUT_BODY, "content-digest")
ED25519_SIGNATURE_SIZE = 64

_DETAIL_EXCERPT = 200


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


# --- structured fields (RFC 8941), the subset this profile uses -------------


@dataclass(frozen=True)
class _Token:
    """An RFC 8941 token, kept apart from strings: ``alg=ed25519`` is not ``alg="ed25519"``."""

    value: str


_BareItem: TypeAlias = bool | int | str | bytes | _Token
_Params: TypeAlias = tuple[tuple[str, _BareItem], ...]


@dataclass(frozen=True)
class _Item:
    value: _BareItem
    params: _Params


@dataclass(frozen=True)
class _InnerList:
    items: tuple[_Item, ...]
    params: _Params


_Member: TypeAlias = _Item | _InnerList

_DIGITS = frozenset(string.digits)
_ALPHA = frozenset(string.ascii_letters)
_LCALPHA = frozenset(string.ascii_lowercase)
_KEY_FIRST = _LCALPHA | {"*"}
_KEY_REST = _KEY_FIRST | _DIGITS | {"_", "-", "."}
_TCHAR = _ALPHA | _DIGITS | frozenset("!#$%&'*+-.^_`|~")
_TOKEN_REST = _TCHAR | {":", "/"}
_BASE64 = _ALPHA | _DIGITS | {"+", "/", "="}
_MAX_INTEGER_DIGITS = 15


class _Parser:
    """Reads one RFC 8941 dictionary from a field value, refusing what the profile does not use."""

    def __init__(self, field: str, text: str) -> None:
        self.field = field
        self.text = text.strip(" \t")
        self.pos = 0

    def fail(self, message: str) -> SignatureRefused:
        excerpt = self.text
        if len(excerpt) > _DETAIL_EXCERPT:
            excerpt = excerpt[:_DETAIL_EXCERPT] + "..."
        return SignatureRefused(
            f"malformed {self.field} header: {message} (at character {self.pos} of {excerpt!r}); "
            "it must be a structured-field dictionary (RFC 8941) as RFC 9421/9530 describe"
        )

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def skip(self, chars: str) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in chars:
            self.pos += 1

    def dictionary(self) -> dict[str, _Member]:
        members: dict[str, _Member] = {}
        if self.at_end():
            return members
        while True:
            key = self.key()
            if key in members:
                # RFC 8941 would let the last one win; two different signatures
                # under one label are refused rather than silently picked from.
                raise self.fail(f"the key {key!r} appears more than once")
            if self.peek() != "=":
                raise self.fail(f"member {key!r} has no value ('=' expected)")
            self.pos += 1
            if self.peek() == "(":
                members[key] = self.inner_list()
            else:
                members[key] = _Item(self.bare_item(), self.parameters())
            self.skip(" \t")
            if self.at_end():
                return members
            if self.peek() != ",":
                raise self.fail(f"expected ',' after member {key!r}")
            self.pos += 1
            self.skip(" \t")
            if self.at_end():
                raise self.fail("the value ends with a ','")

    def key(self) -> str:
        start = self.pos
        if self.peek() not in _KEY_FIRST:
            raise self.fail("expected a key (a lowercase letter or '*' first)")
        self.pos += 1
        while self.peek() in _KEY_REST:
            self.pos += 1
        return self.text[start : self.pos]

    def inner_list(self) -> _InnerList:
        self.pos += 1  # "("
        items: list[_Item] = []
        while True:
            self.skip(" ")
            if self.peek() == ")":
                self.pos += 1
                return _InnerList(tuple(items), self.parameters())
            if self.at_end():
                raise self.fail("an inner list is not closed with ')'")
            value = self.bare_item()
            if not isinstance(value, str):
                raise self.fail("inner-list members must be strings (quoted component names)")
            items.append(_Item(value, self.parameters()))
            if self.at_end():
                raise self.fail("an inner list is not closed with ')'")
            if self.peek() not in (" ", ")"):
                raise self.fail("expected a space or ')' after an inner-list member")

    def parameters(self) -> _Params:
        params: list[tuple[str, _BareItem]] = []
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            key = self.key()
            if any(existing == key for existing, _ in params):
                raise self.fail(f"the parameter {key!r} appears more than once")
            value: _BareItem = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare_item()
                if isinstance(value, bytes):
                    raise self.fail(f"parameter {key!r} is a byte sequence, which is not used here")
            params.append((key, value))
        return tuple(params)

    def bare_item(self) -> _BareItem:
        char = self.peek()
        if char == '"':
            return self.string()
        if char == ":":
            return self.byte_sequence()
        if char == "?":
            return self.boolean()
        if char == "-" or char in _DIGITS:
            return self.integer()
        if char in _ALPHA or char == "*":
            return self.token()
        if char == "@":
            raise self.fail("dates are not used here")
        if char == "%":
            raise self.fail("display strings are not used here")
        raise self.fail("expected an integer, string, token, boolean or byte sequence")

    def integer(self) -> int:
        start = self.pos
        if self.peek() == "-":
            self.pos += 1
        digits_start = self.pos
        while self.peek() in _DIGITS:
            self.pos += 1
        count = self.pos - digits_start
        if count == 0:
            raise self.fail("expected a digit")
        if self.peek() == ".":
            raise self.fail("decimal numbers are not used here; use an integer")
        if count > _MAX_INTEGER_DIGITS:
            raise self.fail(f"an integer has at most {_MAX_INTEGER_DIGITS} digits")
        return int(self.text[start : self.pos])

    def string(self) -> str:
        self.pos += 1  # opening quote
        chars: list[str] = []
        while not self.at_end():
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\"):
                    raise self.fail('only \\" and \\\\ may be escaped in a string')
                chars.append(escaped)
                self.pos += 1
            elif char == '"':
                return "".join(chars)
            elif not " " <= char <= "~":
                raise self.fail("a string holds printable ASCII only")
            else:
                chars.append(char)
        raise self.fail("a string is not closed with '\"'")

    def token(self) -> _Token:
        start = self.pos
        self.pos += 1
        while self.peek() in _TOKEN_REST:
            self.pos += 1
        return _Token(self.text[start : self.pos])

    def boolean(self) -> bool:
        self.pos += 1  # "?"
        char = self.peek()
        if char not in ("0", "1"):
            raise self.fail("a boolean is ?0 or ?1")
        self.pos += 1
        return char == "1"

    def byte_sequence(self) -> bytes:
        self.pos += 1  # opening ":"
        end = self.text.find(":", self.pos)
        if end < 0:
            raise self.fail("a byte sequence is not closed with ':'")
        encoded = self.text[self.pos : end]
        if any(char not in _BASE64 for char in encoded):
            raise self.fail("a byte sequence holds standard base64 only")
        # RFC 8941 §4.2.7: parsers should not fail on missing "=" padding.
        if "=" not in encoded:
            encoded += "=" * (-len(encoded) % 4)
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail("a byte sequence is not valid base64") from None
        self.pos = end + 1
        return value


def _serialize_bare_item(value: _BareItem) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, _Token):
        return value.value
    return ":" + base64.b64encode(value).decode("ascii") + ":"


def _serialize_params(params: _Params) -> str:
    return "".join(
        f";{key}" if value is True else f";{key}={_serialize_bare_item(value)}" for key, value in params
    )


def _serialize_inner_list(inner: _InnerList) -> str:
    members = " ".join(
        _serialize_bare_item(item.value) + _serialize_params(item.params) for item in inner.items
    )
    return f"({members}){_serialize_params(inner.params)}"


# --- the signature base ----------------------------------------------------


def _checked(name: str, value: str) -> str:
    """Refuse component values that would change the shape of the signature base."""
    if any(not (" " <= char <= "~" or char == "\t") for char in value):
        raise ValueError(
            f"the {name} value {value!r} holds characters other than visible ASCII; "
            "send the path and query percent-encoded"
        )
    return value


def _signature_base(
    *, method: str, path: str, query: str, digest: str | None, signature_input: _InnerList
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
    lines.append(f'"@signature-params": {_serialize_inner_list(signature_input)}')
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
    signature_input = _InnerList(
        tuple(_Item(name, ()) for name in components),
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
    headers["Signature-Input"] = f"{SIGNATURE_LABEL}={_serialize_inner_list(signature_input)}"
    headers["Signature"] = f"{SIGNATURE_LABEL}=:{signature}:"
    return headers


# --- verification -----------------------------------------------------------


@dataclass(frozen=True)
class VerifiedRequest:
    """Who signed a verified request, when, and the signature itself (for the replay guard)."""

    key_id: str
    created: int
    signature: bytes


def _field(headers: Mapping[str, str], name: str) -> str | None:
    """The combined value of every field line named ``name``, in order (RFC 9110 §5.3).

    Iterating ``items()`` matches names case-insensitively for any mapping and,
    for a multidict, sees every line rather than only the first.
    """
    wanted = name.lower()
    values = [value.strip(" \t") for key, value in headers.items() if key.lower() == wanted]
    if not values:
        return None
    return ", ".join(values)


def _components_text(names: tuple[str, ...]) -> str:
    return "(" + " ".join(f'"{name}"' for name in names) + ")"


def _check_components(inner: _InnerList, has_body: bool, digest_present: bool) -> bool:
    """Check the covered components against the profile; return whether the digest is covered."""
    for item in inner.items:
        if item.params:
            raise SignatureRefused(
                f"covered component {_serialize_bare_item(item.value)} carries parameters "
                f"{_serialize_params(item.params)!r}; this hub accepts plain component names only"
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


def _param(inner: _InnerList, name: str) -> _BareItem | None:
    for key, value in inner.params:
        if key == name:
            return value
    return None


def _check_key_id(inner: _InnerList) -> str:
    key_id = _param(inner, "keyid")
    if key_id is None:
        raise SignatureRefused(
            f'the {SIGNATURE_LABEL} signature has no keyid parameter; add keyid="<name>+<hash>" '
            "naming the key that signed"
        )
    if not isinstance(key_id, str):
        raise SignatureRefused(
            f'keyid is {_serialize_bare_item(key_id)}; it must be a quoted string keyid="<name>+<hash>"'
        )
    try:
        split_key_id(key_id)
    except KeyFormatError as exc:
        raise SignatureRefused(f"keyid: {exc}") from None
    return key_id


def _check_alg(inner: _InnerList) -> None:
    alg = _param(inner, "alg")
    if alg is not None and alg != ALGORITHM:
        raise SignatureRefused(
            f'alg is {_serialize_bare_item(alg)}; this hub accepts only alg="{ALGORITHM}" '
            "(or no alg parameter)"
        )


def _integer_param(inner: _InnerList, name: str) -> int | None:
    value = _param(inner, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SignatureRefused(
            f"{name} is {_serialize_bare_item(value)}; it must be an integer number of "
            "seconds since the Unix epoch"
        )
    return value


def _check_times(inner: _InnerList, now: int, max_skew: int) -> int:
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
    for algorithm, member in _Parser("Content-Digest", value).dictionary().items():
        if not isinstance(member, _Item) or not isinstance(member.value, bytes):
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
    body: bytes,
    resolve_key: Callable[[str], VerifierKey | None],
    now: int,
    max_skew: int = MAX_CLOCK_SKEW,
) -> VerifiedRequest:
    """Verify the ``sig1`` signature of a request, or raise ``SignatureRefused``.

    ``path`` and ``query`` are the raw path and query string as received
    (``query`` without its ``?``); ``headers`` is looked up case-insensitively
    and ``body`` is the complete body (``b""`` when there is none).
    ``resolve_key`` maps a key id to the member key it names, or ``None`` when
    the key is not one the caller may use. Replays are not checked here: pass
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
    inputs = _Parser("Signature-Input", input_text).dictionary()
    signatures = _Parser("Signature", signature_text).dictionary()
    for field, members in (("Signature-Input", inputs), ("Signature", signatures)):
        if SIGNATURE_LABEL not in members:
            found = ", ".join(members) or "none"
            raise SignatureRefused(
                f"the {field} header has no {SIGNATURE_LABEL} member (labels found: {found}); "
                f"this hub verifies the signature labelled {SIGNATURE_LABEL}"
            )
    inner = inputs[SIGNATURE_LABEL]
    if not isinstance(inner, _InnerList):
        raise SignatureRefused(
            f"malformed Signature-Input header: {SIGNATURE_LABEL} must be an inner list of "
            'covered components with parameters, like ("@method" "@path" "@query");created=...'
        )
    signature_item = signatures[SIGNATURE_LABEL]
    if not isinstance(signature_item, _Item) or not isinstance(signature_item.value, bytes):
        raise SignatureRefused(
            f"malformed Signature header: {SIGNATURE_LABEL} must be a byte sequence :<base64 signature>:"
        )
    signature = signature_item.value

    key_id = _check_key_id(inner)
    _check_alg(inner)
    created = _check_times(inner, now, max_skew)

    digest = _field(headers, "Content-Digest")
    has_body = len(body) > 0
    if has_body and digest is None:
        raise SignatureRefused(
            "the request has a body but no Content-Digest header; send Content-Digest: "
            f'{DIGEST_ALGORITHM}=:<base64 SHA-256 of the body>: and cover "content-digest"'
        )
    covers_digest = _check_components(inner, has_body, digest is not None)

    key = resolve_key(key_id)
    if key is None:
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
    if len(signature) != ED25519_SIGNATURE_SIZE or not key.verify(base, signature):
        raise SignatureRefused(
            f"signature does not verify with key {key_id} ({len(signature)}-byte signature; "
            f"Ed25519 gives {ED25519_SIGNATURE_SIZE}): sign the request exactly as it is sent, "
            "over the uppercase method, the raw path and query, the Content-Digest header when "
            "covered and the Signature-Input parameters, with the key that keyid names"
        )
    if covers_digest and digest is not None:
        _check_content_digest(digest, body)
    return VerifiedRequest(key_id=key_id, created=created, signature=signature)


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
                raise SignatureRefused(
                    "replayed signature: this exact signature was already used "
                    f"{now - (self._expiry[signature] - self._window)} seconds ago; "
                    "sign every request afresh, with a new nonce parameter"
                )
            while len(self._expiry) >= self._max_entries:
                _, evicted = heapq.heappop(self._queue)
                del self._expiry[evicted]
            expires = now + self._window
            self._expiry[signature] = expires
            heapq.heappush(self._queue, (expires, signature))
