"""``hashfed import`` and ``hashfed export``: feeds in, feeds out."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..cli import member_options
from ..cli_output import Progress, plural
from ..client import HubClient, HubError
from ..config import ConfigError
from ..envelope import Addition, Removal
from ..keys import load_signer_file
from ..sync.mirror import MirrorDir
from ..tls import add_tls_options, client_tls
from .formats import PYTX_TYPES, READERS, read_feed
from .importer import ImportPlan, ImportState, Key, plan_import

EXPORT_FORMATS = ("pytx-csv", "lines", "ncmec-xml")
PYTX_NAMES = {"md5": "video_md5", **{ours: ours for ours in set(PYTX_TYPES.values()) if ours != "md5"}}
"""The name python-threatexchange knows each type by (its md5 type is video_md5)."""
IMPORT_DESCRIPTION = (
    "Turn a feed export into signed batches for a collection, as your member key. Formats: ncmec-xml "
    "(NCMEC hash sharing v2 entries; deletedImage/deletedVideo withdraw an entry), stopncii-json "
    "(hashRecords; Withdrawn or Deleted hashStatus removes), tat-json (Tech Against Terrorism results; "
    "deleted: true removes), pytx-csv (threatexchange dataset --csv) and lines (signal_type value). "
    "Give a feed's pages oldest first: the last word on a hash wins. Every malformed record is reported "
    "with its position and nothing is sent unless --skip-malformed. The import keeps a state file of what "
    "it listed, so an interrupted import resumes, running it again sends nothing, and a withdrawal only "
    "ever removes hashes this import listed."
)


def add_feed_commands(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "import",
        help="import a feed (NCMEC, StopNCII, TAT, pytx) into a collection",
        description=textwrap.fill(IMPORT_DESCRIPTION, 78),
        epilog="examples:\n  hashfed import --format ncmec-xml --collection csam page-*.xml\n"
        "  hashfed import --format stopncii-json --collection ncii --dry-run hashes.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    member_options(parser, types=False)
    parser.add_argument("--format", required=True, choices=sorted(READERS), help="the feed's format")
    parser.add_argument("files", nargs="+", metavar="FILE", help="feed exports, oldest first")
    parser.add_argument(
        "--state", metavar="FILE", help="import state (default: hashfed-import-COLLECTION.json here)"
    )
    parser.add_argument("--dry-run", action="store_true", help="count what would be sent; send nothing")
    parser.add_argument("--skip-malformed", action="store_true", help="report malformed records and go on")
    parser.add_argument("--batch-size", type=int, default=10_000, metavar="N", help="hashes per signed batch")
    parser.set_defaults(func=cmd_import)

    parser = sub.add_parser(
        "export",
        help="export a collection as pytx CSV, lines or NCMEC-style XML",
        description="Write the hashes a collection lists, with their labels, in a shape other tools read. "
        "From a mirror directory (--mirror DIR), or from a hub: a verified mirror is made in a temporary "
        "directory first (--hub, --key, --pin), so every exported hash was checked.",
        epilog="examples:\n  hashfed export --mirror acme-mirror --format pytx-csv > csam.csv\n"
        "  hashfed export --hub https://hub.example --key acme.key --pin hub.keys --collection csam --format lines",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument("--mirror", metavar="DIR", help="export from this mirror directory")
    parser.add_argument("--hub", metavar="URL", help="export from this hub (through a verified mirror)")
    parser.add_argument("--key", metavar="FILE", help="your signer key file (with --hub)")
    parser.add_argument(
        "--pin", metavar="KEY", help="the hub's key chain, a .pub or hub.keys file (with --hub)"
    )
    parser.add_argument("--collection", metavar="NAME", help="the collection (with --hub)")
    parser.add_argument("--out", metavar="FILE", help="write here instead of standard output")
    add_tls_options(parser)
    parser.set_defaults(func=cmd_export)


# ---- import -------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    report = read_feed(args.format, [Path(name) for name in args.files])
    for position, problem in report.malformed[:50]:
        print(f"hashfed: {position}: {problem}", file=sys.stderr)
    if len(report.malformed) > 50:
        print(f"hashfed: … and {len(report.malformed) - 50:,} more malformed records", file=sys.stderr)
    if report.malformed and not args.skip_malformed:
        raise ConfigError(
            f"{plural(len(report.malformed), 'malformed record')}; nothing was sent "
            "(fix them, or give --skip-malformed to import the rest)"
        )
    for kind, count in sorted(report.skipped.items()):
        print(
            f"hashfed: skipped {plural(count, 'record')} of type {kind} (not carried by the hub)",
            file=sys.stderr,
        )
    try:
        state = ImportState.load(
            Path(args.state or f"hashfed-import-{args.collection}.json"), args.collection
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    plan = plan_import(report, state)
    summary = (
        f"{plural(len(plan.additions), 'hash')} to list, {plural(len(plan.removals), 'hash')} to remove, "
        f"{plan.unchanged:,} already listed by this import, {plan.not_ours:,} withdrawals of hashes it never "
        f"listed (left alone), {plan.unknown_entries:,} deletions of entries it never saw"
    )
    if args.dry_run:
        print(f"dry run: {summary}")
        return 0
    if not args.hub or not args.key:
        raise ConfigError(
            "importing needs --hub and --key (or $HASHFED_HUB and $HASHFED_KEY); --dry-run does not"
        )
    signer = load_signer_file(Path(args.key))

    async def run() -> list[int]:
        async with HubClient(args.hub, signer, tls=client_tls(args)) as client:
            return await _send(client, args.collection, plan, state, args.batch_size)

    indexes = asyncio.run(run())
    print(f"imported into {args.collection}: {summary}; {plural(len(indexes), 'batch')} appended")
    return 0


async def _send(
    client: HubClient, collection: str, plan: ImportPlan, state: ImportState, size: int
) -> list[int]:
    progress = Progress(len(plan.additions) + len(plan.removals), sys.stderr)
    indexes: list[int] = []
    additions = list(plan.additions.items())
    done = 0
    total_batches = -(-len(additions) // size) + -(-len(plan.removals) // size)
    for start in range(0, len(additions), size):
        batch = additions[start : start + size]
        submitted = await client.submit(collection, [Addition(s, h, labels) for (s, h), labels in batch])
        indexes.append(submitted.index)
        state.listed.update(batch)
        state.save()
        done += len(batch)
        progress.update(done, len(indexes), total_batches)
    state.entries.update(plan.entries)
    state.save()
    for start in range(0, len(plan.removals), size):
        keys = plan.removals[start : start + size]
        try:
            submitted = await client.submit(collection, removals=[Removal(s, h) for s, h in keys])
        except HubError as exc:
            if not exc.kind.endswith(":not-listed"):
                raise
            # Removed by an earlier run that stopped before saving its state: send only what is still listed.
            keys = await _still_listed(client, keys)
            if not keys:
                continue
            submitted = await client.submit(collection, removals=[Removal(s, h) for s, h in keys])
        indexes.append(submitted.index)
        for key in keys:
            state.listed.pop(key, None)
        state.entries = {i: keys for i, keys in state.entries.items() if any(k in state.listed for k in keys)}
        state.save()
        done += len(keys)
        progress.update(done, len(indexes), total_batches)
    progress.finish()
    return indexes


async def _still_listed(client: HubClient, keys: Sequence[Key]) -> list[Key]:
    assert client.signer is not None
    answers = await client.lookup([{"type": s, "hash": h} for s, h in keys], max_distance=0)
    return [
        key
        for key, matches in zip(keys, answers, strict=True)
        if any(m["hash"] == key[1] and client.signer.name in m["submitters"] for m in matches)
    ]


# ---- export -------------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace) -> int:
    if args.mirror:
        return _export_mirror(Path(args.mirror), args)
    missing = [f"--{n}" for n in ("hub", "key", "pin", "collection") if not getattr(args, n)]
    if missing:
        raise ConfigError(f"export from --mirror DIR, or from a hub with {', '.join(missing)} as well")
    from ..sync.cli import cmd_mirror

    with tempfile.TemporaryDirectory(prefix="hashfed-export-") as scratch:
        mirrored = argparse.Namespace(
            dir=str(Path(scratch) / "mirror"),
            hub=args.hub,
            key=args.key,
            collection=args.collection,
            pin=args.pin,
            watch=False,
            interval=30.0,
            compare=None,
            read_timeout=30.0,
            ca=args.ca,
            client_cert=args.client_cert,
        )
        with contextlib.redirect_stdout(sys.stderr):  # standard output is the export's alone
            status = cmd_mirror(mirrored)
        if status != 0:
            return status
        return _export_mirror(Path(mirrored.dir), args)


def _export_mirror(directory: Path, args: argparse.Namespace) -> int:
    mirror = MirrorDir(directory)
    name = mirror.config().spec().name
    node = mirror.open_node()
    try:
        listed, _ = node.store.listed(name)
        rows: list[tuple[str, str, tuple[str, ...]]] = []
        by_type: dict[str, list[str]] = {}
        for signal, hash_hex in listed:
            by_type.setdefault(signal, []).append(hash_hex)
        for signal, hashes in sorted(by_type.items()):
            details = node.store.details(name, signal, hashes)
            rows.extend((signal, h, details[h].labels) for h in sorted(hashes) if h in details)
    finally:
        node.store.close()
    collection = mirror.config().collection
    out: TextIO = open(args.out, "w", encoding="utf-8", newline="") if args.out else sys.stdout  # noqa: SIM115
    try:
        WRITERS[args.format](out, collection, rows)
    finally:
        if args.out:
            out.close()
    print(f"exported {plural(len(rows), 'hash')} of {collection}", file=sys.stderr)
    return 0


def _write_pytx_csv(out: TextIO, collection: str, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
    writer = csv.DictWriter(out, ["signal_type", "signal_str", "collab", "category", "tags"])
    writer.writeheader()
    for signal, hash_hex, labels in rows:
        if signal not in PYTX_NAMES:
            continue  # a video's vPDQ needs its frames, which a CSV row cannot carry
        writer.writerow(
            {
                "signal_type": PYTX_NAMES[signal],
                "signal_str": hash_hex,
                "collab": collection,
                "category": "POSITIVE_CLASS",
                "tags": " ".join(label.replace(" ", "_") for label in labels),
            }
        )


def _write_lines(out: TextIO, collection: str, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
    for signal, hash_hex, _ in rows:
        if signal in PYTX_NAMES:
            out.write(f"{PYTX_NAMES[signal]} {hash_hex}\n")


def _write_ncmec_xml(out: TextIO, collection: str, rows: list[tuple[str, str, tuple[str, ...]]]) -> None:
    names = {"md5": "md5", "sha1": "sha1", "photodna": "pdna", "pdq": "pdq"}
    root = ET.Element("queryResult", xmlns="https://hashsharing.ncmec.org/hashsharing/v2")
    images = ET.SubElement(root, "images")
    count = 0
    for signal, hash_hex, labels in rows:
        if signal not in names:
            continue
        count += 1
        image = ET.SubElement(images, "image")
        ET.SubElement(image, "id").text = f"{collection}:{signal}:{hash_hex}"
        classification = next(
            (label.rpartition(":")[2] for label in labels if label.startswith("ncmec:classification:")), None
        )
        if classification:
            ET.SubElement(image, "classification").text = classification
        fingerprints = ET.SubElement(image, "fingerprints")
        ET.SubElement(fingerprints, names[signal]).text = hash_hex
    images.set("count", str(count))
    ET.indent(root)
    out.write('<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n')
    out.write(ET.tostring(root, encoding="unicode") + "\n")


WRITERS = {"pytx-csv": _write_pytx_csv, "lines": _write_lines, "ncmec-xml": _write_ncmec_xml}
