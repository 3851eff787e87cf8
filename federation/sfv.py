"""Structured field values (RFC 8941): the subset hashfed's request signatures use.

``parse_dictionary`` is a small strict reader for dictionaries whose members
are inner lists of strings or bare items (byte sequences, mostly), with
parameter values that are integers, strings, tokens or booleans. It is not a
general RFC 8941 parser: anything else (decimals, dates, display strings,
byte-sequence parameters, inner lists of other than strings, a key given
twice) is refused with a ``StructuredFieldError`` whose detail says what was
found and where. The ``serialize_*`` functions write the same items back in
RFC 8941's canonical form.

Used by :mod:`federation.httpsig` (``Signature-Input``, ``Signature`` and
``Content-Digest``). Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
import string
from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

_DETAIL_EXCERPT = 200


class StructuredFieldError(ValueError):
    """A field value outside the subset read here; ``detail`` (also the message) says what and where."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Token:
    """An RFC 8941 token, kept apart from strings: ``alg=ed25519`` is not ``alg="ed25519"``."""

    value: str


BareItem: TypeAlias = bool | int | str | bytes | Token
Params: TypeAlias = tuple[tuple[str, BareItem], ...]


class Item(NamedTuple):
    """A bare item with its parameters (a named tuple: several are built for every request)."""

    value: BareItem
    params: Params


class InnerList(NamedTuple):
    items: tuple[Item, ...]
    params: Params


Member: TypeAlias = Item | InnerList

_DIGITS = frozenset(string.digits)
_ALPHA = frozenset(string.ascii_letters)
_LCALPHA = frozenset(string.ascii_lowercase)
_KEY_FIRST = _LCALPHA | {"*"}
_KEY_REST = _KEY_FIRST | _DIGITS | {"_", "-", "."}
_TCHAR = _ALPHA | _DIGITS | frozenset("!#$%&'*+-.^_`|~")
_TOKEN_REST = _TCHAR | {":", "/"}
_BASE64 = _ALPHA | _DIGITS | {"+", "/", "="}
_MAX_INTEGER_DIGITS = 15
# The common case of each bare item in one regular-expression match; anything
# the pattern does not take is handed to the character-by-character path,
# which finds the precise fault to report.
_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_PLAIN_STRING = re.compile(r'"([ !#-\[\]-~]*)"')
_INTEGER = re.compile(r"-?[0-9]{1,15}(?![0-9.])")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=]*")
_TOKEN = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")


class _Parser:
    """Reads one RFC 8941 dictionary from a field value, refusing what the profile does not use."""

    def __init__(self, field: str, text: str) -> None:
        self.field = field
        self.text = text.strip(" \t")
        self.pos = 0

    def fail(self, message: str) -> StructuredFieldError:
        excerpt = self.text
        if len(excerpt) > _DETAIL_EXCERPT:
            excerpt = excerpt[:_DETAIL_EXCERPT] + "..."
        return StructuredFieldError(
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

    def dictionary(self) -> dict[str, Member]:
        members: dict[str, Member] = {}
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
                members[key] = Item(self.bare_item(), self.parameters())
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
        match = _KEY.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return match.group()
        start = self.pos
        if self.peek() not in _KEY_FIRST:
            raise self.fail("expected a key (a lowercase letter or '*' first)")
        self.pos += 1
        while self.peek() in _KEY_REST:
            self.pos += 1
        return self.text[start : self.pos]

    def inner_list(self) -> InnerList:
        self.pos += 1  # "("
        items: list[Item] = []
        text = self.text
        while True:
            while text[self.pos : self.pos + 1] == " ":
                self.pos += 1
            char = text[self.pos : self.pos + 1]
            if char == ")":
                self.pos += 1
                return InnerList(tuple(items), self.parameters())
            if not char:
                raise self.fail("an inner list is not closed with ')'")
            value = self.bare_item()
            if not isinstance(value, str):
                raise self.fail("inner-list members must be strings (quoted component names)")
            items.append(Item(value, self.parameters() if text[self.pos : self.pos + 1] == ";" else ()))
            char = text[self.pos : self.pos + 1]
            if not char:
                raise self.fail("an inner list is not closed with ')'")
            if char not in (" ", ")"):
                raise self.fail("expected a space or ')' after an inner-list member")

    def parameters(self) -> Params:
        params: list[tuple[str, BareItem]] = []
        text = self.text
        while text[self.pos : self.pos + 1] == ";":
            self.pos += 1
            while text[self.pos : self.pos + 1] == " ":
                self.pos += 1
            key = self.key()
            if any(existing == key for existing, _ in params):
                raise self.fail(f"the parameter {key!r} appears more than once")
            value: BareItem = True
            if text[self.pos : self.pos + 1] == "=":
                self.pos += 1
                value = self.bare_item()
                if isinstance(value, bytes):
                    raise self.fail(f"parameter {key!r} is a byte sequence, which is not used here")
            params.append((key, value))
        return tuple(params)

    def bare_item(self) -> BareItem:
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
        match = _INTEGER.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return int(match.group())
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
        match = _PLAIN_STRING.match(self.text, self.pos)
        if match:  # no escapes: the usual component name or key id
            self.pos = match.end()
            return match.group(1)
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

    def token(self) -> Token:
        match = _TOKEN.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            return Token(match.group())
        start = self.pos
        self.pos += 1
        while self.peek() in _TOKEN_REST:
            self.pos += 1
        return Token(self.text[start : self.pos])

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
        if not _BASE64_TEXT.fullmatch(encoded):
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


def parse_dictionary(field: str, text: str) -> dict[str, Member]:
    """Read the value ``text`` of the header ``field`` (named in errors) as an RFC 8941 dictionary.

    Raises ``StructuredFieldError`` for anything outside the subset described above.
    """
    return _one_plain_member(text) or _Parser(field, text).dictionary()


_BYTES_MEMBER = re.compile(r"([a-z*][a-z0-9_\-.*]*)=:([A-Za-z0-9+/]*={0,2}):")
_COMPONENTS_MEMBER = re.compile(
    r'([a-z*][a-z0-9_\-.*]*)=\(((?:"[ !#-\[\]-~]*"(?: (?=")|(?=\))))*)\)'
    r'((?:;[a-z*][a-z0-9_\-.*]*=(?:-?[0-9]{1,15}(?![0-9.])|"[ !#-\[\]-~]*"))*)'
)
_COMPONENT = re.compile(r'"([ !#-\[\]-~]*)"')
_PARAMETER = re.compile(r';([a-z*][a-z0-9_\-.*]*)=(?:(-?[0-9]+)|"([ !#-\[\]-~]*)")')


def _one_plain_member(text: str) -> dict[str, Member] | None:
    """The dictionary every conforming signer sends, read with a few regular expressions; else None.

    One member: a byte sequence (``Signature``, ``Content-Digest``), or an
    inner list of plain strings whose parameters are integers and plain
    strings (``Signature-Input``). Whatever else, including every malformed
    value, is left to the full parser, which gives the same result (a property
    test holds the two to it) or says what is wrong.
    """
    match = _BYTES_MEMBER.fullmatch(text)
    if match is not None:
        encoded = match.group(2)
        if "=" not in encoded:  # as the full parser: padding added only where none was sent
            encoded += "=" * (-len(encoded) % 4)
        try:
            value = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            return None
        return {match.group(1): Item(value, ())}
    match = _COMPONENTS_MEMBER.fullmatch(text)
    if match is None:
        return None
    params: list[tuple[str, BareItem]] = []
    for key, number, string_value in _PARAMETER.findall(match.group(3)):
        if any(existing == key for existing, _ in params):
            return None
        params.append((key, int(number) if number else string_value))
    items = tuple(Item(name, ()) for name in _COMPONENT.findall(match.group(2)))
    return {match.group(1): InnerList(items, tuple(params))}


def serialize_bare_item(value: BareItem) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, Token):
        return value.value
    return ":" + base64.b64encode(value).decode("ascii") + ":"


def serialize_params(params: Params) -> str:
    return "".join(
        f";{key}" if value is True else f";{key}={serialize_bare_item(value)}" for key, value in params
    )


def serialize_inner_list(inner: InnerList) -> str:
    members = " ".join(
        serialize_bare_item(item.value) + serialize_params(item.params) for item in inner.items
    )
    return f"({members}){serialize_params(inner.params)}"
