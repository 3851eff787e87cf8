"""`hashfed demo` end to end: a real hub on loopback, real keys, and the narration it prints."""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import stat
from pathlib import Path

import pytest

from federation.config import DataDir
from federation.demo import add_arguments, run
from federation.demo_data import BRIDGE, FILE_SAMPLES, MEMBERS, md5_hex
from federation.hub import open_node
from federation.keys import SignerKey, VerifierKey, load_signer_file


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hashfed demo")
    add_arguments(parser)
    return parser.parse_args(list(argv))


def section(out: str, start: str, end: str) -> str:
    return out[out.index(start) : out.index(end, out.index(start))]


def table_rows(text: str) -> list[str]:
    """The rows of the one table in ``text`` (the lines after its dashed separator)."""
    lines = text.splitlines()
    first = next(n for n, line in enumerate(lines) if line.strip().startswith("---")) + 1
    rows = []
    for line in lines[first:]:
        if not line.strip():
            break
        rows.append(line)
    return rows


def key_ids(out: str) -> dict[str, str]:
    return dict(re.findall(r"^  ([a-z-]+)\s+(\1\+[0-9a-f]{8})\s", out, re.MULTILINE))


def test_demo_walks_through_a_federation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys, data = tmp_path / "keys", tmp_path / "hub"
    assert run(demo_args("--keys", str(keys), "--data", str(data))) == 0
    out = capsys.readouterr().out

    # Step 1: the hub's real key, and every member's key written with the right modes.
    assert (data / "hub.pub").read_text().strip() in out
    ids = key_ids(out)
    for name, _ in MEMBERS:
        signer = load_signer_file(keys / f"{name}.key")
        assert stat.S_IMODE((keys / f"{name}.key").stat().st_mode) == 0o600
        assert (keys / f"{name}.pub").read_text().strip() == signer.verifier.encode()
        assert ids[name] == signer.key_id
    for step in range(1, 9):
        assert f"== Step {step}. " in out

    # Step 2: the reference hashes, with their log indexes.
    for label, hash_hex in BRIDGE.items():
        assert f"{hash_hex}  {label}" in out
    assert "initech submits 2,000 generated PDQ hashes" in out
    assert re.search(r"-> csam-hashes log index 4 ", out)

    # Step 3: distances of the bit-flipped bridge, only at most 31.
    flips = table_rows(section(out, "with k of its bits flipped", "(32 bits off"))
    for k in (0, 8, 20, 31):
        assert any(
            re.match(rf"  bridge, {k} bits off\s+{k}\s+acme, globex\s+bridge-1-original", r) for r in flips
        )
    assert any(re.match(r"  bridge, 32 bits off\s+-\s+not found", r) for r in flips)
    assert len(flips) == 5

    variants = table_rows(section(out, "The eight orientations", "Exact matches"))
    assert len(variants) == 8  # each finds itself and nothing else
    for row, label in zip(variants, BRIDGE, strict=True):
        assert re.match(rf"  {label}\s+0\s+acme(, globex)?\s+{label}", row)

    exact = table_rows(section(out, "Exact matches", "One of initech's"))
    assert re.match(
        rf"  md5 {md5_hex(FILE_SAMPLES[0])[:12]}\.\.\.\s+0\s+globex\s+recruitment-video", exact[0]
    )
    assert re.match(r"  sha256 \w+\.\.\.\s+-\s+not found", exact[1])

    # Step 4: PhotoDNA in three forms, an edited copy found at its squared distance; a video clip.
    assert re.search(r"  edited copy\s+18,000\s+acme\s+demo-photodna", out)
    assert re.search(r"  unrelated\s+-\s+not found", out)
    assert re.search(r"  clip\s+6\s+80%\s+60%\s+globex", out)

    # Steps 5 and 6: opinion counts, then removals.
    assert re.search(r"bridge-3-rotate-180\s+0\s+acme\s+bridge-3-rotate-180\s+\+1 -1", out)
    assert re.search(r"  bridge-5-flipx\s+0\s+globex\s+globex-report-1041\s", out)
    assert re.search(r"  bridge-8-flip-minus-1\s+-\s+not found", out)

    # Step 7: the checkpoint printed is the hub's own, and its root was recomputed.
    note = re.search(r"    demo-hub/csam-hashes\n    (\d+)\n    (\S+)\n", out)
    assert note is not None
    size, root = int(note.group(1)), note.group(2)
    assert size == 10
    assert f"recomputed Merkle root over {size} entries: {root} - matches the checkpoint" in out
    node = open_node(DataDir(data))
    try:
        assert node.checkpoint("csam-hashes").split("\n")[:3] == ["demo-hub/csam-hashes", str(size), root]
    finally:
        node.store.close()
    assert "signature verified with the pinned key" in out
    assert out.count("every signature verified against the membership") == 2
    assert "inclusion proof for the removal at index 9 (2 hashes): verified" in out
    assert "consistency proof from the step-2 checkpoint (size 5) to size 10" in out

    # Step 8: the summary, with commands that point at this data directory.
    assert "csam-hashes: 10 log entries, 2,010 hashes listed" in out
    assert "terror-hashes: 4 log entries, 5 hashes listed" in out
    assert f"hashfed serve {data}" in out


def test_second_run_reuses_keys_and_removes_its_temporary_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "keys"
    assert run(demo_args("--keys", str(keys))) == 0
    first = capsys.readouterr().out
    assert run(demo_args("--keys", str(keys))) == 0
    second = capsys.readouterr().out

    assert key_ids(first) == key_ids(second)
    assert len(key_ids(second)) == len(MEMBERS)
    assert second.count("(reused)") == len(MEMBERS)
    for out in (first, second):
        created = re.search(r"for federation 'demo' in (\S+)", out)
        assert created is not None
        assert not Path(created.group(1)).exists()
        assert "a temporary directory, now removed" in out


def test_pub_without_key_gets_a_fresh_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    stale = SignerKey.generate("acme").verifier
    (keys / "acme.pub").write_text(stale.encode() + "\n")
    assert run(demo_args("--keys", str(keys), "--quiet")) == 0
    out = capsys.readouterr().out

    fresh = load_signer_file(keys / "acme.key").verifier
    assert fresh != stale
    assert VerifierKey.parse((keys / "acme.pub").read_text()) == fresh
    assert out.startswith("== Summary ")  # --quiet prints only the summary
    assert "Step 1" not in out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_keep_leaves_a_servable_hub_and_refuses_to_overwrite_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys, port = tmp_path / "keys", free_port()
    assert run(demo_args("--keys", str(keys), "--keep", "--port", str(port), "--quiet")) == 0
    out = capsys.readouterr().out
    kept = re.search(r"^Hub data: (\S+) \(kept\)$", out, re.MULTILINE)
    assert kept is not None
    data = DataDir(Path(kept.group(1)))
    try:
        # `hashfed serve DATA` listens where the demo did, and the printed lookup points there.
        assert (data.config().name, data.config().port) == ("demo-hub", port)
        assert f"hashfed serve {data.path}" in out
        assert f"hashfed lookup --hub http://127.0.0.1:{port} --key {keys / 'safety-lab.key'} pdq:" in out

        assert run(demo_args("--keys", str(keys), "--data", str(data.path))) == 1
        assert "already holds a hub" in capsys.readouterr().err
        assert data.config().name == "demo-hub"
    finally:
        shutil.rmtree(data.path)
