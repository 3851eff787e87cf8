"""Importing the feeds members receive, and exporting collections in their shapes.

The fixtures are written here from the providers' documented shapes (NCMEC hash sharing v2,
StopNCII FetchHashes, Tech Against Terrorism hash lists, python-threatexchange's dataset CSV).
"""

from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

from federation.admin import add_collection
from federation.envelope import Addition, Grant
from federation.feeds.formats import read_feed
from tests.sync_helpers import READ_WRITE, LiveHub, Proxy, key_file, make_hub, pdq, run_cli

MD5 = [f"{random.Random(n).getrandbits(128):032x}" for n in range(6)]
SHA1 = [f"{random.Random(100 + n).getrandbits(160):040x}" for n in range(4)]
PHOTODNA = bytes(random.Random(7).randrange(256) for _ in range(144)).hex()


def ncmec_page(entries: str) -> str:
    return f"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<queryResult xmlns="https://hashsharing.ncmec.org/hashsharing/v2">
  <images count="3" maxTimestamp="2026-10-24T15:10:00Z">{entries}</images>
  <paging><next></next></paging>
</queryResult>
"""


NCMEC_FIRST = ncmec_page(f"""
    <image>
      <member id="42">Example Member</member>
      <timestamp>2026-10-24T15:00:00Z</timestamp>
      <id>image1</id>
      <classification>A1</classification>
      <fingerprints><md5>{MD5[0]}</md5><sha1>{SHA1[0]}</sha1><pdna>{PHOTODNA}</pdna></fingerprints>
    </image>
    <image>
      <member id="43">Other Member</member>
      <timestamp>2026-10-24T15:01:00Z</timestamp>
      <id>image2</id>
      <classification>B1</classification>
      <fingerprints><md5>{MD5[1]}</md5><pdq>{pdq(1)}</pdq><tmk>ignored</tmk></fingerprints>
    </image>""")
NCMEC_SECOND = ncmec_page(f"""
    <deletedImage>
      <member id="42">Example Member</member>
      <id>image1</id>
      <timestamp>2026-10-25T15:10:00Z</timestamp>
    </deletedImage>
    <image>
      <member id="42">Example Member</member>
      <timestamp>2026-10-25T15:11:00Z</timestamp>
      <id>image3</id>
      <fingerprints><sha1>{SHA1[1]}</sha1></fingerprints>
    </image>""")


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_each_format_reads_additions_removals_and_what_it_skips(tmp_path: Path) -> None:
    ncmec = read_feed(
        "ncmec-xml", [write(tmp_path, "a.xml", NCMEC_FIRST), write(tmp_path, "b.xml", NCMEC_SECOND)]
    )
    added = {(r.signal, r.hash) for r in ncmec.records if not r.remove}
    assert added == {
        ("md5", MD5[0]),
        ("sha1", SHA1[0]),
        ("photodna", PHOTODNA),
        ("md5", MD5[1]),
        ("pdq", pdq(1)),
        ("sha1", SHA1[1]),
    }
    (deletion,) = [r for r in ncmec.records if r.remove]
    assert deletion.entry_id == "image1" and deletion.signal is None
    first = next(r for r in ncmec.records if r.hash == MD5[0])
    assert set(first.labels) == {"ncmec:image", "ncmec:classification:A1", "ncmec:member:42"}
    assert ncmec.skipped == {"ncmec tmk": 1}

    stopncii = {
        "count": 3,
        "hashRecords": [
            {"signalType": "ImagePDQ", "hashValue": pdq(2), "hashStatus": "Active", "caseNumbers": {}},
            {"signalType": "VideoMD5", "hashValue": MD5[2], "hashStatus": "Withdrawn", "caseNumbers": {}},
            {"signalType": "VideoTMK", "hashValue": "x", "hashStatus": "Active", "caseNumbers": {}},
        ],
    }
    report = read_feed("stopncii-json", [write(tmp_path, "s.json", json.dumps(stopncii))])
    assert [(r.signal, r.hash, r.remove) for r in report.records] == [
        ("pdq", pdq(2), False),
        ("md5", MD5[2], True),
    ]
    assert report.skipped == {"stopncii VideoTMK": 1}

    tat = {
        "count": 2,
        "next": None,
        "results": [
            {
                "hash_digest": MD5[3],
                "algorithm": "MD5",
                "ideology": "islamist",
                "file_type": "mp4",
                "deleted": False,
                "id": 1,
            },
            {
                "hash_digest": pdq(3),
                "algorithm": "PDQ",
                "ideology": "far-right",
                "file_type": "gif",
                "deleted": True,
                "id": 2,
            },
        ],
    }
    report = read_feed("tat-json", [write(tmp_path, "t.json", json.dumps(tat))])
    assert [(r.signal, r.remove) for r in report.records] == [("md5", False), ("pdq", True)]
    assert report.records[0].labels == ("tat", "tat:ideology:islamist", "tat:file-type:mp4")

    rows = (
        "signal_type,signal_str,collab,category,tags\n"
        + f"pdq,{pdq(4)},c,POSITIVE_CLASS,a b\nvideo_md5,{MD5[4]},c,FALSE_POSITIVE,\n"
    )
    report = read_feed("pytx-csv", [write(tmp_path, "p.csv", rows)])
    assert [(r.signal, r.labels) for r in report.records] == [("pdq", ("a", "b"))]
    assert report.skipped == {"pytx negative opinion": 1}

    report = read_feed(
        "lines", [write(tmp_path, "l.txt", f"pdq {pdq(5)}\nvideo_md5 {MD5[5]}\nraw_text hello\n")]
    )
    assert [r.signal for r in report.records] == ["pdq", "md5"] and report.skipped == {"lines raw_text": 1}


async def test_malformed_records_are_reported_with_their_position_and_nothing_is_sent(tmp_path: Path) -> None:
    bad = {
        "hashRecords": [
            {"signalType": "ImagePDQ", "hashValue": "zz", "hashStatus": "Active"},
            {"hashValue": "x"},
        ]
    }
    path = write(tmp_path, "bad.json", json.dumps(bad))
    report = read_feed("stopncii-json", [path])
    positions = [position for position, _ in report.malformed]
    assert positions == [f"{path}: hashRecords[0]", f"{path}: hashRecords[1]"]
    # No hub listens on port 9: a run that got as far as sending would fail differently.
    code, _, err = await run_cli(
        "import",
        "--hub",
        "http://127.0.0.1:9",
        "--key",
        str(tmp_path / "absent.key"),
        "--collection",
        "main",
        "--format",
        "stopncii-json",
        "--state",
        str(tmp_path / "state.json"),
        str(path),
    )
    assert code == 2
    assert f"{path}: hashRecords[0]: " in err and "2 malformed records; nothing was sent" in err
    assert not (tmp_path / "state.json").exists()


async def _hub(tmp_path: Path) -> LiveHub:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "beta": READ_WRITE})
    add_collection(hub.data, "second", [Grant(hub.members["acme"].verifier, READ_WRITE)])
    await hub.serve()
    return hub


async def _export(hub: LiveHub, tmp_path: Path, collection: str, kind: str) -> str:
    out = tmp_path / f"export-{collection}.{kind}"
    code, _, err = await run_cli(
        "export",
        "--hub",
        hub.url,
        "--key",
        str(key_file(tmp_path, hub.members["acme"])),
        "--pin",
        hub.key,
        "--collection",
        collection,
        "--format",
        kind,
        "--out",
        str(out),
    )
    assert code == 0, err
    return out.read_text()


async def test_an_ncmec_import_followed_by_its_deletions_leaves_exactly_the_rest(tmp_path: Path) -> None:
    hub = await _hub(tmp_path)
    try:
        acme = str(key_file(tmp_path, hub.members["acme"]))
        state = str(tmp_path / "state.json")
        base = (
            "import",
            "--hub",
            hub.url,
            "--key",
            acme,
            "--collection",
            "main",
            "--format",
            "ncmec-xml",
            "--state",
            state,
        )
        code, out, err = await run_cli(*base, str(write(tmp_path, "p1.xml", NCMEC_FIRST)))
        assert code == 0, err
        assert "5 hashes to list" in out
        await hub.submit("beta", [pdq(9)])  # another member's listing: never touched by the import
        code, out, err = await run_cli(*base, str(write(tmp_path, "p2.xml", NCMEC_SECOND)))
        assert code == 0, err
        assert "1 hash to list, 3 hashes to remove" in out
        lines = (await _export(hub, tmp_path, "main", "lines")).split("\n")
        code, printed, err = await run_cli(
            "export",
            "--hub",
            hub.url,
            "--key",
            acme,
            "--pin",
            hub.key,
            "--collection",
            "main",
            "--format",
            "lines",
        )
        assert code == 0 and printed.split("\n") == lines, err  # standard output holds the export alone
        assert sorted(line for line in lines if line) == sorted(
            [f"video_md5 {MD5[1]}", f"pdq {pdq(1)}", f"sha1 {SHA1[1]}", f"pdq {pdq(9)}"]
        )

        size = await hub.size()
        code, out, err = await run_cli(*base, str(tmp_path / "p1.xml"), str(tmp_path / "p2.xml"))
        assert code == 0, err
        assert "0 hashes to list, 0 hashes to remove" in out and await hub.size() == size  # idempotent
    finally:
        await hub.stop()


async def test_a_pytx_csv_export_imports_into_another_collection_with_the_same_labels(tmp_path: Path) -> None:
    hub = await _hub(tmp_path)
    try:
        async with hub.client("acme") as acme:
            await acme.submit("main", [Addition("pdq", pdq(n), ("label-a", f"n{n}")) for n in range(4)])
            await acme.submit("main", [Addition("md5", MD5[0], ("label-b",)), Addition("photodna", PHOTODNA)])
        exported = await _export(hub, tmp_path, "main", "pytx-csv")
        rows = list(csv.DictReader(io.StringIO(exported)))
        assert {row["signal_type"] for row in rows} == {"pdq", "video_md5", "photodna"}
        dry = await run_cli(
            "import",
            "--collection",
            "second",
            "--format",
            "pytx-csv",
            "--dry-run",
            "--state",
            str(tmp_path / "s.json"),
            str(write(tmp_path, "main.csv", exported)),
        )
        assert dry[0] == 0 and "6 hashes to list" in dry[1]
        size = await hub.size()
        code, _, err = await run_cli(
            "import",
            "--hub",
            hub.url,
            "--key",
            str(key_file(tmp_path, hub.members["acme"])),
            "--collection",
            "second",
            "--format",
            "pytx-csv",
            "--state",
            str(tmp_path / "s.json"),
            str(tmp_path / "main.csv"),
        )
        assert code == 0, err
        assert await hub.size() == size  # the dry run sent nothing; the import went to "second"
        again = list(csv.DictReader(io.StringIO(await _export(hub, tmp_path, "second", "pytx-csv"))))
        assert {(r["signal_type"], r["signal_str"], r["tags"]) for r in again} == {
            (r["signal_type"], r["signal_str"], r["tags"]) for r in rows
        }
    finally:
        await hub.stop()


async def test_an_interrupted_import_resumes_and_sends_each_batch_once(tmp_path: Path) -> None:
    hub = await _hub(tmp_path)
    proxy = await Proxy(hub.url).start()
    try:
        lines = "".join(f"pdq {pdq(100 + n)}\n" for n in range(10))
        feed = write(tmp_path, "feed.txt", lines)
        base = (
            "import",
            "--hub",
            proxy.url,
            "--key",
            str(key_file(tmp_path, hub.members["acme"])),
            "--collection",
            "main",
            "--format",
            "lines",
            "--batch-size",
            "2",
            "--state",
            str(tmp_path / "s.json"),
        )
        size = await hub.size()
        proxy.posts_allowed = 2  # two batches get through, then the hub is gone
        code, _, err = await run_cli(*base, str(feed))
        assert code == 1, err
        assert await hub.size() == size + 2
        proxy.mode, proxy.posts_allowed = "pass", None
        code, out, err = await run_cli(*base, str(feed))
        assert code == 0, err
        assert "6 hashes to list" in out and "4 already listed by this import" in out
        assert await hub.size() == size + 5  # five batches of two in all: none sent twice
    finally:
        await proxy.close()
        await hub.stop()
