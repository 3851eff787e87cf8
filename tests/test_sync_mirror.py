"""Member mirrors: `hashfed mirror` pulls, verifies and applies a hub's log; `lookup --mirror` answers offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.client import HubClient
from federation.keys import SignerKey
from federation.sync.mirror import MirrorConfig, MirrorDir
from federation.sync.puller import Puller, SourceSpec, SyncProgress
from federation.sync.verify import SignedCheckpoint
from tests.sync_helpers import (
    COLLECTION,
    READ,
    READ_WRITE,
    LiveHub,
    Proxy,
    key_file,
    make_hub,
    mirror_size,
    normalise,
    pdq,
    run_cli,
)

HASHES = [pdq(seed) for seed in range(12)]


class Interrupted(Exception):
    """Stands for a crash or Ctrl-C between two spans."""


@pytest.fixture
async def hub(tmp_path: Path, database: str) -> LiveHub:
    made = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "beta": READ_WRITE, "reader": READ}, database)
    await made.serve()
    yield made  # type: ignore[misc]
    await made.stop()


async def _history(hub: LiveHub) -> None:
    """Additions by two members, a hash both list, labels, removals and opinions."""
    await hub.submit("acme", HASHES[:6], labels=["a"])
    await hub.submit("beta", HASHES[4:9], labels=["b"])
    await hub.opinion("reader", HASHES[:2], "negative")
    await hub.opinion("beta", HASHES[:1], "positive")
    await hub.submit("acme", remove=HASHES[4:6])
    await hub.submit("beta", remove=[HASHES[8]])
    await hub.opinion("reader", HASHES[1:2], "withdrawn")


async def _mirror_answers(directory: Path, queries: list[str]) -> list[list[dict[str, object]]]:
    code, out, err = await run_cli(
        "lookup", "--mirror", str(directory), "--type", "pdq", "--json", "--max-distance", "31", *queries
    )
    assert code == 0, err
    return [item["matches"] for item in json.loads(out)]


async def test_mirror_verifies_applies_resumes_and_answers_offline(hub: LiveHub, tmp_path: Path) -> None:
    await _history(hub)
    directory = tmp_path / "mirror"
    reader_key = key_file(tmp_path, hub.members["reader"])
    code, out, err = await run_cli(
        "mirror",
        "--hub",
        hub.url,
        "--key",
        str(reader_key),
        "--collection",
        COLLECTION,
        "--pin",
        hub.key,
        str(directory),
    )
    assert code == 0, err
    assert "hub-a:main: 9 new entries verified and applied" in out
    assert "entries verified" in err  # progress
    # Removals and opinions arrive exactly: hash for hash, the mirror answers what the hub answers.
    queries = [*HASHES, HASHES[3][:-1] + "0"]
    expected = await hub.lookup("reader", queries)
    answered = await _mirror_answers(directory, queries)
    assert all(m["hub"] == "hub-a" and m["collection"] == COLLECTION for ms in answered for m in ms)
    assert normalise("hub-a", answered) == normalise("hub-a", expected)
    assert any(m["opinions"]["negative"] == 1 for m in answered[0])
    assert answered[8] == [] and [m["submitters"] for m in answered[5]] == [["beta"]]

    # The latest verified checkpoint is kept, as the hub signed it, to compare with others.
    async with HubClient(hub.url) as public:
        assert (directory / "checkpoint.txt").read_text() == await public.checkpoint(COLLECTION)

    # A later run resumes from the cursor; options come from mirror.toml.
    await hub.submit("acme", HASHES[9:12], labels=["late"])
    await hub.submit("acme", remove=HASHES[:1])
    code, out, err = await run_cli("mirror", str(directory))
    assert code == 0, err
    assert "2 new entries verified and applied; the mirror holds 11 entries" in out
    expected = await hub.lookup("reader", queries)
    assert normalise("hub-a", await _mirror_answers(directory, queries)) == normalise("hub-a", expected)

    code, _, err = await run_cli("mirror", str(directory), "--collection", "other")
    assert code == 2 and "use a new directory" in err
    code, _, err = await run_cli("lookup", "--mirror", str(tmp_path / "nowhere"), "--type", "pdq", HASHES[0])
    assert code == 2 and "not a mirror directory" in err


async def test_a_new_mirror_needs_every_option(tmp_path: Path) -> None:
    code, _, err = await run_cli("mirror", "--hub", "http://127.0.0.1:9", str(tmp_path / "m"))
    assert code == 2 and "--key, --collection, --pin" in err


async def test_an_interrupted_sync_keeps_only_proven_spans_and_resumes(hub: LiveHub, tmp_path: Path) -> None:
    for position in range(0, 12, 2):
        await hub.submit("acme", HASHES[position : position + 2])
    directory = tmp_path / "mirror"
    reader_key = str(key_file(tmp_path, hub.members["reader"]))
    MirrorDir(directory).write_config(MirrorConfig(hub.url, reader_key, COLLECTION, hub.key))
    spec = SourceSpec.make(hub.url, hub.signer.verifier, COLLECTION)
    node = MirrorDir(directory).open_node()
    seen: list[int] = []

    def stop_after_two_spans(progress: SyncProgress) -> None:
        seen.append(progress.size)
        if len(seen) == 2:
            raise Interrupted

    async def run(fn):  # type: ignore[no-untyped-def]
        return fn()

    try:
        async with HubClient(hub.url, hub.members["reader"], retries=0) as client:
            first = Puller(
                node, spec, client, run, first_span=3, span_bytes=1, on_progress=stop_after_two_spans
            )
            with pytest.raises(Interrupted):
                await first.sync()
            # Spans of 3 then 1 entries were proven against the checkpoint (size 8) and kept.
            assert seen == [3, 4] and node.store.log_size("hub-a:main") == 4
            record = node.store.source("hub-a:main")
            assert record is not None and record.checkpoint is None
            assert record.target is not None and SignedCheckpoint.open(record.target, spec.origin).size == 8
            result = await Puller(node, spec, client, run, first_span=1, span_bytes=1).sync()
        assert (result.before, result.after, result.checkpoint) == (4, 8, 8)
        assert result.bytes > 4 * 100  # four entries' envelopes were read (and counted)
        async with HubClient(hub.url) as public:
            assert node.store.source("hub-a:main").checkpoint == await public.checkpoint(COLLECTION)  # type: ignore[union-attr]
        # The mirrored log replays through the same checks as the hub's own (hashfed rebuild).
        assert node.rebuild("hub-a:main") == 8
    finally:
        node.store.close()


async def test_mirror_through_a_flaky_hub_exits_1_and_keeps_nothing_unproven(
    hub: LiveHub, tmp_path: Path
) -> None:
    await hub.submit("acme", HASHES[:3])
    proxy = await Proxy(hub.url).start()
    try:
        proxy.mode = "down"
        directory = tmp_path / "mirror"
        code, _, err = await run_cli(
            "mirror", "--hub", proxy.url, "--key", str(key_file(tmp_path, hub.members["reader"])),
            "--collection", COLLECTION, "--pin", hub.key, str(directory),
        )  # fmt: skip
        assert code == 1 and "503" in err
        assert mirror_size(directory) == 0
        proxy.mode = "garbage"
        code, _, err = await run_cli("mirror", str(directory))
        assert code in (1, 4), err
        assert mirror_size(directory) == 0
        proxy.mode = "pass"
        code, _, err = await run_cli("mirror", str(directory))
        assert code == 0, err
        assert mirror_size(directory) == 3
    finally:
        await proxy.close()


def test_source_names() -> None:
    key = SignerKey.generate("hub-a").verifier
    direct = SourceSpec.make("http://a/", key, "main")
    assert (direct.name, direct.remote, direct.url, direct.origin.checkpoint_origin) == (
        "hub-a:main",
        "main",
        "http://a",
        "hub-a/main",
    )
    relayed = SourceSpec.make("http://b", key, "hub-a:main")
    assert (relayed.name, relayed.remote) == ("hub-a:main", "hub-a:main")
    with pytest.raises(ValueError, match="pin that hub's key"):
        SourceSpec.make("http://b", key, "hub-c:main")
    with pytest.raises(ValueError):
        SourceSpec.make("http://b", key, "a/b")


def test_mirror_help_teaches_with_examples(capsys: pytest.CaptureFixture[str]) -> None:
    from federation.cli import main

    assert main(["mirror", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "hashfed mirror --hub" in out.split("examples:")[1]
    assert "--compare" in out and "Exit status 3" in out.replace("\n", " ")
    assert main(["lookup", "--help"]) == 0
    assert "--mirror DIR" in capsys.readouterr().out
