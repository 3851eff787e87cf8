"""Hashing media: PDQ against the reference implementation's hashes, EXIF orientation, the CLI."""

from __future__ import annotations

import csv
import io
import json
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
