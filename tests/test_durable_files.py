"""Files beside the database are written durably and owner-only.

Durability is observed at the system-call boundary: every file ``hashfed init`` and ``hashfed
mirror`` write must be fsynced under a temporary name, renamed into place and followed by an
fsync of its directory (without the last, a journal abort can leave ``hub.toml`` empty).
Permissions are checked on real files made by the real command line under a umask of 000.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.admin import init_hub
from federation.sync.mirror import MirrorDir
from tests.faults import REPO, child_env
from tests.sync_helpers import READ, LiveHub, key_file, make_hub, mirror_argv, run_cli

Event = tuple[str, str, str]


@pytest.fixture
def io_events(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """fsync and rename calls made by this process: (call, path, renamed-to)."""
    events: list[Event] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str], **kwargs: object) -> None:
        real_replace(src, dst, **kwargs)  # type: ignore[arg-type]
        events.append(("replace", os.fspath(src), os.fspath(dst)))

    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc/self/fd to name the files fsync is called on")
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    yield events


def assert_written_durably(events: list[Event], target: Path) -> None:
    """``target`` was fsynced under a temporary name, renamed into place, then its directory fsynced."""
    target = target.resolve()
    renames = [
        i for i, (call, _, dst) in enumerate(events) if call == "replace" and Path(dst).resolve() == target
    ]
    assert renames, f"{target.name} was not renamed into place"
    last = renames[-1]
    temporary = Path(events[last][1]).resolve()
    assert any(call == "fsync" and Path(path).resolve() == temporary for call, path, _ in events[:last]), (
        f"{target.name} was not fsynced before its rename"
    )
    assert any(
        call == "fsync" and Path(path).resolve() == target.parent for call, path, _ in events[last + 1 :]
    ), f"the directory of {target.name} was not fsynced after the rename"


def test_init_writes_each_file_durably(tmp_path: Path, io_events: list[Event]) -> None:
    init_hub(tmp_path / "hub", name="hub", federation="fed", collection="main")
    for name in ("hub.toml", "hub.pub", "hub.key"):
        assert_written_durably(io_events, tmp_path / "hub" / name)


async def test_mirror_writes_its_config_and_checkpoint_durably(
    tmp_path: Path, io_events: list[Event]
) -> None:
    hub = make_hub(tmp_path, "hub-a", {"reader": READ})
    await hub.serve()
    try:
        directory = tmp_path / "mirror"
        reader = key_file(tmp_path, hub.members["reader"])
        code, _, err = await run_cli(*mirror_argv(hub.url, reader, hub.key, directory))
        assert code == 0, err
    finally:
        await hub.stop()
    assert_written_durably(io_events, MirrorDir(directory).config_file)
    assert_written_durably(io_events, MirrorDir(directory).checkpoint_file)


def _loose_files(root: Path) -> list[str]:
    loose = []
    for path in [root, *root.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            loose.append(f"{path.relative_to(root.parent)} ({mode:o})")
    return loose


async def test_init_and_mirror_make_owner_only_files_whatever_the_umask(tmp_path: Path) -> None:
    def run(*argv: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "federation", *argv],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=child_env(),
            preexec_fn=lambda: os.umask(0),  # the point of the test: a umask that restricts nothing
            timeout=120,
        )
        assert done.returncode == 0, done.stderr

    own = str(tmp_path / "own")
    await asyncio.to_thread(run, "init", own, "--name", "own", "--federation", "fed", "--collection", "main")
    await asyncio.to_thread(run, "keygen", "acme", "--out", str(tmp_path / "acme.key"))
    await asyncio.to_thread(
        run,
        "member",
        "grant",
        own,
        "--collection",
        "main",
        "--key",
        str(tmp_path / "acme.pub"),
        "--rights",
        "read",
    )
    assert _loose_files(tmp_path / "own") == []

    hub: LiveHub = make_hub(tmp_path, "hub-a", {"reader": READ})
    await hub.serve()
    try:
        reader = key_file(tmp_path, hub.members["reader"])
        await asyncio.to_thread(run, *mirror_argv(hub.url, reader, hub.key, tmp_path / "mirror"))
    finally:
        await hub.stop()
    assert (tmp_path / "mirror" / "checkpoint.txt").exists()
    assert _loose_files(tmp_path / "mirror") == []
