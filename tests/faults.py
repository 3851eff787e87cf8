"""Helpers for the fault tests: real hub processes, small filesystems made for a test, free ports."""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, **extra}


def hashfed(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the real command line in a child process."""
    return subprocess.run(
        [sys.executable, "-m", "federation", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env or child_env(),
        timeout=timeout,
    )


def start_hashfed(*args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "federation", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=env or child_env(),
        )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int | None:
    """The process's exit status, or None if it still runs after ``timeout`` seconds (it is then stopped)."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        proc.wait(30)
        return None


async def wait_until_ready(
    url: str, proc: subprocess.Popen[bytes], log: Path, ssl_context: ssl.SSLContext | None = None
) -> None:
    """Poll ``GET /v1/ready`` of a hub started as ``proc`` (logging to ``log``) until it answers 200."""
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context is not None else None
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"the hub exited with {proc.returncode}:\n{log.read_text()}")
            try:
                async with session.get(url + "/v1/ready") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    pytest.fail(f"the hub never became ready:\n{log.read_text()}")


def can_mount() -> str | None:
    """Why this machine cannot mount a small filesystem for a test, or None if it can."""
    if sys.platform != "linux":
        return "small test filesystems need Linux"
    if os.geteuid() != 0:
        return "mounting a small tmpfs for the test needs root (CAP_SYS_ADMIN)"
    if shutil.which("mount") is None:
        return "no mount command on this machine"
    return None


@contextmanager
def small_filesystem(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (for instance ``"8m"``) mounted at ``path`` for the block; skips where impossible."""
    reason = can_mount()
    if reason is not None:
        pytest.skip(reason)
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)])
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs at {path} here (mount exited {made.returncode})")
    try:
        yield path
    finally:
        gc.collect()  # indexes this process dropped may still map segment files there until collected
        for _ in range(50):
            if subprocess.run(["umount", str(path)]).returncode == 0:
                break
            time.sleep(0.1)


def remount(path: Path, options: Sequence[str]) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", *options]), str(path)], check=True)


def fill(path: Path, keep_free: int = 0) -> Path:
    """Fill the filesystem holding ``path`` until ``keep_free`` bytes (or fewer) are left; return the filler."""
    filler = path / "filler"
    with open(filler, "wb") as handle:
        chunk = b"\0" * (1 << 16)
        while True:
            free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
            if free <= keep_free:
                break
            try:
                handle.write(chunk[: max(4096, min(len(chunk), free - keep_free))])
                handle.flush()
            except OSError:
                break
    return filler


@contextmanager
def ext4_filesystem(path: Path, size_mib: int = 64) -> Iterator[str]:
    """A loop-mounted ext4 at ``path`` (``errors=remount-ro``); yields its device name. Skips where impossible."""
    reason = can_mount()
    if reason is None and (shutil.which("mkfs.ext4") is None or not Path("/dev/loop-control").exists()):
        reason = "a loop-mounted ext4 needs mkfs.ext4 and /dev/loop-control"
    if reason is not None:
        pytest.skip(reason)
    image = path.with_name(path.name + ".img")
    with open(image, "wb") as handle:
        handle.truncate(size_mib * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-o", "loop,errors=remount-ro", str(image), str(path)])
    if made.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here (mount exited {made.returncode})")
    device = subprocess.run(["findmnt", "-no", "SOURCE", str(path)], capture_output=True, text=True).stdout
    try:
        yield Path(device.strip()).name
    finally:
        subprocess.run(["umount", "-l", str(path)])
        subprocess.run(["losetup", "-d", device.strip()])


def ext4_error(device: str) -> None:
    """Make the kernel record an ext4 error on ``device``: with ``errors=remount-ro`` it turns read-only."""
    trigger = Path("/sys/fs/ext4") / device / "trigger_fs_error"
    if not trigger.exists():
        pytest.skip("this kernel has no ext4 trigger_fs_error to turn a file system read-only")
    trigger.write_text("hashfed test: storage turned read-only\n")
