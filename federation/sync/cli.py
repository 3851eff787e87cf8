"""``hashfed mirror`` and ``hashfed lookup --mirror``: a member's verified, offline copy of a collection.

Exit status of ``hashfed mirror``: 0 in step (or, with ``--compare``,
consistent); 1 the hub refused or could not be reached, or a comparison
could not be decided yet; 2 usage or configuration; 3 FORK: the hub signed
two histories that cannot both be true, evidence was kept and nothing more
is applied from it; 4 the hub's data failed verification and nothing of it
was applied (tampering or corruption; the next run tries again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from ..cli_output import plural
from ..client import MAX_JSON_BYTES, HubError, new_client_session, read_limited
from ..config import ConfigError
from ..keys import load_signer_file, parse_key_chain
from ..signals import LookupDefaults, parse_query
from ..tls import add_tls_options
from .mirror import MirrorConfig, MirrorDir, lookup, open_puller
from .puller import READ_TIMEOUT, SourceStopped, SyncProgress, SyncResult
from .verify import ForkDetected, VerificationError

EXIT_FORK = 3
EXIT_UNVERIFIED = 4

DESCRIPTION = (
    "Keep a verified copy of one collection in DIR. Every entry's signature is checked against the "
    "membership entries of the same log, every checkpoint against the hub key you pin and against the "
    "last one trusted, and entries are applied exactly as the hub applies them. Then `hashfed lookup "
    "--mirror DIR` answers without sending your hashes anywhere. The first run needs --hub, --key, "
    "--collection and --pin; later runs read them from DIR/mirror.toml and resume where the last one "
    "stopped. Exit status 3 means the hub showed a forked history (evidence is kept in DIR/evidence), "
    "4 that its data failed verification (nothing of it was applied)."
)
EXAMPLES = """\
hashfed mirror --hub https://hub.example --key acme.key --collection csam --pin hub.pub acme-mirror
hashfed mirror acme-mirror --watch
hashfed mirror acme-mirror --compare https://other-hub.example/v1/sources
hashfed lookup --mirror acme-mirror --type pdq --file queries.txt"""


def add_mirror_command(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "mirror",
        help="keep a verified offline copy of a collection",
        description=textwrap.fill(DESCRIPTION, 78),
        epilog="examples:\n" + textwrap.indent(EXAMPLES, "  "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="mirror directory (created on the first run)")
    parser.add_argument(
        "--hub", metavar="URL", default=os.environ.get("HASHFED_HUB"), help="hub URL (default: $HASHFED_HUB)"
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=os.environ.get("HASHFED_KEY"),
        help="your signer key file; the hub must grant it read (default: $HASHFED_KEY)",
    )
    parser.add_argument(
        "--collection", metavar="NAME", help="collection to mirror: NAME, or HUB:NAME relayed by --hub"
    )
    parser.add_argument("--pin", metavar="KEY", help="the origin hub's verifier key, or a .pub file")
    parser.add_argument("--watch", action="store_true", help="keep following the log")
    parser.add_argument(
        "--interval", type=float, default=30.0, metavar="S", help="seconds between polls with --watch"
    )
    add_tls_options(parser)
    parser.add_argument(
        "--read-timeout",
        type=float,
        default=READ_TIMEOUT,
        metavar="S",
        help=f"give up on a hub that sends nothing for S seconds while answering (default {READ_TIMEOUT:g}); "
        "the run then exits 1 like any unreachable hub",
    )
    parser.add_argument(
        "--compare",
        metavar="NOTE",
        help="compare the mirror's checkpoint with another one: a file, or a URL of a checkpoint "
        "or of a hub's /v1/sources",
    )
    parser.set_defaults(func=cmd_mirror)


RESUME_DESCRIPTION = (
    "Let a mirrored collection that fork evidence stopped sync again, once you have investigated: "
    "for example after checking that the evidence came from a proof altered on the way, or after the "
    "hub's operator restored the history you had verified. DIR is a hub data directory (give the "
    "mirrored collection's name, HUB:NAME, as listed by GET /v1/sources) or a `hashfed mirror` "
    "directory. The evidence is kept; a hub that really signed two histories is caught again at "
    "the next sync."
)


def add_resume_command(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "resume",
        help="let a source stopped by fork evidence sync again",
        description=textwrap.fill(RESUME_DESCRIPTION, 78),
        epilog="examples:\n  hashfed resume ./hub origin-hub:csam\n  hashfed resume acme-mirror",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("dir", metavar="DIR", help="hub data directory or mirror directory")
    parser.add_argument("source", metavar="SOURCE", nargs="?", help="mirrored collection (HUB:NAME)")
    parser.set_defaults(func=cmd_resume)


def cmd_resume(args: argparse.Namespace) -> int:
    from ..config import DataDir
    from ..hub.server import open_node

    path = Path(args.dir)
    mirror = MirrorDir(path)
    if mirror.exists():
        node = mirror.open_node()
        name = args.source or mirror.config().spec().name
    elif DataDir(path).config_file.exists():
        if not args.source:
            raise ConfigError("name the mirrored collection to resume (HUB:NAME, see GET /v1/sources)")
        node = open_node(DataDir(path), searchable=False)
        name = args.source
    else:
        raise ConfigError(f"{path} is neither a hub data directory nor a mirror directory")
    try:
        if node.store.source(name) is None:
            known = ", ".join(record.name for record in node.store.sources()) or "none"
            raise ConfigError(f"{path} mirrors no collection named {name!r} (it mirrors: {known})")
        evidence = len(node.store.evidence(name))
        if not node.store.resume_source(name):
            print(f"{name} was not stopped; nothing to do")
            return 0
    finally:
        node.store.close()
    print(
        f"{name} resumed: it syncs again from its last verified checkpoint "
        f"({plural(evidence, 'piece')} of evidence kept); a running hub picks this up at its next poll"
    )
    return 0


def _path_or(given: str | None, kept: str) -> str:
    return str(Path(given).resolve()) if given else kept


def _pin(text: str) -> str:
    """The pinned key (or a hub's keys after a rotation, oldest first: its hub.keys), from text or a file."""
    path = Path(text)
    keys = parse_key_chain(path.read_text() if path.is_file() else text)
    return " ".join(key.encode() for key in keys)


def _mirror_config(args: argparse.Namespace, mirror: MirrorDir) -> MirrorConfig:
    """The configuration from DIR/mirror.toml, with --hub and --key updating it; or a new one."""
    pin = _pin(args.pin) if args.pin else None
    key = str(Path(args.key).resolve()) if args.key else None
    if mirror.exists():
        config = mirror.config()
        if args.collection and args.collection != config.collection:
            raise ConfigError(f"{mirror.path} mirrors {config.collection}; use a new directory for another")
        if pin and pin != config.pin:
            raise ConfigError(f"{mirror.path} pins another hub key; use a new directory for another hub")
        updated = MirrorConfig(
            args.hub or config.hub,
            key or config.key,
            config.collection,
            config.pin,
            _path_or(args.ca, config.ca),
            _path_or(args.client_cert, config.client_cert),
        )
    else:
        missing = [f"--{n}" for n in ("hub", "key", "collection", "pin") if not getattr(args, n)]
        if missing:
            raise ConfigError(f"{mirror.path} is a new mirror: give {', '.join(missing)}")
        updated = MirrorConfig(
            args.hub,
            key or "",
            args.collection,
            pin or "",
            _path_or(args.ca, ""),
            _path_or(args.client_cert, ""),
        )
    if not updated.hub.startswith(("http://", "https://")):
        raise ConfigError(f"--hub {updated.hub!r} is not an http:// or https:// URL")
    updated.spec()
    if updated != (mirror.config() if mirror.exists() else None):
        mirror.write_config(updated)
    return updated


class _Progress:
    """Entries verified out of the checkpoint's size: one redrawn line on a terminal, a line every 5 s elsewhere."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = 0.0
        self.drawn = False

    def __call__(self, progress: SyncProgress) -> None:
        now = time.monotonic()
        done = progress.size >= progress.goal
        if not self.tty and now - self.last < 5 and not done:
            return
        self.last = now
        rate = progress.bytes / max(progress.seconds, 1e-9) / 1e6
        text = (
            f"{progress.name}: {progress.size:,}/{progress.goal:,} entries verified "
            f"({100 * progress.size / max(progress.goal, 1):.0f}%), {progress.bytes / 1e6:,.1f} MB, {rate:,.1f} MB/s"
        )
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.drawn = False


async def _fetch_note(source: str, name: str, hub: str, collection: str) -> str:
    if not source.startswith(("http://", "https://")):
        return Path(source).read_text()
    timeout = aiohttp.ClientTimeout(total=60)
    async with (
        new_client_session(timeout) as session,
        session.get(source, headers={"Accept-Encoding": "identity"}) as response,
    ):
        if response.status != 200:
            raise HubError(response.status, f"{source} answered {response.status}")
        text = (await read_limited(response, MAX_JSON_BYTES, source)).decode("utf-8")
        if response.content_type != "application/json":
            return text
    for item in json.loads(text).get("sources", []):
        if item.get("hub") == hub and item.get("collection") == collection and item.get("checkpoint"):
            return str(item["checkpoint"])
    raise HubError(404, f"{source} lists no verified checkpoint of {name}")


def _report(result: SyncResult) -> str:
    applied = result.after - result.before
    return (
        f"{result.name}: {plural(applied, 'new entry')} verified and applied; the mirror holds "
        f"{result.after:,} entries, checkpoint size {result.checkpoint:,} "
        f"({result.bytes / 1e6:,.1f} MB in {result.seconds:.1f} s)"
    )


async def _mirror(args: argparse.Namespace, mirror: MirrorDir, config: MirrorConfig) -> int:
    spec = config.spec()
    progress = _Progress(sys.stderr)
    signer = load_signer_file(Path(config.key))
    async with open_puller(
        mirror, config, signer, read_timeout=args.read_timeout, on_progress=progress
    ) as puller:
        try:
            if args.compare:
                note = await _fetch_note(args.compare, spec.name, spec.origin.hub, spec.origin.collection)
                consistent, how = await puller.compare(note)
                print(f"{spec.name}: {how}")
                return 0 if consistent else 1
            failures = rounds = 0
            while True:
                try:
                    result = await puller.sync()
                except (VerificationError, HubError) as exc:
                    progress.finish()
                    if isinstance(exc, ForkDetected) or not args.watch:
                        raise
                    failures += 1
                    print(f"hashfed: {spec.name}: {exc}; retrying", file=sys.stderr)
                    await asyncio.sleep(min(args.interval * 2**failures, 300.0))
                    continue
                failures = 0
                progress.finish()
                if result.source_size < result.checkpoint:
                    print(
                        f"hashfed: warning: {spec.name}: the hub showed a checkpoint of {result.source_size:,} "
                        f"entries, older than the {result.checkpoint:,} already verified here (it is consistent "
                        "with it: a stale replica or cache in front of the hub?)",
                        file=sys.stderr,
                    )
                mirror.save_checkpoint(await puller.verified_checkpoint())
                if rounds == 0 or result.after != result.before:  # --watch reports changes only
                    print(_report(result), flush=True)
                if not args.watch:
                    return 0
                rounds += 1
                await asyncio.sleep(args.interval)
        except ForkDetected as exc:
            progress.finish()
            if not isinstance(exc, SourceStopped):
                path = mirror.save_evidence(exc.evidence)
                print(f"hashfed: FORK DETECTED: {exc.evidence.detail}", file=sys.stderr)
                print(
                    f"hashfed: evidence kept in {path}; nothing more is applied from this hub",
                    file=sys.stderr,
                )
            else:
                print(
                    f"hashfed: FORK: {spec.name} was stopped by fork evidence ({exc.evidence.detail}); "
                    f"see {mirror.evidence_dir}. Start a new mirror directory to follow another history.",
                    file=sys.stderr,
                )
            return EXIT_FORK
        except VerificationError as exc:
            print(f"hashfed: error: verification failed, nothing of it was applied: {exc}", file=sys.stderr)
            return EXIT_UNVERIFIED


def cmd_mirror(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise ConfigError("--interval must be a positive number of seconds")
    if args.read_timeout <= 0:
        raise ConfigError("--read-timeout must be a positive number of seconds")
    mirror = MirrorDir(Path(args.dir))
    config = _mirror_config(args, mirror)
    return asyncio.run(_mirror(args, mirror, config))


def mirror_lookup(
    directory: str, queries: list[dict[str, Any]], max_distance: int | None, collections: list[str]
) -> list[list[dict[str, Any]]]:
    """``hashfed lookup --mirror DIR``: the mirror answers; nothing leaves this machine.

    Queries are wire query objects, resolved as a hub resolves them, with the
    protocol's default distances where a query gives none.
    """
    node = MirrorDir(Path(directory)).open_node()
    try:
        parsed = [parse_query(query, max_distance, LookupDefaults()) for query in queries]
        return lookup(node, parsed, collections)
    finally:
        node.store.close()
