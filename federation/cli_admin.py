"""``hashfed``'s commands for the hub's operator: keys, init, members, collections, serving, upkeep.

They act on a hub data directory on this machine (``admin.py`` does the work);
the member commands that talk to a hub over HTTP are in :mod:`.cli`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import admin
from .cli_output import UsageError, command, int_in, members_table
from .config import DataDir
from .durable import write_atomically
from .envelope import RIGHTS, Grant
from .keys import KEY_ID_PATTERN, SignerKey, VerifierKey, write_signer_file
from .store.opening import redact


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


def _dir_command(sub: Any, name: str, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    parser = command(sub, name)
    parser.add_argument("dir", metavar="DIR", help="hub data directory")
    parser.set_defaults(func=func)
    return parser


def add_admin_commands(sub: Any) -> None:
    p = command(sub, "keygen")
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
    p.add_argument("--port", type=int_in(0, 65535), help="port (default: hub.toml)")
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text lines for people, or one JSON object per line for a log stack (default text)",
    )
    p.add_argument(
        "--workers",
        type=int_in(1, 256),
        default=os.cpu_count() or 1,
        metavar="N",
        help=f"processes serving the hub on the one port, over the one database (default: one per core, "
        f"{os.cpu_count() or 1} on this machine); they share the index's segment files: see docs/scaling.md",
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
        type=int_in(0, 90),
        default=14,
        metavar="D",
        help="days the old key keeps co-signing checkpoints, for mirrors and peers to follow (default 14)",
    )
