"""`hashfed demo`: a complete federation on this machine, narrated step by step.

The demo makes (or reuses) member keys, creates a hub data directory, serves
the hub in-process on loopback, and then walks through what members do:
submit hashes, look up near-duplicates, give opinions, remove hashes, and
finally verify the hub's log the way a mirror does. Every value it prints is
the real one from that run.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from . import admin, demo_data
from .checkpoint import CheckpointError, open_note
from .client import HubClient, HubError
from .config import ConfigError, DataDir
from .demo_data import BRIDGE, FEDERATION, HUB_NAME, MAIN, SECOND, AuditError, LogAudit
from .durable import write_atomically
from .envelope import Addition, Grant, OpinionItem, Removal
from .hub import create_app, open_node
from .keys import KeyFormatError, SignerKey, VerifierKey, load_signer_file, write_signer_file
from .merkle import ProofError, verify_consistency, verify_inclusion
from .payloads import query_json
from .signals import PDQ, Frame
from .signals.pdq import DEFAULT_MAX_DISTANCE as PDQ_DEFAULT_MAX_DISTANCE
from .signals.vpdq import identity as video_identity

DEFAULT_KEYS = Path("keys/demo")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys",
        type=Path,
        default=DEFAULT_KEYS,
        metavar="DIR",
        help="where the demo members' keys live; existing signer keys are reused (default: keys/demo)",
    )
    parser.add_argument(
        "--data",
        type=Path,
        metavar="DIR",
        help="hub data directory to create (default: a temporary one, removed at the end)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary hub data directory to serve it later"
    )
    parser.add_argument(
        "--port", type=int, default=0, help="port to serve the hub on, on 127.0.0.1 (default: any free one)"
    )
    parser.add_argument("--quiet", action="store_true", help="print only the summary")


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except (ConfigError, KeyFormatError, HubError, CheckpointError, ProofError, AuditError, OSError) as exc:
        print(f"hashfed demo failed: {exc}", file=sys.stderr)
        return 1


# ---- output ---------------------------------------------------------------


@dataclass
class Narrator:
    quiet: bool
    steps: int = 0

    def say(self, text: str = "") -> None:
        if not self.quiet:
            print(text)

    def step(self, title: str) -> None:
        self.steps += 1
        self.say(f"\n== Step {self.steps}. {title} ".ljust(78, "="))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
        for line in (headers, ["-" * w for w in widths], *rows):
            self.say("  " + "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())


def short(hash_hex: str) -> str:
    return hash_hex[:16] + "..."


def plural(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "es" if noun.endswith(("sh", "ch")) else "s")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# ---- keys and hub set-up ----------------------------------------------------


@dataclass(frozen=True)
class DemoMember:
    name: str
    signer: SignerKey
    rights: frozenset[str]
    key_file: Path
    status: str


def prepare_keys(keys_dir: Path) -> list[DemoMember]:
    """Reuse each member's signer key if present, else make one; (re)write every .pub."""
    keys_dir.mkdir(parents=True, exist_ok=True)
    members = []
    for name, rights in demo_data.MEMBERS:
        key_file, pub_file = keys_dir / f"{name}.key", keys_dir / f"{name}.pub"
        if key_file.exists():
            signer = load_signer_file(key_file)
            if signer.name != name:
                raise KeyFormatError(f"{key_file} holds a key named {signer.name!r}, not {name!r}")
            status = "reused"
        else:
            status = "new, old .pub replaced" if pub_file.exists() else "new"
            signer = SignerKey.generate(name)
            write_signer_file(signer, key_file)
        write_atomically(pub_file, signer.verifier.encode() + "\n", mode=0o644)
        members.append(DemoMember(name, signer, rights, key_file, status))
    return members


def prepare_hub(data: DataDir, members: Sequence[DemoMember], port: int) -> tuple[VerifierKey, list[int]]:
    """Create the hub, its two collections and the grants; return its key and the grant indexes."""
    hub_key = admin.init_hub(data.path, name=HUB_NAME, federation=FEDERATION, collection=MAIN)
    if port:  # so that `hashfed serve DATA` listens where the demo did
        write_atomically(data.config_file, dataclasses.replace(data.config(), port=port).to_toml())
    admin.add_collection(data, SECOND)
    grants = [Grant(m.signer.verifier, m.rights) for m in members]
    indexes = [admin.change_membership(data, c, grant=grants).entry.index for c in (MAIN, SECOND)]
    return hub_key, indexes


@asynccontextmanager
async def serving(data: DataDir, port: int) -> AsyncIterator[str]:
    """Serve the hub on 127.0.0.1 in this process until the block ends; yield its URL."""
    runner = web.AppRunner(create_app(open_node(data), data.config()), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with HubClient(url, retries=0) as probe:
            deadline = time.monotonic() + 60
            while not await probe.ready():
                if time.monotonic() > deadline:
                    raise HubError(0, f"the hub at {url} did not become ready within 60 s")
                await asyncio.sleep(0.05)
        yield url
    finally:
        await runner.cleanup()


# ---- the walk-through -------------------------------------------------------


@dataclass
class Demo:
    out: Narrator
    hub_key: VerifierKey
    clients: dict[str, HubClient]
    first_checkpoint: str = ""
    removal_index: int = 0
    audits: dict[str, LogAudit] = field(default_factory=dict)

    async def lookup(self, title: str, queries: Sequence[tuple[str, str, str]]) -> list[list[dict[str, Any]]]:
        """Look up (description, type, hash) queries as safety-lab and print a table."""
        if title:
            self.out.say(title)
        found = await self.clients["safety-lab"].lookup([(t, h) for _, t, h in queries])
        rows = []
        for (description, _, _), matches in zip(queries, found, strict=True):
            if not matches:
                rows.append([description, "-", "not found", "", ""])
            for n, m in enumerate(matches):
                opinions = f"+{m['opinions']['positive']} -{m['opinions']['negative']}"
                submitters, labels = ", ".join(m["submitters"]), ", ".join(m["labels"])
                rows.append([description if n == 0 else "", str(m["distance"]), submitters, labels, opinions])
        self.out.table(["query", "distance", "submitters", "labels", "opinions"], rows)
        return found


def step_members(demo: Demo, data: DataDir, members: Sequence[DemoMember], grants: list[int]) -> None:
    out = demo.out
    out.step("A hub and its members")
    out.say(f"Created hub {HUB_NAME!r} for federation {FEDERATION!r} in {data.path}")
    out.say(f"with two collections, {MAIN} and {SECOND}. Each collection is an append-only log.")
    out.say("The hub's verifier key (members pin it to check what the hub signs):")
    out.say(f"  {demo.hub_key.encode()}")
    out.say("\nMembers sign everything they send with their own Ed25519 key:")
    rows = [
        [m.name, m.signer.key_id, "+".join(sorted(m.rights)), f"{m.key_file} ({m.status})"] for m in members
    ]
    out.table(["member", "key id", "rights", "signer key"], rows)
    for m in members:
        if m.status not in ("new", "reused"):
            out.say(
                f"  ({m.key_file.with_suffix('.pub')} had no signer key beside it, so {m.name} got a fresh pair.)"
            )
    if any(m.status == "reused" for m in members):
        out.say("  (Reused signer keys from an earlier run; each .pub was rewritten from its .key.)")
    out.say("\nThe hub granted these keys in membership entries it signed itself: log index")
    out.say(
        f"{grants[0]} of {MAIN} and {grants[1]} of {SECOND} (index 0 of each is the entry that created it)."
    )
    out.say("safety-lab may read and give opinions, but not submit hashes.")


async def step_submit(demo: Demo) -> None:
    out, clients = demo.out, demo.clients
    out.step("Members submit hashes")
    out.say("A submission is an envelope signed by the member (DSSE). The hub checks the signature")
    out.say("and the member's rights, appends it to the log, and answers with its log index.\n")
    out.say("acme submits the PDQ hashes of the PDQ reference 'bridge' photo in 8 orientations:")
    for label, hash_hex in BRIDGE.items():
        out.say(f"  {hash_hex}  {label}")
    acme = await clients["acme"].submit(MAIN, [Addition("pdq", h, (label,)) for label, h in BRIDGE.items()])
    out.say(f"  -> {MAIN} log index {acme.index}\n")

    same = [Addition("pdq", BRIDGE[label], ("globex-report-1041",)) for label in demo_data.GLOBEX_ALSO_LISTS]
    files = [
        Addition(kind, digest(text), (text.removeprefix("demo file: "),))
        for text in demo_data.FILE_SAMPLES
        for kind, digest in (("md5", demo_data.md5_hex), ("sha256", demo_data.sha256_hex))
    ]
    globex = await clients["globex"].submit(MAIN, same)
    out.say(f"globex submits {', '.join(demo_data.GLOBEX_ALSO_LISTS)} too, under its own label:")
    out.say(f"  -> {MAIN} log index {globex.index}")
    globex_files = await clients["globex"].submit(SECOND, files)
    out.say(f"and the md5 and sha256 of {len(demo_data.FILE_SAMPLES)} files to {SECOND} (exact-match types):")
    for item in files:
        out.say(f"  {item.signal:<6} {item.hash}  {item.labels[0]}")
    out.say(f"  -> {SECOND} log index {globex_files.index}\n")

    batch = demo_data.generated_batch()
    near = int(len(batch) * demo_data.INITECH_NEAR_SHARE)
    started = time.monotonic()
    initech = await clients["initech"].submit(MAIN, [Addition("pdq", h, ("initech-batch-7",)) for h in batch])
    out.say(f"initech submits {len(batch):,} generated PDQ hashes in one envelope ({near} of them are")
    out.say(f"near-duplicates of others, 1-12 bits apart), e.g. {short(batch[0])}, {short(batch[1])}:")
    out.say(
        f"  -> {MAIN} log index {initech.index} (signed, sent, verified and indexed in {time.monotonic() - started:.2f} s)"
    )

    demo.first_checkpoint = await clients["safety-lab"].checkpoint(MAIN)
    first = open_note(demo.first_checkpoint, demo.hub_key)
    out.say(
        f"\nThe hub's signed checkpoint of {MAIN} now covers {first.size} entries, root {b64(first.root)}."
    )
    out.say("We keep it, to check in step 7 that the log has only grown since.")


async def step_lookups(demo: Demo) -> None:
    out = demo.out
    out.step("Near-duplicate lookups")
    out.say("safety-lab looks up hashes of media found on its own service. PDQ hashes match when at most")
    out.say(
        f"{PDQ_DEFAULT_MAX_DISTANCE} of their 256 bits differ (Hamming distance), so a re-encoded or slightly"
    )
    out.say("edited copy still matches. Exact types (md5, sha256) match only identical hashes.\n")
    original = BRIDGE["bridge-1-original"]
    flips = [
        (f"bridge, {k} bits off", "pdq", demo_data.flip_bits(original, demo_data.flip_positions(k)))
        for k in demo_data.FLIP_COUNTS
    ]
    await demo.lookup("The original bridge hash with k of its bits flipped:", flips)
    out.say(
        f"\n(32 bits off is past the default distance of {PDQ_DEFAULT_MAX_DISTANCE}, so it is not a match.)\n"
    )
    variants = [(label, "pdq", h) for label, h in BRIDGE.items()]
    apart = [PDQ.distance(a, b) for a in BRIDGE.values() for b in BRIDGE.values() if a < b]
    await demo.lookup(
        f"The eight orientations are {min(apart)}-{max(apart)} bits apart, so each finds only itself:",
        variants,
    )
    md5 = demo_data.md5_hex(demo_data.FILE_SAMPLES[0])
    miss = demo_data.sha256_hex("demo file: holiday-photo.jpg")
    await demo.lookup(
        f"\nExact matches ({SECOND} is searched too: it is readable by safety-lab):",
        [(f"md5 {md5[:12]}...", "md5", md5), (f"sha256 {miss[:12]}...", "sha256", miss)],
    )
    batch = demo_data.generated_batch()
    cluster = (await demo.clients["safety-lab"].lookup([("pdq", batch[-1])]))[0]
    distances = ", ".join(str(m["distance"]) for m in cluster)
    out.say(f"\nOne of initech's near-duplicates finds {len(cluster)} of its hashes (distances {distances}).")


async def step_more_types(demo: Demo) -> None:
    out, clients = demo.out, demo.clients
    out.step("PhotoDNA images and vPDQ videos")
    out.say("PhotoDNA hashes are 144 bytes, compared by squared Euclidean distance. Real PhotoDNA hashing")
    out.say("is licensed, so these three are made-up vectors of the right shape. acme submits them in the")
    out.say("three forms tools write (hex, comma-separated numbers, base64); the hub keeps hex:")
    vectors = demo_data.photodna_samples()
    forms = [vectors[0].hex(), ",".join(map(str, vectors[1])), base64.b64encode(vectors[2]).decode()]
    for form in forms:
        out.say(f"  {form[:60]}...")
    submitted = await clients["acme"].submit(
        MAIN, [Addition("photodna", f, ("demo-photodna",)) for f in forms]
    )
    out.say(f"  -> {MAIN} log index {submitted.index}\n")
    copy = demo_data.edited(vectors[0], changes=20, by=30)
    other = demo_data.photodna_samples(1, seed=99)[0]
    reader = clients["safety-lab"]
    found = await reader.lookup([("photodna", copy.hex()), ("photodna", other.hex())])
    info = await reader.info()
    default = info.get("defaults", {}).get("photodna")
    out.say("safety-lab looks up an edited copy (20 bytes moved by 30) and an unrelated vector;")
    out.say(f"the hub's default maximum distance for PhotoDNA is {default:,}:")
    rows = [
        ["edited copy", f"{m['distance']:,}", ", ".join(m["submitters"]), ", ".join(m["labels"])]
        for m in found[0]
    ] or [["edited copy", "-", "not found", ""]]
    rows += [["unrelated", f"{m['distance']:,}", ", ".join(m["submitters"]), ""] for m in found[1]] or [
        ["unrelated", "-", "not found", ""]
    ]
    out.table(["query", "distance", "submitters", "labels"], rows)

    frames = demo_data.video_frames()
    video = [Frame(pdq, 90, float(second)) for second, pdq in enumerate(frames)]
    identity = video_identity(video)
    out.say(
        f"\nA video is the PDQ hashes of its frames (vPDQ). globex submits one of {len(frames)} frames to"
    )
    out.say(f"{SECOND}; its hash, {short(identity)}, is the SHA-256 of its distinct frame hashes:")
    listed = await clients["globex"].submit(
        SECOND, [Addition("vpdq", identity, ("demo-video",), frames=tuple(video))]
    )
    out.say(f"  -> {SECOND} log index {listed.index}")
    clip = [demo_data.flip_bits(pdq, demo_data.flip_positions(6)) for pdq in frames[10:34]]
    clip += demo_data.video_frames(6, seed=5)
    query = query_json(Addition("vpdq", "", frames=tuple(Frame(pdq, 90) for pdq in clip)))
    query.pop("hash")
    (matches,) = await reader.lookup([query])
    out.say(f"safety-lab looks up a clip: {len(clip) - 6} of the video's frames re-encoded (6 bits off each)")
    out.say("and 6 frames of other footage. A video matches when at least 80% of the query's frames")
    out.say("match one of its frames:")
    rows = [
        [
            "clip",
            str(m["distance"]),
            f"{m['query_match_percent']:.0f}%",
            f"{m['compared_match_percent']:.0f}%",
            ", ".join(m["submitters"]),
        ]
        for m in matches
    ] or [["clip", "-", "-", "-", "not found"]]
    out.table(["query", "distance", "query frames matched", "video frames matched", "submitters"], rows)


async def step_opinions(demo: Demo) -> None:
    out, label = demo.out, "bridge-3-rotate-180"
    out.step("Opinions")
    out.say(f"Members who read can say what they think of a listed hash. Two opinions on {label}:")
    negative = OpinionItem("pdq", BRIDGE[label], "negative", "false positive: matched a harmless photo")
    lab = await demo.clients["safety-lab"].give_opinions(MAIN, [negative])
    out.say(f"  safety-lab: negative ('{negative.note}') -> {MAIN} log index {lab.index}")
    positive = OpinionItem("pdq", BRIDGE[label], "positive", "confirmed by our reviewers")
    globex = await demo.clients["globex"].give_opinions(MAIN, [positive])
    out.say(f"  globex:     positive ('{positive.note}') -> {MAIN} log index {globex.index}")
    out.say("Each member's latest opinion counts once; lookups show the counts:\n")
    await demo.lookup("", [(label, "pdq", BRIDGE[label])])


async def step_removals(demo: Demo) -> None:
    out, acme = demo.out, demo.clients["acme"]
    out.step("Removals")
    out.say("A member removes only what it listed; a hash stays listed while any member still lists it.")
    shared, alone = "bridge-5-flipx", "bridge-8-flip-minus-1"
    first = await acme.submit(MAIN, removals=[Removal("pdq", BRIDGE[shared])])
    out.say(f"acme removes {shared}, which globex lists too -> {MAIN} log index {first.index}:\n")
    await demo.lookup("", [(shared, "pdq", BRIDGE[shared])])
    second = await acme.submit(MAIN, removals=[Removal("pdq", BRIDGE[alone])])
    out.say(f"\nacme removes {alone}, which only acme listed -> {MAIN} log index {second.index}:\n")
    await demo.lookup("", [(alone, "pdq", BRIDGE[alone])])
    demo.removal_index = second.index


async def step_verify(demo: Demo) -> None:
    out, reader = demo.out, demo.clients["safety-lab"]
    out.step("Verify the log, as a mirror does")
    out.say("Nothing so far needed trust in the hub. Here safety-lab checks what the hub served, using")
    out.say(f"only the hub's pinned verifier key {demo.hub_key.key_id}.\n")
    for collection in (MAIN, SECOND):
        note = await reader.checkpoint(collection)
        checkpoint = open_note(note, demo.hub_key)
        if collection == MAIN:
            out.say(f"The signed checkpoint of {MAIN}:\n")
            for line in note.rstrip("\n").split("\n"):
                out.say(f"    {line}".rstrip())
            out.say("\n  signature verified with the pinned key")
        entries = [entry async for entry in reader.stream_entries(collection)]
        audit = demo_data.audit_log(entries, demo.hub_key, FEDERATION, collection)
        demo.audits[collection] = audit
        kinds = ", ".join(f"{n} {kind}" for kind, n in audit.kinds.items())
        out.say(f"\n{collection}: pulled {len(entries)} entries as one NDJSON stream (entries: {kinds});")
        out.say("  every signature verified against the membership the log itself records")
        recomputed = audit.tree.root(checkpoint.size)
        if recomputed != checkpoint.root:
            raise AuditError(f"{collection}: recomputed root {b64(recomputed)} differs from the checkpoint's")
        out.say(
            f"  recomputed Merkle root over {checkpoint.size} entries: {b64(recomputed)} - matches the checkpoint"
        )
        if collection == MAIN:
            await verify_proofs(demo, checkpoint.size, checkpoint.root, audit)
    out.say("\nThis is what a mirror does on every sync, after which it can answer lookups itself.")
    out.say(
        "`hashfed mirror` does this continuously and keeps the verified copy, so a member can match offline."
    )


async def verify_proofs(demo: Demo, size: int, root_hash: bytes, audit: LogAudit) -> None:
    out, reader, index = demo.out, demo.clients["safety-lab"], demo.removal_index
    proof = await reader.inclusion_proof(MAIN, index, size)
    verify_inclusion(audit.leaves[index], index, size, proof, root_hash)
    out.say(f"  inclusion proof for the removal at index {index} ({plural(len(proof), 'hash')}): verified")
    old = open_note(demo.first_checkpoint, demo.hub_key)
    proof = await reader.consistency_proof(MAIN, old.size, size)
    verify_consistency(old.size, size, old.root, root_hash, proof)
    out.say(f"  consistency proof from the step-2 checkpoint (size {old.size}) to size {size}")
    out.say(f"  ({plural(len(proof), 'hash')}): verified - the hub only appended, it rewrote nothing")


def summary(args: argparse.Namespace, data: DataDir, demo: Demo, kept: bool, seconds: float) -> None:
    title = "Summary" if demo.out.quiet else f"Step {demo.out.steps + 1}. Summary"
    demo.out.say()
    print(f"== {title} ".ljust(78, "="))
    print(
        f"Federation {FEDERATION!r} on hub {HUB_NAME!r} (key {demo.hub_key.key_id}), ran in {seconds:.1f} s:"
    )
    for collection, audit in demo.audits.items():
        print(
            f"  {collection}: {audit.tree.size} log entries, {plural(len(audit.listed), 'hash')}"
            " listed; every signature, the checkpoint and the Merkle root verified"
        )
    print(f"Member keys: {args.keys} (*.key signer keys, mode 0600, git-ignored; *.pub verifier keys)")
    config = data.config()
    url = f"http://{config.host}:{config.port}"
    key = args.keys / "safety-lab.key"
    lookup = f"hashfed lookup --hub {url} --key {key} pdq:{BRIDGE['bridge-1-original']}"
    if kept:
        print(f"Hub data: {data.path} (kept)\n\nTry next:")
        print(f"  hashfed serve {data.path}    # serve this hub again, on {url}")
        print(f"  {lookup}    # in another terminal")
        print(f"  hashfed member list {data.path}    # who holds which key")
        print(
            f"  hashfed console-token {data.path}    # then open {url}/console/ while it serves, and log in"
        )
    else:
        print("Hub data: a temporary directory, now removed.\n\nTry next:")
        print("  hashfed demo --keep    # keep the hub's data directory; it then prints how to serve it")
        print("  hashfed serve DATA     # serve a kept hub; then look up as safety-lab:")
        print(f"  {lookup}")
    print("  hashfed keygen NAME --out keys/NAME.key    # make your own member key (see keys/README.md)")
    print("  hashfed --help")


async def _demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    out = Narrator(args.quiet)
    temporary = args.data is None
    data = DataDir(Path(tempfile.mkdtemp(prefix="hashfed-demo-")) if temporary else args.data)
    if not temporary and data.config_file.exists():
        raise ConfigError(f"{data.path} already holds a hub; serve it with `hashfed serve {data.path}`")
    try:
        out.say("hashfed demo: a complete federation on this machine, step by step.")
        members = prepare_keys(args.keys)
        hub_key, grants = prepare_hub(data, members, args.port)
        async with AsyncExitStack() as stack:
            url = await stack.enter_async_context(serving(data, args.port))
            clients = {m.name: HubClient(url, m.signer) for m in members}
            for client in clients.values():
                stack.push_async_callback(client.close)
            demo = Demo(out, hub_key, clients)
            step_members(demo, data, members, grants)
            out.say(f"\nThe hub is serving on {url}.")
            await step_submit(demo)
            await step_lookups(demo)
            await step_more_types(demo)
            await step_opinions(demo)
            await step_removals(demo)
            await step_verify(demo)
        kept = args.keep or not temporary
        summary(args, data, demo, kept, time.monotonic() - started)
    finally:
        if temporary and not args.keep:
            shutil.rmtree(data.path, ignore_errors=True)
    return 0
