"""Sequence numbers survive a clock correction: a member's clock ran 4 minutes fast, then was set right.

The real ``hashfed submit`` runs under libfaketime (``faketime``), so its seq and its request
signature come from a clock 240 s ahead; the next submission, from the corrected clock, must still
be accepted without waiting 4 minutes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from federation.hub import open_node
from federation.keys import write_signer_file
from tests.conftest import Federation
from tests.faults import REPO, child_env
from tests.helpers import pdq

FAST = "+240s"


async def _submit(url: str, key: Path, hashes: Path, *prefix: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *prefix,
        sys.executable,
        "-m",
        "federation",
        "submit",
        "--hub",
        url,
        "--key",
        str(key),
        "--collection",
        "main",
        "--type",
        "pdq",
        str(hashes),
        cwd=REPO,
        env=child_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    return process.returncode or 0, err.decode()


async def test_a_member_whose_clock_was_set_back_is_not_locked_out(
    federation: Federation, hub_server: TestServer, tmp_path: Path
) -> None:
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("needs libfaketime's `faketime` command (Debian package faketime; .ci/run installs it)")
    key = tmp_path / "acme.key"
    write_signer_file(federation.members["acme"], key)
    url = str(hub_server.make_url(""))
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(pdq(1) + "\n")
    second.write_text(pdq(2) + "\n")

    code, err = await _submit(url, key, first, faketime, "-f", FAST)
    assert code == 0, err
    code, err = await _submit(url, key, second)  # the clock is right again: seqs are lower
    assert code == 0, err
    node = open_node(federation.data)
    try:
        listed = {hash_hex for _, hash_hex in node.store.listed("main", "pdq")[0]}
    finally:
        node.store.close()
    assert {pdq(1), pdq(2)} <= listed
