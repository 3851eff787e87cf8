"""``hashfed``: run a hub, manage its members, and submit and look up hashes as a member."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__, admin
from .checkpoint_record import HistoryMismatch
from .cli_output import HELP, Progress, index_range, lookup_table, members_table, plural
from .client import HubClient, HubError
from .config import ConfigError, DataDir
from .durable import write_atomically
from .envelope import RIGHTS, VERDICTS, Addition, Grant, OpinionItem, Removal
from .hashfile import HashCollector, HashFileError
from .keys import KEY_ID_PATTERN, KeyFormatError, SignerKey, VerifierKey, load_signer_file, write_signer_file
from .payloads import query_json
from .signals import SIGNAL_TYPES, SignalError, signal_type
from .signals.pdq import MAX_DISTANCE_LIMIT as REQUEST_MAX_DISTANCE_LIMIT
from .state import Refusal
from .store.base import StorageUnavailable, StoreError
from .store.opening import redact
from .tls import add_tls_options, client_tls

MAX_BATCH = 100_000
MAX_QUERIES = 10_000
T = TypeVar("T")


class UsageError(Exception):
    """A command line or input that cannot be used (exit status 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _command(sub: Any, name: str) -> argparse.ArgumentParser:
    summary, description, examples = HELP[name]
    parser: argparse.ArgumentParser = sub.add_parser(
        name.split()[-1],
        help=summary,
        description=textwrap.fill(description, 78),
        epilog="examples:\n" + "\n".join(f"  {line}" for line in examples.splitlines()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _int_in(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low:,} and {high:,}")
        return value

    return parse


def member_options(parser: argparse.ArgumentParser, *, collection: bool = True, types: bool = True) -> None:
    """``--hub``, ``--key``, TLS, ``--collection`` and (for hash inputs) ``--type``."""
    parser.add_argument(
        "--hub", metavar="URL", default=os.environ.get("HASHFED_HUB"), help="hub URL (default: $HASHFED_HUB)"
    )
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=os.environ.get("HASHFED_KEY"),
        help="your signer key file, from `hashfed keygen` (default: $HASHFED_KEY)",
    )
    add_tls_options(parser)
    if collection:
        parser.add_argument("--collection", metavar="NAME", required=True, help="collection name")
    if types:
        parser.add_argument(
            "--type", choices=sorted(SIGNAL_TYPES), help="type of hashes given without one (TYPE:HASH)"
        )


# ---- hub administration ---------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    out = Path(args.out or f"{args.name}.key")
    public = out.with_suffix(".pub")
    if out == public:
        raise UsageError(f"--out {out} ends in .pub, the verifier key's name: use a name like {out.stem}.key")
    for path in (out, public):
        if path.exists():
            raise UsageError(f"{path} already exists; refusing to overwrite it (choose another --out)")
    signer = SignerKey.generate(args.name)
    write_signer_file(signer, out)
    write_atomically(public, signer.verifier.encode() + "\n", mode=0o644)
    print(f"wrote signer key {out} (mode 0600: keep it secret) and verifier key {public}", file=sys.stderr)
    print(signer.verifier.encode())
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    key = admin.init_hub(
        Path(args.dir),
        name=args.name,
        federation=args.federation,
        collection=args.collection,
        database=args.db,
    )
    data = DataDir(Path(args.dir))
    print(f"created hub {args.name} of federation {args.federation} in {data.path}")
    if args.db:
        print(f"database: {redact(args.db)} (replicas: copy {data.path} to each machine, then serve it)")
    print(f"collection: {args.collection}")
    print(f"configuration: {data.config_file}")
    print(f"signer key: {data.signer_file} (back it up, never share it)")
    print(f"start it with: hashfed serve {data.path}")
    print("hub verifier key (give it to members and peers):")
    print(key.encode())
    return 0


def _verifier_key(text: str) -> VerifierKey:
    if Path(text).is_file():
        return VerifierKey.parse(Path(text).read_text())
    if "+" not in text:
        raise UsageError(f"--key {text!r} is neither a verifier key nor an existing .pub file")
    return VerifierKey.parse(text)


def _rights(text: str) -> frozenset[str]:
    rights = frozenset(part.strip() for part in text.split(",") if part.strip())
    if not rights or not rights <= set(RIGHTS):
        raise UsageError(f"--rights {text!r}: give read, write or read,write")
    return rights


def cmd_member_grant(args: argparse.Namespace) -> int:
    key = _verifier_key(args.key)
    rights = _rights(args.rights)
    accepted = admin.change_membership(DataDir(Path(args.dir)), args.collection, grant=[Grant(key, rights)])
    granted = ",".join(r for r in RIGHTS if r in rights)
    print(
        f"granted {key.key_id} {granted} on collection {args.collection} (log index {accepted.entry.index})"
    )
    return 0


def cmd_member_revoke(args: argparse.Namespace) -> int:
    key_id = args.key if KEY_ID_PATTERN.fullmatch(args.key) else _verifier_key(args.key).key_id
    accepted = admin.change_membership(DataDir(Path(args.dir)), args.collection, revoke=[key_id])
    print(f"revoked {key_id} on collection {args.collection} (log index {accepted.entry.index})")
    return 0


def cmd_member_list(args: argparse.Namespace) -> int:
    records = admin.list_members(DataDir(Path(args.dir)))
    if args.collection:
        records = [(c, record) for c, record in records if c == args.collection]
    if not records:
        print("no member keys yet: grant one with `hashfed member grant`")
        return 0
    print(members_table(records))
    return 0


def cmd_collection_add(args: argparse.Namespace) -> int:
    accepted = admin.add_collection(DataDir(Path(args.dir)), args.collection)
    print(f"created collection {args.collection} (log index {accepted.entry.index})")
    print(f"grant members with: hashfed member grant {args.dir} --collection {args.collection} --key KEY")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .hub.server import serve

    data = DataDir(Path(args.dir))
    data.config()  # a configuration problem is reported before the server starts
    serve(data, args.host, args.port, args.log_format, args.workers)
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    replayed = admin.rebuild(DataDir(Path(args.dir)))
    for collection, count in replayed.items():
        print(f"{collection}: replayed {count:,} log entries")
    return 0


def cmd_migrate_store(args: argparse.Namespace) -> int:
    from .migrate import describe, migrate_store

    data = DataDir(Path(args.dir))
    shown = [0.0]

    def progress(collection: str, done: int, total: int) -> None:
        if time.monotonic() - shown[0] >= 5 or done == total:
            shown[0] = time.monotonic()
            print(f"{collection}: copied {done:,} of {total:,} entries", file=sys.stderr)

    source = data.database
    moved = migrate_store(data, args.to, progress)
    print(describe(moved, args.to, source))
    return 0


def cmd_console_token(args: argparse.Namespace) -> int:
    from .console.access import ConsoleAccess

    data = DataDir(Path(args.dir))
    data.config()
    token, expiry = ConsoleAccess(data.console_tokens_file).issue(args.hours)
    config = data.config()
    scheme = "https" if config.tls_cert else "http"
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    print(
        f"open {scheme}://{host}:{config.port}/console/ and log in with this token; it works until "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(expiry))} (only its hash is kept)",
        file=sys.stderr,
    )
    print(token)
    return 0


def cmd_rotate_key(args: argparse.Namespace) -> int:
    data = DataDir(Path(args.dir))
    old, new, rotated = admin.rotate_hub_key(data, args.overlap_days * 86400)
    for collection, index in rotated.items():
        said = "already handed over" if index is None else f"handed over at log index {index}"
        print(f"{collection}: {said}")
    print(
        f"the hub key is now {new.key_id} (was {old.key_id}); for {args.overlap_days} days checkpoints "
        f"carry both signatures. Give members and peers the new {data.verifier_file.name}; "
        f"new mirrors pin {data.key_chain_file} (every key, oldest first). Start the hub again.",
        file=sys.stderr,
    )
    print(new.encode())
    return 0


# ---- member commands ------------------------------------------------------


def _check_member_args(args: argparse.Namespace) -> None:
    if not args.hub:
        raise UsageError("no hub given: use --hub URL or set HASHFED_HUB")
    if not args.hub.startswith(("http://", "https://")):
        raise UsageError(f"--hub {args.hub!r} is not an http:// or https:// URL")
    if not args.key:
        raise UsageError("no signer key given: use --key FILE or set HASHFED_KEY")


def _with_client(args: argparse.Namespace, work: Callable[[HubClient], Awaitable[T]]) -> T:
    signer = load_signer_file(Path(args.key))

    async def run() -> T:
        async with HubClient(args.hub, signer, tls=client_tls(args)) as client:
            return await work(client)

    return asyncio.run(run())


def _read_inputs(collector: HashCollector, files: Sequence[str]) -> None:
    for name in files:
        if name == "-":
            collector.add_lines(sys.stdin, "<stdin>")
        else:
            collector.add_file(Path(name))


def _hashes_from_arguments(args: argparse.Namespace, files: Sequence[str]) -> list[Addition]:
    collector = HashCollector(args.type)
    for position, text in enumerate(args.hashes, start=1):
        collector.add(f"hash argument {position} ({text[:16]})", text)
    _read_inputs(collector, files)
    found = collector.result()
    if not found:
        raise UsageError("no hashes given: name them as arguments or give --file")
    return found


async def _check_collection(client: HubClient, collection: str) -> None:
    info = await client.info()
    known = [str(c) for c in info.get("collections", [])]
    if collection not in known:
        raise HubError(
            404, f"hub {info.get('name')} has no collection {collection!r} (it has: {', '.join(known)})"
        )


def cmd_submit(args: argparse.Namespace) -> int:
    if args.remove and args.label:
        raise UsageError("--label does not go with --remove: removing a hash removes your labels with it")
    if args.hash_media:
        from .media_cli import additions_from_media

        items, failed = additions_from_media(args.files, args.label)
        for problem in failed:
            print(f"hashfed: skipped {problem}", file=sys.stderr)
    else:
        collector = HashCollector(args.type, args.label)
        _read_inputs(collector, args.files)
        items = collector.result()
    if not items:
        raise UsageError("the input holds no hashes")
    batches = [items[start : start + args.batch_size] for start in range(0, len(items), args.batch_size)]

    async def work(client: HubClient) -> list[int]:
        await _check_collection(client, args.collection)
        progress = Progress(len(items), sys.stderr)
        indexes: list[int] = []
        sent = 0
        for number, batch in enumerate(batches, start=1):
            try:
                submitted = await (
                    client.submit(args.collection, removals=[Removal(a.signal, a.hash) for a in batch])
                    if args.remove
                    else client.submit(args.collection, additions=batch)
                )
            except HubError as exc:
                progress.finish()
                done = f"; batches 1-{number - 1} ({sent:,} hashes) were accepted at {index_range(indexes)}"
                raise HubError(
                    exc.status,
                    f"batch {number} of {len(batches)} refused: {exc.detail}" + (done if sent else ""),
                ) from exc
            indexes.append(submitted.index)
            sent += len(batch)
            progress.update(sent, number, len(batches))
        progress.finish()
        return indexes

    indexes = _with_client(args, work)
    verb = "removed" if args.remove else "submitted"
    where = "from" if args.remove else "to"
    print(
        f"{verb} {plural(len(items), 'hash')} {where} collection {args.collection} "
        f"in {plural(len(batches), 'batch')} ({index_range(indexes)})"
    )
    return 0


def _distances(texts: Sequence[str]) -> dict[str, int]:
    """``--distance TYPE=D`` options: a query's own ``max_distance`` for every query of that type."""
    distances: dict[str, int] = {}
    for text in texts:
        name, _, value = text.partition("=")
        try:
            signal = signal_type(name.strip().lower())
        except SignalError as exc:
            raise UsageError(f"--distance {text}: {exc}") from None
        limit = signal.max_distance_limit
        if limit is None:
            raise UsageError(f"--distance {text}: {signal.name} matches identical hashes only")
        if not value.strip().isdigit() or int(value) > limit:
            raise UsageError(f"--distance {text}: give TYPE=D with D a whole number from 0 to {limit:,}")
        distances[signal.name] = int(value)
    return distances


def cmd_lookup(args: argparse.Namespace) -> int:
    items = _hashes_from_arguments(args, args.file)
    distances = _distances(args.distance)
    queries = [query_json(item, distances.get(item.signal)) for item in items]

    async def work(client: HubClient) -> list[list[dict[str, Any]]]:
        results: list[list[dict[str, Any]]] = []
        for start in range(0, len(queries), MAX_QUERIES):
            results += await client.lookup(
                queries[start : start + MAX_QUERIES],
                max_distance=args.max_distance,
                collections=args.collection or None,
            )
        return results

    if args.mirror:
        from .sync.cli import mirror_lookup

        results = mirror_lookup(args.mirror, queries, args.max_distance, args.collection)
    else:
        results = _with_client(args, work)
    shown = [(item.signal, item.hash) for item in items]
    if args.json:
        answer = [
            {"query": {"type": t, "hash": h}, "matches": matches}
            for (t, h), matches in zip(shown, results, strict=True)
        ]
        print(json.dumps(answer, indent=2))
        return 0
    print(lookup_table(shown, results, args.wide))
    matched = sum(1 for matches in results if matches)
    print(f"{plural(len(queries), 'query')}, {matched:,} matched")
    return 0


def cmd_opinion(args: argparse.Namespace) -> int:
    if args.note is not None and (
        not args.note or len(args.note) > 1000 or any(ord(ch) < 0x20 for ch in args.note)
    ):
        raise UsageError("--note must be 1-1000 characters on one line")
    targets = _hashes_from_arguments(args, args.file)
    opinions = [OpinionItem(item.signal, item.hash, args.verdict, args.note) for item in targets]

    async def work(client: HubClient) -> list[int]:
        await _check_collection(client, args.collection)
        return [
            (await client.give_opinions(args.collection, opinions[start : start + MAX_BATCH])).index
            for start in range(0, len(opinions), MAX_BATCH)
        ]

    indexes = _with_client(args, work)
    print(
        f"recorded {args.verdict} opinion on {plural(len(opinions), 'hash')} "
        f"in collection {args.collection} ({index_range(indexes)})"
    )
    return 0


# ---- the parser -----------------------------------------------------------


def _dir_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = _command(sub, name)
    parser.add_argument("dir", metavar="DIR", help="hub data directory")
    parser.set_defaults(func=func)
    return parser


def _add_admin_commands(sub: Any) -> None:
    p = _command(sub, "keygen")
    p.add_argument("name", help="your organisation's name (letters, digits, '.', '_', '-')")
    p.add_argument("--out", help="signer key file (default: NAME.key); the .pub file goes beside it")
    p.set_defaults(func=cmd_keygen)

    p = _dir_command(sub, "init", cmd_init)
    p.add_argument("--name", required=True, help="the hub's name (also its key's name)")
    p.add_argument("--federation", required=True, help="the federation this hub serves")
    p.add_argument("--collection", required=True, help="the first collection")
    p.add_argument(
        "--db",
        default="",
        metavar="URL",
        help="where the log is kept: by default hub.sqlite3 in DIR; postgresql://USER@HOST:PORT/DATABASE "
        "(an empty database; the password from PGPASSWORD or ~/.pgpass) for replicas on several "
        "machines: see docs/scaling.md",
    )

    member = sub.add_parser(
        "member", help="grant, revoke and list member keys", description="Manage member keys."
    )
    msub = member.add_subparsers(dest="member_command", required=True, metavar="ACTION")
    p = _dir_command(msub, "member grant", cmd_member_grant)
    p.add_argument("--collection", required=True)
    p.add_argument("--key", required=True, help="verifier key, or a .pub file holding one")
    p.add_argument("--rights", required=True, help="read, write or read,write")
    p = _dir_command(msub, "member revoke", cmd_member_revoke)
    p.add_argument("--collection", required=True)
    p.add_argument("--key", required=True, help="key id (NAME+8 hex digits), verifier key or .pub file")
    p = _dir_command(msub, "member list", cmd_member_list)
    p.add_argument("--collection", help="only this collection")

    collection = sub.add_parser("collection", help="add collections", description="Manage collections.")
    csub = collection.add_subparsers(dest="collection_command", required=True, metavar="ACTION")
    p = _dir_command(csub, "collection add", cmd_collection_add)
    p.add_argument("collection", help="new collection name")

    p = _dir_command(sub, "serve", cmd_serve)
    p.add_argument("--host", help="address to listen on (default: hub.toml)")
    p.add_argument("--port", type=_int_in(0, 65535), help="port (default: hub.toml)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines for people, or one JSON object per line for a log stack (default text)",
    )
    p.add_argument(
        "--workers",
        type=_int_in(1, 256),
        default=1,
        metavar="N",
        help=f"processes serving the hub on the one port, over the one database (default 1; this machine "
        f"has {os.cpu_count() or 1} cores): see docs/scaling.md",
    )

    _dir_command(sub, "rebuild", cmd_rebuild)
    p = _dir_command(sub, "migrate-store", cmd_migrate_store)
    p.add_argument(
        "--to",
        required=True,
        metavar="URL",
        help="an empty PostgreSQL database, postgresql://USER@HOST:PORT/DATABASE: the log is copied "
        "there, the projection rebuilt from it and compared, then hub.toml names it (stop the hub first)",
    )
    p = _dir_command(sub, "console-token", cmd_console_token)
    p.add_argument(
        "--hours", type=float, default=8.0, metavar="H", help="how long the token lets one log in (default 8)"
    )
    p = _dir_command(sub, "rotate-key", cmd_rotate_key)
    p.add_argument(
        "--overlap-days",
        type=_int_in(0, 90),
        default=14,
        metavar="D",
        help="days the old key keeps co-signing checkpoints, for mirrors and peers to follow (default 14)",
    )


def _add_member_commands(sub: Any) -> None:
    p = _command(sub, "submit")
    member_options(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="hash file, or - for stdin")
    p.add_argument("--label", action="append", default=[], help="label for every hash (repeatable)")
    p.add_argument(
        "--batch-size",
        type=_int_in(1, MAX_BATCH),
        default=10_000,
        metavar="N",
        help="hashes per signed batch (default 10000, at most 100000)",
    )
    p.add_argument("--remove", action="store_true", help="remove these hashes (ones you submitted)")
    p.add_argument(
        "--hash-media",
        action="store_true",
        help="the FILEs are images or other media (or directories of them): submit their PDQ, MD5, "
        "SHA-1 and SHA-256 (needs the media extra)",
    )
    p.set_defaults(func=cmd_submit)
    from .media_cli import add_hash_command

    add_hash_command(sub, _command)

    for name, func in (("lookup", cmd_lookup), ("opinion", cmd_opinion)):
        p = _command(sub, name)
        member_options(p, collection=name == "opinion")
        p.add_argument("hashes", nargs="*", metavar="HASH", help="HASH or TYPE:HASH")
        p.add_argument(
            "--file", action="append", default=[], help="file of hashes, or - for stdin (repeatable)"
        )
        p.set_defaults(func=func)
        if name == "lookup":
            p.add_argument(
                "--max-distance",
                metavar="D",
                type=_int_in(0, REQUEST_MAX_DISTANCE_LIMIT),
                help="pdq and vpdq frame distance 0-63 (default: the hub's, 31)",
            )
            p.add_argument(
                "--distance",
                action="append",
                default=[],
                metavar="TYPE=D",
                help="a distance for every query of one type, e.g. photodna=40000 (default: the hub's)",
            )
            p.add_argument(
                "--collection", action="append", default=[], help="only this collection (repeatable)"
            )
            p.add_argument("--json", action="store_true", help="print the results as JSON")
            p.add_argument("--mirror", metavar="DIR", help="answer offline from a `hashfed mirror` directory")
            p.add_argument("--wide", action="store_true", help="show hashes in full in the table")
        else:
            p.add_argument("--verdict", required=True, choices=VERDICTS)
            p.add_argument("--note", help="a short explanation, kept in the log")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = Parser(
        prog="hashfed",
        description="Share hashes of known abusive media between members of a federation, "
        "with signed submissions and a verifiable log.",
        epilog="Run `hashfed COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"hashfed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_admin_commands(sub)
    _add_member_commands(sub)
    from .feeds.cli import add_feed_commands
    from .sync.cli import add_mirror_command, add_resume_command

    add_mirror_command(sub)
    add_resume_command(sub)
    add_feed_commands(sub)
    demo_parser = _command(sub, "demo")
    if argv and argv[0] == "demo":  # imported only when used: no other command needs it
        from . import demo

        demo.add_arguments(demo_parser)
        demo_parser.set_defaults(func=demo.run)
    return parser


def _fail(message: str, status: int) -> int:
    print(f"hashfed: error: {message}", file=sys.stderr)
    return status


def _hub_message(exc: HubError) -> str:
    if exc.status == 0:
        return f"{exc.detail} (check --hub and that the hub is running)"
    hint = ""
    if exc.status in (401, 403):
        hint = " (ask the hub operator to grant your key the right: `hashfed member grant`)"
    return f"the hub refused the request ({exc.status}): {exc.detail}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    try:
        if args.command in ("submit", "lookup", "opinion") and not getattr(args, "mirror", None):
            _check_member_args(args)
        return int(args.func(args))
    except (UsageError, HashFileError, KeyFormatError, ConfigError, SignalError) as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        return _fail(f"{where}{exc.strerror or exc}", 2)
    except HubError as exc:
        return _fail(_hub_message(exc), 1)
    except Refusal as exc:
        return _fail(f"refused: {exc.detail}", 1)
    except StorageUnavailable as exc:
        return _fail(str(exc), 1)
    except StoreError as exc:
        return _fail(f"the hub's database failed a check: {exc}", 1)
    except HistoryMismatch as exc:
        return _fail(f"refusing to serve: {exc}", 1)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
