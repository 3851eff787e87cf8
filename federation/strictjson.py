"""Strict JSON for hashfed's signed documents, and the error it raises.

Envelopes (:mod:`federation.envelope`) and payloads (:mod:`federation.payloads`)
are read with ``strict_json``, checked field by field with ``exact_keys``, and
written with ``compact_json``; all of them refuse with ``EnvelopeError``.
:mod:`federation.envelope` re-exports ``EnvelopeError``, ``strict_json`` and
``compact_json``, which is where the rest of hashfed imports them from.
"""

from __future__ import annotations

import json
import re
from typing import Any

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
"""A ``\\uD800``-``\\uDFFF`` escape: the only way JSON text can carry a lone surrogate."""


class EnvelopeError(ValueError):
    """An envelope or payload that is malformed; the message says exactly where."""


def strict_json(data: bytes | str, what: str) -> Any:
    """Parse JSON, refusing duplicate keys and the non-standard NaN/Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise EnvelopeError(f"{what}: duplicate key {key!r}")
            result[key] = value
        return result

    def no_constants(name: str) -> Any:
        raise EnvelopeError(f"{what}: {name} is not JSON")

    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError as exc:
        raise EnvelopeError(f"{what} is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise EnvelopeError(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except RecursionError as exc:
        raise EnvelopeError(f"{what} is nested too deeply to be a hashfed document") from exc
    except ValueError as exc:  # e.g. an integer literal with thousands of digits
        raise EnvelopeError(f"{what} cannot be parsed: {exc}") from exc
    # Escaped surrogate pairs are legal and decode to one character; a lone
    # surrogate is not a Unicode scalar value, cannot be written as UTF-8, and
    # would fail later in whatever serialises it (a lookup answer, a log line).
    if _SURROGATE_ESCAPE.search(text):
        _refuse_lone_surrogates(value, what, what)
    return value


def _refuse_lone_surrogates(value: Any, what: str, where: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EnvelopeError(
                f"{where} holds a lone UTF-16 surrogate ({value[exc.start]!r}), which is not a Unicode "
                "character; send text as valid UTF-8 (escape non-BMP characters as surrogate pairs)"
            ) from None
    elif isinstance(value, list):
        for position, element in enumerate(value):
            _refuse_lone_surrogates(element, what, f"{where}[{position}]")
    elif isinstance(value, dict):
        for key, element in value.items():
            _refuse_lone_surrogates(key, what, f"{where} key")
            _refuse_lone_surrogates(element, what, f"{where}.{key}")


def compact_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def exact_keys(obj: Any, where: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """Refuse ``obj`` unless it is a JSON object with every ``required`` key and no others but ``optional``."""
    if not isinstance(obj, dict):
        raise EnvelopeError(f"{where} must be a JSON object")
    missing = [key for key in required if key not in obj]
    if missing:
        raise EnvelopeError(f"{where} is missing {', '.join(repr(k) for k in missing)}")
    unknown = [key for key in obj if key not in required and key not in optional]
    if unknown:
        raise EnvelopeError(f"{where} has unknown field {unknown[0]!r}")
