"""The signal types a hub carries (design §4, §4.1), and the one registry that names them.

Each type is one module: :mod:`.pdq`, :mod:`.exact` (md5, sha1, sha256),
:mod:`.photodna` and :mod:`.vpdq`. Everything else finds a type here by
name and asks it; see docs/architecture.md for adding one.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from .base import DistanceError, Frame, Hit, LookupDefaults, Query, QueryShapeError, SignalError, SignalType
from .exact import MD5, SHA1, SHA256
from .pdq import PDQ
from .photodna import PHOTODNA
from .vpdq import VPDQ

SIGNAL_TYPES: Mapping[str, SignalType] = MappingProxyType(
    {signal.name: signal for signal in (PDQ, MD5, SHA256, SHA1, PHOTODNA, VPDQ)}
)
"""Every type, v1's first three in their original order (``GET /v1/hub`` lists them so)."""


def signal_type(name: object) -> SignalType:
    if not isinstance(name, str) or name not in SIGNAL_TYPES:
        known = ", ".join(SIGNAL_TYPES)
        raise SignalError(f"unknown signal type {name!r}: expected one of {known}")
    return SIGNAL_TYPES[name]


def parse_query(item: object, request_max_distance: int | None, defaults: LookupDefaults) -> Query:
    """One lookup query object (design §7, §4.1), resolved by its type; SignalError says what is wrong.

    The subclass of the error tells a malformed query (:class:`QueryShapeError`)
    and a distance out of range (:class:`DistanceError`) from a bad hash.
    """
    if not isinstance(item, dict) or "type" not in item:
        raise QueryShapeError("a query must be an object with a type and a hash")
    return signal_type(item["type"]).parse_query(item, request_max_distance, defaults)


def guess_type(text: str) -> SignalType:
    """The type of a bare hash when its form says it unambiguously (md5, sha1, photodna)."""
    text = text.strip()
    if PHOTODNA.recognises(text):
        return PHOTODNA
    fits = [signal for signal in SIGNAL_TYPES.values() if signal.hex_length == len(text)]
    if len(fits) == 1:
        return fits[0]
    if fits:
        names = " or ".join(signal.name for signal in fits)
        raise SignalError(f"a {len(text)}-digit hash may be {names}: say which")
    lengths = ", ".join(f"{s.name} {s.hex_length}" for s in SIGNAL_TYPES.values())
    raise SignalError(f"cannot tell the signal type of a {len(text)}-character hash (hex digits: {lengths})")


__all__ = [
    "MD5",
    "PDQ",
    "PHOTODNA",
    "SHA1",
    "SHA256",
    "SIGNAL_TYPES",
    "VPDQ",
    "DistanceError",
    "Frame",
    "Hit",
    "LookupDefaults",
    "Query",
    "QueryShapeError",
    "SignalError",
    "SignalType",
    "guess_type",
    "parse_query",
    "signal_type",
]
