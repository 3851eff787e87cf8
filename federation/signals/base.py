"""What every signal type provides, and the query and hit shapes they share.

A :class:`SignalType` is everything the rest of the hub knows about one kind of
hash (design §4, §4.1): how its hashes are written and normalised, which extra
fields a listed item or a query may carry, how two hashes compare, which
``max_distance`` a lookup may ask for, and which search index serves it. The
registry in :mod:`federation.signals` is the only place that names the types;
payload parsing, the projection, the index catalog, lookups, the CLI and
mirrors all go through it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..index.budget import MatchBudget
    from ..index.engines import SearchIndex

HEX_DIGITS = frozenset("0123456789abcdef")
QUERY_FIELDS = frozenset({"type", "hash", "max_distance"})


class SignalError(ValueError):
    """A hash or signal field that cannot be accepted; the message says why."""


class QueryShapeError(SignalError):
    """A query field that does not apply to its type, a missing one, or a threshold out of range."""


class DistanceError(SignalError):
    """A ``max_distance`` outside its type's range, or given to a type that matches exactly."""


@dataclass(frozen=True)
class Frame:
    """One frame of a video signal: its PDQ hash, quality and time (seconds from the start)."""

    pdq: str
    quality: int
    time: float | None = None


@dataclass(frozen=True)
class LookupDefaults:
    """The hub's defaults for lookups, served in ``GET /v1/hub`` ``defaults`` (design §4.1)."""

    pdq_max_distance: int = 31
    photodna_max_distance: int = 30_000
    vpdq_max_distance: int = 31
    vpdq_min_query_match_percent: int = 80
    vpdq_min_compared_match_percent: int = 0


@dataclass(frozen=True)
class Query:
    """One lookup query, parsed and resolved: the distance it asks for is already decided.

    ``detail`` is what a signal type needs beyond the hash (a video's frames
    and match thresholds); it is opaque to everything but that type.
    """

    signal: SignalType
    hash: str
    max_distance: int = 0
    detail: object = None


class Hit(NamedTuple):
    """A listed hash found for a query, with its distance and any type-specific answer fields."""

    hash: str
    distance: int
    fields: tuple[tuple[str, float], ...] = ()


def check_hex(name: str, text: object, length: int) -> str:
    """Lower-case hex of exactly ``length`` digits, or SignalError saying what is wrong."""
    if not isinstance(text, str):
        raise SignalError(f"{name} hash must be a string of hex digits")
    value = text.lower()
    if len(value) != length:
        raise SignalError(f"{name} hash must be {length} hex digits, got {len(value)}")
    if not HEX_DIGITS.issuperset(value):
        bad = next(ch for ch in value if ch not in HEX_DIGITS)
        raise SignalError(f"{name} hash has a non-hex character {bad!r}")
    return value


def check_int(value: object, where: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SignalError(f"{where} must be an integer from {low} to {high:,}, got {value!r}")
    return value


def check_percent(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise QueryShapeError(f"{where} must be a number from 0 to 100, got {value!r}")
    return float(value)


class SignalType(ABC):
    """One kind of hash. Subclasses are stateless singletons registered in :mod:`federation.signals`."""

    name: str
    hex_length: int
    """Digits of the normalised (stored, answered) hex form."""
    description: str
    """One line for ``--help`` and the docs."""
    max_distance_limit: int | None = None
    """The largest ``max_distance`` a query may ask for; None for exact types (identical hashes only)."""
    takes_request_max_distance: bool = False
    """Whether the lookup request's top-level ``max_distance`` applies to this type's queries."""
    snapshot_width: int | None = None
    """Bytes per code when the index can be saved as an array of codes and loaded from one."""
    has_content: bool = False
    """Whether a listed hash carries data its index needs beyond the hash (see :meth:`content`)."""

    @property
    def byte_length(self) -> int:
        return self.hex_length // 2

    @property
    def bits(self) -> int:
        return self.hex_length * 4

    @property
    def exact(self) -> bool:
        return self.max_distance_limit is None

    def __repr__(self) -> str:
        return f"<signal type {self.name}>"

    # ---- hashes ---------------------------------------------------------

    def parse(self, text: object) -> str:
        """The normalised (lower-case hex) hash, or SignalError saying what is wrong."""
        return check_hex(self.name, text, self.hex_length)

    @abstractmethod
    def distance(self, a: str, b: str) -> int:
        """Distance between two normalised hashes (0 when equal)."""

    # ---- listed items ---------------------------------------------------

    def parse_extras(
        self, item: Mapping[str, Any], hash_hex: str
    ) -> tuple[int | None, tuple[Frame, ...] | None]:
        """Validate the optional fields of an ``add`` item beyond type, hash and labels.

        Returns ``(quality, frames)``; a field this type does not take is refused.
        """
        for field in ("quality", "frames"):
            if field in item:
                raise SignalError(f"{field} does not apply to {self.name} hashes")
        return None, None

    def read_document(self, document: Any) -> tuple[str, tuple[Frame, ...]] | None:
        """A hash and frames from a whole JSON file this type's tools write (a video), else None."""
        return None

    def content(self, quality: int | None, frames: tuple[Frame, ...] | None) -> bytes | None:
        """Data the index needs beyond the hash, kept with the listing (only when :attr:`has_content`)."""
        return None

    # ---- lookups --------------------------------------------------------

    def default_json(self, defaults: LookupDefaults) -> Any:
        """This type's entry in ``GET /v1/hub`` ``defaults``; None when it has none (exact types)."""
        return None

    def query_fields(self) -> frozenset[str]:
        return QUERY_FIELDS

    def parse_query(
        self, item: Mapping[str, Any], request_max_distance: int | None, defaults: LookupDefaults
    ) -> Query:
        """A lookup query object (its ``type`` already read) as this type resolves it."""
        unknown = sorted(set(item) - self.query_fields())
        if unknown:
            raise QueryShapeError(f"{unknown[0]} does not apply to {self.name} queries")
        if "hash" not in item:
            raise QueryShapeError(f"a {self.name} query needs a hash")
        return Query(
            self, self.parse(item["hash"]), self.resolve_max_distance(item, request_max_distance, defaults)
        )

    def resolve_max_distance(
        self, item: Mapping[str, Any], request_max_distance: int | None, defaults: LookupDefaults
    ) -> int:
        """The query's own ``max_distance``, else the request's (where it applies), else the default."""
        if self.max_distance_limit is None:
            if "max_distance" in item:
                raise DistanceError(f"{self.name} matches identical hashes only: max_distance does not apply")
            return 0
        if "max_distance" in item:
            try:
                return check_int(item["max_distance"], "max_distance", 0, self.max_distance_limit)
            except SignalError as exc:
                raise DistanceError(str(exc)) from None
        if request_max_distance is not None and self.takes_request_max_distance:
            return request_max_distance
        return self.default_max_distance(defaults)

    def default_max_distance(self, defaults: LookupDefaults) -> int:
        return 0

    @abstractmethod
    def new_index(self, codes: Any = None, **options: Any) -> SearchIndex:
        """An empty index for this type's hashes (or one over saved ``codes``, see :attr:`snapshot_width`)."""

    def search(
        self, index: SearchIndex, queries: Sequence[Query], budget: MatchBudget | None
    ) -> list[list[Hit]]:
        """One list of hits per query, nearest first; ``budget`` bounds them and records cuts.

        Queries asking for different distances are searched in one call per distance.
        """
        by_distance: dict[int, list[int]] = {}
        for position, query in enumerate(queries):
            by_distance.setdefault(query.max_distance, []).append(position)
        results: list[list[Hit]] = [[] for _ in queries]
        for max_distance, positions in by_distance.items():
            whole = len(positions) == len(queries)
            part = budget if whole or budget is None else budget.subset(positions)
            found = index.search([queries[p].hash for p in positions], max_distance, part)
            for position, matches in zip(positions, found, strict=True):
                results[position] = [Hit(hash_hex, distance) for hash_hex, distance in matches]
            if part is not None and budget is not None and part is not budget:
                budget.truncated.update(positions[offset] for offset in part.truncated)
        return results
