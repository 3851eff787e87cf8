"""Hashing media: PDQ against the reference implementation's hashes, EXIF orientation, the CLI."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from federation.client import HubClient
from federation.keys import write_signer_file
from federation.media import hash_file
from federation.signals import PDQ
from tests.conftest import Federation
from tests.sync_helpers import run_cli

Image = pytest.importorskip("PIL.Image", reason="needs Pillow (the media extra, in the test extra)")
pytest.importorskip("pdqhash", reason="needs pdqhash (the media extra, in the test extra)")
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "pdq"


def picture(seed: int) -> object:
    """A synthetic photo-like image: smooth shapes and a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:240, 0:320]
    channels = [np.sin(x / (17 + 5 * c) + seed) * np.cos(y / (23 + 3 * c)) * 100 + 128 for c in range(3)]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 4, (240, 320, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def test_pdq_is_within_10_of_the_reference_hashes_at_quality_80_or_more() -> None:
    if not (REFERENCE / "reference-hashes.csv").exists():
        pytest.skip("the PDQ reference photos (../shared/data/pdq) are not here")
    rows = list(csv.reader((REFERENCE / "reference-hashes.csv").open()))
    assert len(rows) == 8
    for reference, name in rows:
        hashed = hash_file(REFERENCE / name)
        assert hashed.pdq is not None and hashed.quality is not None
        assert hashed.quality >= 80, name
        assert PDQ.distance(hashed.pdq, reference) <= 10, name


def test_exif_orientation_is_applied_before_hashing(tmp_path: Path) -> None:
    upright = picture(1)
    upright.save(tmp_path / "upright.jpg", quality=95)  # type: ignore[attr-defined]
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # type: ignore[attr-defined]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": undoes the stored rotation
    stored.save(tmp_path / "tagged.jpg", quality=95, exif=exif)
    stored.save(tmp_path / "untagged.jpg", quality=95)
    base = hash_file(tmp_path / "upright.jpg").pdq
    assert base is not None
    assert PDQ.distance(base, hash_file(tmp_path / "tagged.jpg").pdq or "") <= 10
    assert PDQ.distance(base, hash_file(tmp_path / "untagged.jpg").pdq or "") > 60


async def test_hash_reports_unreadable_files_and_submit_takes_media(
    federation: Federation, hub_server: TestServer, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    (media / "nested").mkdir(parents=True)
    picture(2).save(media / "one.png")  # type: ignore[attr-defined]
    picture(3).save(media / "nested" / "two.jpg", quality=90)  # type: ignore[attr-defined]
    (media / "broken.jpg").write_bytes(b"not a jpeg")
    (media / "notes.txt").write_text("hello")

    code, out, err = await run_cli("hash", "--format", "json", str(media))
    assert code == 0, err
    rows = {Path(row["path"]).name: row for row in json.loads(out)}
    assert set(rows) == {"one.png", "two.jpg", "notes.txt"}
    assert rows["one.png"]["quality"] >= 50 and len(rows["one.png"]["pdq"]) == 64
    assert rows["notes.txt"]["pdq"] is None and rows["notes.txt"]["md5"] == "5d41402abc4b2a76b9719d911017c592"
    assert "skipped" in err and "broken.jpg: not an image" in err
    code, out, _ = await run_cli("hash", str(media / "one.png"))
    assert next(csv.DictReader(io.StringIO(out)))["pdq"] == rows["one.png"]["pdq"]

    key = tmp_path / "acme.key"
    write_signer_file(federation.members["acme"], key)
    url = str(hub_server.make_url(""))
    code, out, err = await run_cli(
        "submit",
        "--hub",
        url,
        "--key",
        str(key),
        "--collection",
        "main",
        "--hash-media",
        "--label",
        "seen",
        str(media),
    )
    assert code == 0, err
    async with HubClient(url, federation.members["reader"], retries=0) as reader:
        (matches,) = await reader.lookup([("pdq", rows["two.jpg"]["pdq"])])
        (exact,) = await reader.lookup([("sha256", rows["notes.txt"]["sha256"])])
    assert matches[0]["distance"] == 0 and matches[0]["labels"] == ["seen"]
    assert exact[0]["submitters"] == ["acme"]


VPDQ_STAND_IN = '''
"""Stands in for python-threatexchange's vpdq package (it builds against FFmpeg, which this machine lacks):
the same computeHash call and feature fields, frames derived from the file's bytes."""
import hashlib
from dataclasses import dataclass


@dataclass
class VpdqFeature:
    hex: str
    quality: int
    frame_number: int
    timestamp: float


def computeHash(input_video_filename, seconds_per_hash=1.0):
    data = open(input_video_filename, "rb").read()
    if not data.startswith(b"VIDEO"):
        raise ValueError("cannot decode")
    return [
        VpdqFeature(hashlib.sha256(data + bytes([n])).hexdigest(), 100 if n else 10, n, n * seconds_per_hash)
        for n in range(3)
    ]
'''


@pytest.fixture
def forget_vpdq() -> Iterator[None]:
    """The stand-in ``vpdq`` module imported by a test is forgotten after it."""
    yield
    sys.modules.pop("vpdq", None)


async def test_videos_get_vpdq_frames_where_the_vpdq_package_is_installed(
    federation: Federation,
    hub_server: TestServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    forget_vpdq: None,
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    (media / "clip.mp4").write_bytes(b"VIDEO clip")
    (media / "broken.mov").write_bytes(b"junk")
    code, out, err = await run_cli("hash", "--format", "json", str(media))
    assert code == 0, err
    assert "videos get no vPDQ" in err and "pip install vpdq" in err
    assert {row["vpdq"] for row in json.loads(out)} == {None}

    stand_in = tmp_path / "stand-in"
    stand_in.mkdir()
    (stand_in / "vpdq.py").write_text(VPDQ_STAND_IN)
    monkeypatch.syspath_prepend(str(stand_in))
    code, out, err = await run_cli("hash", "--format", "json", str(media))
    assert code == 0, err
    (row,) = json.loads(out)
    assert "broken.mov: not a video vpdq can read" in err
    codes = [hashlib.sha256(b"VIDEO clip" + bytes([n])).hexdigest() for n in range(3)]
    assert row["frames"] == [f"{codes[0]},10,0.000", f"{codes[1]},100,1.000", f"{codes[2]},100,2.000"]
    assert row["vpdq"] == hashlib.sha256("".join(f"{c}\n" for c in sorted(codes[1:])).encode()).hexdigest()

    key = tmp_path / "acme.key"
    write_signer_file(federation.members["acme"], key)
    url = str(hub_server.make_url(""))
    code, _, err = await run_cli(
        "submit", "--hub", url, "--key", str(key), "--collection", "main", "--hash-media", str(media)
    )  # fmt: skip
    assert code == 0, err
    async with HubClient(url, federation.members["reader"], retries=0) as reader:
        (matches,) = await reader.lookup(
            [{"type": "vpdq", "frames": [{"pdq": c, "quality": 100} for c in codes[1:]]}]
        )
    assert [match["hash"] for match in matches] == [row["vpdq"]]
