"""A mirror meets a network that fails mid-answer: it is an outage to retry (exit 1), never a
verification failure, and a hub that goes silent is given up on after the read timeout."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from tests.sync_helpers import (
    READ,
    READ_WRITE,
    LiveHub,
    Proxy,
    key_file,
    make_hub,
    mirror_argv,
    mirror_size,
    pdq,
    run_cli,
)


async def _hub_behind_proxy(tmp_path: Path) -> tuple[LiveHub, Proxy]:
    hub = make_hub(tmp_path, "hub-a", {"acme": READ_WRITE, "reader": READ})
    await hub.serve()
    for batch in range(3):
        await hub.submit("acme", [pdq(batch * 1000 + n) for n in range(200)])
    return hub, await Proxy(hub.url).start()


async def _mirror(tmp_path: Path, hub: LiveHub, proxy: Proxy, *extra: str) -> tuple[int, str, str]:
    reader = key_file(tmp_path, hub.members["reader"])
    return await run_cli(*mirror_argv(proxy.url, reader, hub.key, tmp_path / "mirror", *extra))


async def test_a_connection_reset_mid_answer_is_an_outage_not_a_verification_failure(tmp_path: Path) -> None:
    hub, proxy = await _hub_behind_proxy(tmp_path)
    try:
        proxy.mode = "reset"
        code, _, err = await _mirror(tmp_path, hub, proxy)
        assert code == 1, err
        assert "lost the connection" in err and "verification failed" not in err
        proxy.mode = "pass"
        code, _, err = await _mirror(tmp_path, hub, proxy)
        assert code == 0, err
        assert mirror_size(tmp_path / "mirror") == 5
    finally:
        await proxy.close()
        await hub.stop()


async def test_a_hub_that_stalls_after_the_headers_is_given_up_on_after_the_read_timeout(
    tmp_path: Path,
) -> None:
    hub, proxy = await _hub_behind_proxy(tmp_path)
    try:
        proxy.mode, proxy.delay = "stall", 60.0
        started = time.monotonic()
        code, _, err = await _mirror(tmp_path, hub, proxy, "--read-timeout", "1")
        assert code == 1, err
        assert "no data for 1 s (the read timeout)" in err
        assert time.monotonic() - started < 50  # the stall is 60 s; the total limit 300 s
    finally:
        await proxy.close()
        await hub.stop()


async def test_a_checkpoint_older_than_the_verified_one_is_warned_about(tmp_path: Path) -> None:
    hub, proxy = await _hub_behind_proxy(tmp_path)
    try:
        old_note = await proxy_checkpoint(proxy)
        await hub.submit("acme", [pdq(9999)])
        code, _, err = await _mirror(tmp_path, hub, proxy)
        assert code == 0, err
        assert "warning" not in err

        def stale(target: str, body: bytes) -> bytes:
            return old_note if target.split("?")[0].endswith("/checkpoint") else body

        proxy.mutate = stale
        code, _, err = await _mirror(tmp_path, hub, proxy)
        assert code == 0, err
        assert "showed a checkpoint of 5 entries, older than the 6 already verified here" in err
        assert mirror_size(tmp_path / "mirror") == 6
    finally:
        await proxy.close()
        await hub.stop()


async def proxy_checkpoint(proxy: Proxy) -> bytes:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proxy.url}/v1/collections/main/checkpoint") as answer,
    ):
        assert answer.status == 200
        return await answer.read()
