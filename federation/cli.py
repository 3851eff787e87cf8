"""``hashfed``: run a hub, manage its members, and submit and look up hashes as a member."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from . import __version__
from .checkpoint_record import HistoryMismatch
from .cli_admin import add_admin_commands
from .cli_output import Progress, UsageError, command, index_range, int_in, lookup_table, plural
from .client import HubClient, HubError
from .config import ConfigError
from .envelope import VERDICTS, Addition, OpinionItem, Removal
from .hashfile import HashCollector, HashFileError
from .keys import KeyFormatError, load_signer_file
from .payloads import query_json
from .signals import SIGNAL_TYPES, SignalError, signal_type
from .signals.pdq import MAX_DISTANCE_LIMIT as REQUEST_MAX_DISTANCE_LIMIT
from .state import Refusal
from .store.base import StorageUnavailable, StoreError
from .tls import add_tls_options, client_tls

MAX_BATCH = 100_000
MAX_QUERIES = 10_000
T = TypeVar("T")


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def _add_member_commands(sub: Any) -> None:
    p = command(sub, "submit")
    member_options(p)
    p.add_argument("files", nargs="+", metavar="FILE", help="hash file, or - for stdin")
    p.add_argument("--label", action="append", default=[], help="label for every hash (repeatable)")
    p.add_argument(
        "--batch-size",
        type=int_in(1, MAX_BATCH),
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

    add_hash_command(sub, command)

    for name, func in (("lookup", cmd_lookup), ("opinion", cmd_opinion)):
        p = command(sub, name)
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
                type=int_in(0, REQUEST_MAX_DISTANCE_LIMIT),
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
    add_admin_commands(sub)
    _add_member_commands(sub)
    from .feeds.cli import add_feed_commands
    from .sync.cli import add_mirror_command, add_resume_command

    add_mirror_command(sub)
    add_resume_command(sub)
    add_feed_commands(sub)
    demo_parser = command(sub, "demo")
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
