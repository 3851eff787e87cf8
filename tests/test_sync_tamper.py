"""Tampering and forks: each is detected and refused with nothing applied; forks keep evidence.

A proxy in front of a real hub alters its answers (one flipped bit in an
entry's payload, a member signature, a proof, a checkpoint's root or
signature); a second real hub with the same key and a different history
stands for a hub that rewrites its log or shows two mirrors different logs.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from federation.client import HubClient
from federation.sync.mirror import MirrorDir
from federation.sync.puller import Puller, SourceSpec
from federation.sync.verify import ROLLBACK, SAME_SIZE, VerificationError
from tests.sync_helpers import (
    COLLECTION,
    READ,
    READ_WRITE,
    LiveHub,
    Mutator,
    Proxy,
    clone_hub,
    flip_payload_bit,
    flip_signature_bit,
    key_file,
    make_hub,
    mirror_evidence,
    mirror_size,
    pdq,
    run_cli,
    tamper_checkpoint,
    tamper_entry,
    tamper_proof,
)

HASHES = [pdq(1000 + seed) for seed in range(10)]


class Setup:
    def __init__(self, hub: LiveHub, proxy: Proxy, root: Path) -> None:
        self.hub, self.proxy, self.root = hub, proxy, root

    async def mirror(self, name: str = "mirror", via: str | None = None) -> tuple[int, Path, str]:
        """Run `hashfed mirror` into root/name through ``via`` (the proxy by default)."""
        directory = self.root / name
        if MirrorDir(directory).exists():
            code, _, err = await run_cli("mirror", str(directory))
        else:
            code, _, err = await run_cli(
                "mirror", "--hub", via or self.proxy.url,
                "--key", str(key_file(self.root, self.hub.members["reader"])),
                "--collection", COLLECTION, "--pin", self.hub.key, str(directory),
            )  # fmt: skip
        return code, directory, err


@pytest.fixture
async def setup(tmp_path: Path) -> AsyncIterator[Setup]:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "reader": READ})
    await hub.serve()
    proxy = await Proxy(hub.url).start()
    await hub.submit("acme", HASHES[:3], labels=["x"])
    yield Setup(hub, proxy, tmp_path)
    await proxy.close()
    await hub.stop()


async def _answers(directory: Path) -> str:
    code, out, err = await run_cli("lookup", "--mirror", str(directory), "--type", "pdq", "--json", *HASHES)
    assert code == 0, err
    return out


def garble(endpoint: str) -> Mutator:
    def mutate(target: str, body: bytes) -> bytes:
        return b'{"hashes": [' if target.split("?")[0].endswith(endpoint) else body

    return mutate


@pytest.mark.parametrize(
    ("what", "mutate", "expected"),
    [
        ("payload bit", tamper_entry(3, flip_payload_bit), "does not verify"),
        ("signature bit", tamper_entry(3, flip_signature_bit), "does not verify"),
        ("checkpoint root bit", tamper_checkpoint("root"), "checkpoint from"),
        ("checkpoint signature bit", tamper_checkpoint("signature"), "checkpoint from"),
        ("garbled proof", garble("/proof/consistency"), "not valid"),
        ("garbled entries", garble("/entries"), "malformed entry line"),
    ],
)
async def test_a_flipped_bit_is_refused_and_nothing_is_applied(
    setup: Setup, what: str, mutate: Mutator, expected: str
) -> None:
    code, directory, err = await setup.mirror()
    assert code == 0, err
    before_size, before_answers = mirror_size(directory), await _answers(directory)
    await setup.hub.submit("acme", HASHES[3:5], labels=["y"])
    await setup.hub.submit("acme", remove=HASHES[:1])

    setup.proxy.mutate = mutate
    code, _, err = await setup.mirror()
    assert code == 4, err
    assert "verification failed, nothing of it was applied" in err and expected in err, err
    assert mirror_size(directory) == before_size
    assert await _answers(directory) == before_answers
    assert not (directory / "evidence").exists()

    setup.proxy.mutate = None  # tampering in transit is not a fork: the next honest answer is taken
    code, _, err = await setup.mirror()
    assert code == 0, err
    assert mirror_size(directory) == before_size + 2


async def test_a_tampered_first_entry_leaves_no_collection(setup: Setup) -> None:
    setup.proxy.mutate = tamper_entry(0, flip_signature_bit)
    code, directory, err = await setup.mirror()
    assert code == 4 and "entry 0" in err, err
    assert mirror_size(directory) == 0


async def test_a_flipped_bit_in_a_consistency_proof_is_retried_never_fork_evidence(setup: Setup) -> None:
    """A proof that does not verify proves nothing about the hub: anyone on the path can flip a bit."""
    code, directory, _ = await setup.mirror()
    assert code == 0
    before_size, before_answers = mirror_size(directory), await _answers(directory)
    await setup.hub.submit("acme", HASHES[3:5])
    setup.proxy.mutate = tamper_proof()
    code, _, err = await setup.mirror()
    assert code == 4 and "proves nothing" in err, err
    assert mirror_size(directory) == before_size and await _answers(directory) == before_answers
    assert mirror_evidence(directory) == []
    setup.proxy.mutate = None
    code, _, err = await setup.mirror()  # the source was never stopped: the honest answer goes through
    assert code == 0, err
    assert mirror_size(directory) == before_size + 1


async def test_a_flipped_bit_in_a_span_proof_refuses_that_span(setup: Setup) -> None:
    for position in range(3, 9):
        await setup.hub.submit("acme", HASHES[position : position + 1])
    code, directory, _ = await setup.mirror(via=setup.hub.url)  # writes mirror.toml; then pull by hand
    spec = SourceSpec.make(setup.proxy.url, setup.hub.signer.verifier, COLLECTION)
    node = MirrorDir(directory).open_node()
    try:
        size = node.store.log_size("hub-a:main")
        await setup.hub.submit("acme", HASHES[9:10])
        await setup.hub.submit("acme", remove=HASHES[:2])

        async def run(fn):  # type: ignore[no-untyped-def]
            return fn()

        setup.proxy.mutate = tamper_proof(only_old=size + 1)
        async with HubClient(setup.proxy.url, setup.hub.members["reader"], retries=0) as client:
            with pytest.raises(VerificationError, match="not proven a prefix"):
                await Puller(node, spec, client, run, first_span=1, span_bytes=1).sync()
            assert node.store.log_size("hub-a:main") == size
            setup.proxy.mutate = None
            await Puller(node, spec, client, run, first_span=1, span_bytes=1).sync()
            assert node.store.log_size("hub-a:main") == size + 2
    finally:
        node.store.close()
    assert code == 0


@pytest.mark.parametrize(("extra", "reason"), [(0, ROLLBACK), (1, SAME_SIZE), (3, ROLLBACK)])
async def test_a_hub_that_rewrites_history_is_caught(setup: Setup, extra: int, reason: str) -> None:
    """The mirror trusted a log of size 5; the hub then shows one that differs from entry 3 on."""
    rewritten = clone_hub(setup.hub, setup.root, "rewritten")
    await setup.hub.submit("acme", HASHES[3:4])
    await setup.hub.submit("acme", HASHES[4:5])
    code, directory, _ = await setup.mirror()
    assert code == 0 and mirror_size(directory) == 5
    before = await _answers(directory)

    await rewritten.serve()
    try:
        await rewritten.submit("acme", HASHES[3:4])
        for position in range(extra):
            await rewritten.submit("acme", HASHES[6 + position : 7 + position], labels=["other"])
        setup.proxy.upstream = rewritten.url
        code, _, err = await setup.mirror()
        assert code == 3 and "FORK DETECTED" in err, err
        assert mirror_size(directory) == 5 and await _answers(directory) == before
        (evidence,) = mirror_evidence(directory)
        assert evidence.reason == reason
        evidence.check()  # the evidence stands on its own
        trusted_size = int(evidence.trusted.split("\n")[1])
        conflicting_size = int(evidence.conflicting.split("\n")[1])
        assert (trusted_size, conflicting_size) == (5, 4 + extra)
    finally:
        await rewritten.stop()


async def test_two_mirrors_shown_different_histories_find_out_when_they_compare(setup: Setup) -> None:
    other = clone_hub(setup.hub, setup.root, "other")
    await other.serve()
    try:
        await setup.hub.submit("acme", HASHES[3:4])
        await other.submit("acme", HASHES[5:6])  # same size, another entry 3
        code, first, _ = await setup.mirror("first", via=setup.hub.url)
        assert code == 0
        code, second, _ = await setup.mirror("second", via=other.url)
        assert code == 0
        code, out, _ = await run_cli("mirror", str(first), "--compare", str(first / "checkpoint.txt"))
        assert code == 0 and "consistent" in out

        code, _, err = await run_cli("mirror", str(first), "--compare", str(second / "checkpoint.txt"))
        assert code == 3 and "FORK DETECTED" in err
        (evidence,) = mirror_evidence(first)
        assert evidence.reason == SAME_SIZE and "two trees of size 4" in evidence.check()

        # Sizes differ: the mirror that holds the longer log proves the shorter one is not its prefix.
        await other.submit("acme", HASHES[6:7])
        code, _, err = await run_cli("mirror", str(second))
        assert code == 0, err
        code, _, err = await run_cli("mirror", str(second), "--compare", str(first / "checkpoint.txt"))
        assert code == 3
        (evidence,) = mirror_evidence(second)
        assert evidence.reason == ROLLBACK
        evidence.check()
        assert json.loads(evidence.dumps())["proof"]["from"] == "local"
    finally:
        await other.stop()


async def test_watch_follows_the_log_until_the_hub_forks(setup: Setup) -> None:
    code, directory, _ = await setup.mirror()
    assert code == 0
    rewritten = clone_hub(setup.hub, setup.root, "rewritten")
    await rewritten.serve()
    try:
        for position in range(7, 10):
            await rewritten.submit("acme", HASHES[position : position + 1])
        watcher = asyncio.create_task(run_cli("mirror", str(directory), "--watch", "--interval", "0.05"))
        await setup.hub.submit("acme", HASHES[3:4])
        await setup.hub.submit("acme", HASHES[4:5])
        for _ in range(200):  # the watching mirror picks the new entries up
            if mirror_size(directory) == 5:
                break
            await asyncio.sleep(0.05)
        assert mirror_size(directory) == 5 and not watcher.done()
        # The rewritten log (size 6) proves, with its own consistency proof, another prefix of size 5.
        setup.proxy.upstream = rewritten.url
        code, out, err = await asyncio.wait_for(watcher, 10)
        assert code == 3 and "FORK DETECTED" in err, err
        assert "new entr" in out
        assert mirror_size(directory) == 5
    finally:
        await rewritten.stop()


async def test_an_operator_resumes_a_stopped_source_after_investigating(setup: Setup) -> None:
    rewritten = clone_hub(setup.hub, setup.root, "rewritten")
    await setup.hub.submit("acme", HASHES[3:4])
    code, directory, _ = await setup.mirror()
    assert code == 0 and mirror_size(directory) == 4
    await rewritten.serve()
    try:
        await rewritten.submit("acme", HASHES[6:7], labels=["other"])
        setup.proxy.upstream = rewritten.url
        code, _, err = await setup.mirror()
        assert code == 3 and "FORK DETECTED" in err, err
    finally:
        await rewritten.stop()
    setup.proxy.upstream = setup.hub.url
    code, _, err = await setup.mirror()
    assert code == 3 and "was stopped by fork evidence" in err
    code, out, _ = await run_cli("resume", str(directory))
    assert code == 0 and "resumed" in out and "1 piece of evidence kept" in out
    await setup.hub.submit("acme", HASHES[4:5])
    code, _, err = await setup.mirror()
    assert code == 0, err
    assert mirror_size(directory) == 5 and len(mirror_evidence(directory)) == 1
    code, out, _ = await run_cli("resume", str(directory))
    assert code == 0 and "was not stopped" in out
