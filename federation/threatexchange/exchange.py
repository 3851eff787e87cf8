"""A hashfed collection as a python-threatexchange exchange, fetched verified.

:meth:`HashfedExchange.fetch_iter` first brings a local mirror of the
collection up to the hub's newest checkpoint with the same verifying puller
as ``hashfed mirror`` (:func:`federation.sync.mirror.open_puller`): every
entry's signature, the checkpoint's signature against the pinned hub key and
the consistency proof from the last checkpoint trusted. Only when that whole
round succeeds does it yield anything, so a tampered or forked log stops the
fetch before pytx stores a single update. It then walks the verified log from
the pytx checkpoint (a log index, with the root there) and yields, for every
hash the walked entries touch, its state at the end of the verified log: its
listing members as opinions, or ``None`` when nobody lists it any more.

The mirror lives in a cache directory (``$HASHFED_CACHE``, by default
``~/.cache/hashfed/threatexchange``); losing it costs one full verification,
never correctness: the pytx checkpoint's root is checked against the new copy.

pytx builds its command-line options from the dataclass fields' types, so
this module keeps its annotations evaluated (no ``from __future__ import
annotations``).
"""

import asyncio
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from threatexchange.exchanges import auth
from threatexchange.exchanges import fetch_state as state
from threatexchange.exchanges.collab_config import CollaborationConfigWithDefaults
from threatexchange.exchanges.signal_exchange_api import SignalExchangeAPIWithSimpleUpdates
from threatexchange.signal_type.signal_base import SignalType

from ..client import HubClient, HubError, new_client_session
from ..config import ConfigError
from ..envelope import OpinionItem
from ..keys import KeyFormatError, SignerKey, load_signer_file, parse_key_chain
from ..payloads import BatchPayload, OpinionPayload
from ..replay import stored_payload
from ..store.base import MemberView
from ..sync.mirror import MirrorConfig, MirrorDir, open_puller
from ..sync.puller import SourceStopped, SyncProgress
from ..sync.verify import ForkDetected, VerificationError

log = logging.getLogger("hashfed.threatexchange")

API_NAME = "hashfed"
CACHE_ENV = "HASHFED_CACHE"
DEFAULT_CACHE = Path("~/.cache/hashfed/threatexchange")
DELTA_KEYS = 5_000
"""Hashes per yielded delta: HMA commits about this many at once."""
WALK_BYTES = 32 << 20
"""Entries read from the verified log at once are about this many bytes (one entry may hold 100,000 hashes)."""
PYTX_TYPES: dict[str, tuple[str, ...]] = {
    "pdq": ("pdq",),
    "md5": ("md5", "video_md5"),
    "sha1": ("sha1",),
    "sha256": ("sha256", "video_sha256"),
    "photodna": ("photodna",),
    "vpdq": ("vpdq",),
}
"""pytx signal type names for each hub type, preferred first: the first one the runtime has is used."""
HUB_TYPES = {pytx: hub for hub, names in PYTX_TYPES.items() for pytx in names}


class HashfedFetchError(Exception):
    """The hub's log could not be fetched verified; nothing of this fetch was yielded."""


@dataclass
class _RequiredFields:
    hub_url: str = field(metadata={"help": "the hub's URL, e.g. https://hub.example", "metavar": "URL"})
    collection: str = field(
        metadata={"help": "the collection to fetch: NAME, or HUB:NAME relayed by that hub", "metavar": "NAME"}
    )
    hub_key: str = field(
        metadata={
            "help": "the hub's verifier key (the text of its hub.pub, or of hub.keys after key rotations); "
            "every checkpoint must be signed by it",
            "metavar": "KEY",
        }
    )


@dataclass
class HashfedCollabConfig(CollaborationConfigWithDefaults, _RequiredFields):
    """Which hub and collection a pytx collaboration fetches, and the hub key it pins."""

    api: str = field(init=False, default=API_NAME)
    ca: str = field(
        default="",
        metadata={
            "help": "PEM file of the CA of an https:// hub's certificate, if not a public CA",
            "metavar": "FILE",
        },
    )

    def mirror_config(self) -> MirrorConfig:
        """The collaboration as a mirror configuration; a clear ValueError when it cannot be one."""
        if not self.hub_url.startswith(("http://", "https://")):
            raise ValueError(f"hashfed collab {self.name}: hub_url {self.hub_url!r} is not an http(s):// URL")
        try:
            pin = " ".join(key.encode() for key in parse_key_chain(self.hub_key))
            config = MirrorConfig(self.hub_url, "", self.collection, pin, self.ca)
            config.spec()
        except (KeyFormatError, ConfigError) as exc:
            raise ValueError(f"hashfed collab {self.name}: {exc}") from exc
        return config


@dataclass
class HashfedCredentials(auth.CredentialHelper):
    """The member's signer key: requests to the hub are signed with it, and so are opinions written back.

    From ``$HASHFED_SIGNER_KEY`` (the key itself, or the path of a key file)
    or the file ``~/.hashfed_signer_key``; HMA keeps it in its database.
    """

    ENV_VARIABLE: ClassVar[str] = "HASHFED_SIGNER_KEY"
    FILE_NAME: ClassVar[str] = "~/.hashfed_signer_key"

    signer_key: str = field(
        metadata={"help": "your member signer key (PRIVATE+KEY+...), as `hashfed keygen` wrote it"}
    )

    @classmethod
    def _from_str(cls, s: str) -> "HashfedCredentials":
        text = s.strip()
        path = Path(text).expanduser()
        if not text.startswith("PRIVATE+KEY+") and path.is_file():
            return cls(load_signer_file(path).encode())
        return cls(text)

    def _are_valid(self) -> bool:
        try:
            SignerKey.parse(self.signer_key)
        except KeyFormatError:
            return False
        return True

    def signer(self) -> SignerKey:
        return SignerKey.parse(self.signer_key)


@dataclass
class HashfedCheckpoint(state.FetchCheckpointBase):
    """How far the log was walked: its index and the Merkle root there, which a later fetch must agree with."""

    index: int
    root: str

    def get_progress_timestamp(self) -> int | None:
        return None


@dataclass
class HashfedOpinion(state.SignalOpinion):
    member: str = ""
    """The member (signer key name) whose listing or opinion this is."""


@dataclass
class HashfedSignalMetadata(state.FetchedSignalMetadata):
    """Who lists a hash and who gave an opinion on it, one pytx opinion per member."""

    opinions: list[HashfedOpinion]
    signal: str | None = None
    """The pytx signal string where it is not the update's key: a video's frames, keyed by its identity,
    so that a removal (which names only the identity) deletes it."""

    def get_as_opinions(self) -> Sequence[state.SignalOpinion]:
        return self.opinions


def opinion_of(view: MemberView, me: str) -> HashfedOpinion:
    """A member's view of a hash as a pytx opinion: a listing or a positive opinion is the positive
    class, a negative opinion the negative class (a false positive); its labels are the tags."""
    category = (
        state.SignalOpinionCategory.NEGATIVE_CLASS
        if view.verdict == "negative"
        else state.SignalOpinionCategory.POSITIVE_CLASS
    )
    return HashfedOpinion(view.member == me, category, set(view.labels), view.member)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


class HashfedExchange(
    auth.SignalExchangeWithAuth[HashfedCollabConfig, HashfedCredentials],
    SignalExchangeAPIWithSimpleUpdates[HashfedCollabConfig, HashfedCheckpoint, HashfedSignalMetadata],
):
    """Fetches one hashfed collection, verified as ``hashfed mirror`` verifies it; writes opinions back."""

    def __init__(self, collab: HashfedCollabConfig, signer: SignerKey, cache: Path | None = None) -> None:
        self.collab = collab
        self.config = collab.mirror_config()
        self.signer = signer
        identity = hashlib.sha256(f"{self.config.hub}\n{self.config.collection}\n{self.config.pin}".encode())
        self.mirror = MirrorDir((cache or cache_root()) / f"{collab.name}-{identity.hexdigest()[:16]}")

    @classmethod
    def get_name(cls) -> str:
        return API_NAME

    @staticmethod
    def get_config_cls() -> type[HashfedCollabConfig]:
        return HashfedCollabConfig

    @staticmethod
    def get_checkpoint_cls() -> type[HashfedCheckpoint]:
        return HashfedCheckpoint

    @staticmethod
    def get_record_cls() -> type[HashfedSignalMetadata]:
        return HashfedSignalMetadata

    @staticmethod
    def get_credential_cls() -> type[HashfedCredentials]:
        return HashfedCredentials

    @classmethod
    def for_collab(
        cls, collab: HashfedCollabConfig, credentials: HashfedCredentials | None = None
    ) -> "HashfedExchange":
        credentials = credentials or HashfedCredentials.get(cls)
        return cls(collab, credentials.signer())

    # ---- fetching ------------------------------------------------------------

    @classmethod
    def naive_convert_to_signal_type(
        cls,
        signal_types: Sequence[type[SignalType]],
        collab: HashfedCollabConfig,
        fetched: Mapping[tuple[str, str], HashfedSignalMetadata | None],
    ) -> dict[type[SignalType], dict[str, HashfedSignalMetadata]]:
        """As pytx's, with a video's frames (not its identity) as its signal string."""
        keyed = {
            (name, value.signal if value is not None and value.signal else signal): value
            for (name, signal), value in fetched.items()
        }
        return super().naive_convert_to_signal_type(signal_types, collab, keyed)

    def fetch_iter(
        self,
        supported_signal_types: Sequence[type[SignalType]],
        checkpoint: HashfedCheckpoint | None,
    ) -> Iterator[state.FetchDelta[tuple[str, str], HashfedSignalMetadata, HashfedCheckpoint]]:
        size = asyncio.run(self._sync())
        names = {signal.get_name() for signal in supported_signal_types}
        pytx_name = {
            hub: next((name for name in candidates if name in names), None)
            for hub, candidates in PYTX_TYPES.items()
        }
        node = self.mirror.open_node()
        collection = self.config.spec().name
        try:
            start = 0 if checkpoint is None else self._resume_at(node, collection, checkpoint, size)
            skipped: dict[str, int] = {}
            delivered = deleted = 0
            touched: dict[tuple[str, str], None] = {}
            position = start
            while position < size:
                records = node.store.entries(collection, position, 1_000, max_bytes=WALK_BYTES)
                if not records:
                    raise HashfedFetchError(f"{self.collab.name}: the local copy lost entry {position}")
                for record in records:
                    touched.update(dict.fromkeys(_touched_keys(record.data)))
                    position = record.index + 1
                    if len(touched) >= DELTA_KEYS or position == size:
                        updates = self._updates(node, collection, list(touched), pytx_name, skipped)
                        delivered += len(updates)
                        deleted += sum(1 for value in updates.values() if value is None)
                        touched = {}
                        root = node.root(collection, position).hex()
                        yield state.FetchDelta(updates, HashfedCheckpoint(position, root))
        finally:
            node.store.close()
        log.info(
            "%s: delivered %d updates (%d deletions) from log entries %d to %d",
            self.collab.name,
            delivered,
            deleted,
            start,
            size,
        )
        for hub_type, count in sorted(skipped.items()):
            log.warning(
                "%s: %d %s hashes not delivered: this runtime has no pytx signal type for them "
                "(add one of: %s)",
                self.collab.name,
                count,
                hub_type,
                ", ".join(PYTX_TYPES.get(hub_type, ())) or "none exists yet",
            )

    async def _sync(self) -> int:
        """Bring the mirror up to the hub's checkpoint, verified; return the verified log size."""
        self.mirror.write_config(self.config)
        async with open_puller(self.mirror, self.config, self.signer, on_progress=self._progress) as puller:
            try:
                result = await puller.sync()
            except ForkDetected as exc:
                where = ""
                if not isinstance(exc, SourceStopped):
                    where = f"; evidence kept in {self.mirror.save_evidence(exc.evidence)}"
                log.critical("FORK DETECTED in %s: %s%s", self.collab.name, exc.evidence.detail, where)
                raise HashfedFetchError(
                    f"{self.collab.name}: the hub showed a forked history ({exc.evidence.detail}){where}; "
                    "nothing more is fetched from it"
                ) from exc
            except VerificationError as exc:
                log.error("%s: verification failed, nothing was fetched: %s", self.collab.name, exc)
                raise HashfedFetchError(
                    f"{self.collab.name}: verification failed, nothing was fetched: {exc}"
                ) from exc
            except HubError as exc:
                raise HashfedFetchError(f"{self.collab.name}: {exc.detail}") from exc
            self.mirror.save_checkpoint(await puller.verified_checkpoint())
        return result.after

    def _progress(self, progress: SyncProgress) -> None:
        log.info(
            "%s: %d/%d entries verified (%.1f MB)",
            self.collab.name,
            progress.size,
            progress.goal,
            progress.bytes / 1e6,
        )

    def _resume_at(self, node: Any, collection: str, checkpoint: HashfedCheckpoint, size: int) -> int:
        """The index to walk from, once the stored checkpoint is shown to be a prefix of the verified log."""
        if checkpoint.index > size:
            raise HashfedFetchError(
                f"{self.collab.name}: the hub's verified log has {size:,} entries, fewer than the "
                f"{checkpoint.index:,} fetched before: it rolled its log back, or this is another hub"
            )
        if node.root(collection, checkpoint.index).hex() != checkpoint.root:
            raise HashfedFetchError(
                f"{self.collab.name}: the hub's log at {checkpoint.index:,} entries is not the one fetched "
                "before (another root): it showed two histories; keep the stored data and ask its operator"
            )
        return checkpoint.index

    def _updates(
        self,
        node: Any,
        collection: str,
        keys: list[tuple[str, str]],
        pytx_name: dict[str, str | None],
        skipped: dict[str, int],
    ) -> dict[tuple[str, str], HashfedSignalMetadata | None]:
        by_type: dict[str, list[str]] = {}
        for signal, hash_hex in keys:
            by_type.setdefault(signal, []).append(hash_hex)
        updates: dict[tuple[str, str], HashfedSignalMetadata | None] = {}
        for signal, hashes in by_type.items():
            name = pytx_name.get(signal)
            if name is None:
                skipped[signal] = skipped.get(signal, 0) + len(hashes)
                continue
            views = node.store.member_views(collection, signal, hashes)
            frames = _video_frames(node, collection, hashes) if signal == "vpdq" else {}
            for hash_hex in hashes:
                members = [view for view in views.get(hash_hex, ()) if view.listed]
                updates[(name, hash_hex)] = (
                    HashfedSignalMetadata(
                        [opinion_of(view, self.signer.name) for view in views[hash_hex]], frames.get(hash_hex)
                    )
                    if members
                    else None
                )
        return updates

    # ---- writing back --------------------------------------------------------

    def report_opinion(self, s_type: type[SignalType], signal: str, opinion: state.SignalOpinion) -> None:
        """Write the member's opinion to the hub as a signed hashfed opinion.

        The positive class is ``positive``, the negative class (a false
        positive) ``negative``; the tags go into the opinion's note. pytx's
        investigation seed has no hashfed counterpart and is refused.
        """
        hub_type = HUB_TYPES.get(s_type.get_name())
        if hub_type is None:
            raise ValueError(f"hashfed carries no signal type {s_type.get_name()!r}")
        verdicts = {
            state.SignalOpinionCategory.POSITIVE_CLASS: "positive",
            state.SignalOpinionCategory.NEGATIVE_CLASS: "negative",
        }
        if opinion.category not in verdicts:
            raise ValueError(
                f"hashfed opinions are positive or negative; {opinion.category.name} has no hashfed counterpart"
            )
        note = " ".join(sorted(opinion.tags)) or None
        item = OpinionItem(hub_type, s_type.validate_signal_str(signal), verdicts[opinion.category], note)
        asyncio.run(self._give_opinion(item))

    async def _give_opinion(self, item: OpinionItem) -> None:
        timeout = aiohttp.ClientTimeout(total=60)
        async with new_client_session(timeout, self.config.tls) as session:
            client = HubClient(self.config.hub, self.signer, session=session, retries=2)
            await client.give_opinions(self.config.collection, [item])


def _video_frames(node: Any, collection: str, hashes: list[str]) -> dict[str, str]:
    """Listed videos' frames as pytx's vPDQ signal string (a JSON list of ``"pdqhex,quality,timestamp"``),
    read from the entry that first listed each."""
    details = node.store.details(collection, "vpdq", hashes)
    result: dict[str, str] = {}
    for hash_hex, detail in details.items():
        payload = stored_payload(node.store.entries(collection, detail.first_index, 1)[0].data)
        assert isinstance(payload, BatchPayload)
        addition = next(item for item in payload.add if item.signal == "vpdq" and item.hash == hash_hex)
        result[hash_hex] = json.dumps(
            [f"{frame.pdq},{frame.quality},{frame.time or 0.0:.3f}" for frame in addition.frames or ()]
        )
    return result


def _touched_keys(data: bytes) -> list[tuple[str, str]]:
    """The (type, hash) pairs one verified log entry lists, removes or gives an opinion on."""
    payload = stored_payload(data)
    if isinstance(payload, BatchPayload):
        return [(item.signal, item.hash) for item in payload.add] + [
            (item.signal, item.hash) for item in payload.remove
        ]
    if isinstance(payload, OpinionPayload):
        return [(item.signal, item.hash) for item in payload.opinions]
    return []
