"""Helpers shared by the benchmarks that run a hub: hashes as hex, a hub served in a
child process on loopback, its memory, and the figures written into docs/benchmarks.md."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from federation.client import HubClient
from federation.config import DataDir

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"


def hexes(codes: npt.NDArray[np.uint64]) -> list[str]:
    """PDQ codes (rows of four uint64) as 64-character hex strings."""
    raw = np.ascontiguousarray(codes).view(np.uint8).reshape(-1, 32)
    return [row.tobytes().hex() for row in raw]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(
    data: DataDir, port: int, stop_timeout: float = 60, extra: Sequence[str] = ()
) -> Iterator[subprocess.Popen[bytes]]:
    """``hashfed serve`` of ``data`` on 127.0.0.1:``port`` (with ``extra`` options) in a child process,
    stopped on exit."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "federation",
            "serve",
            str(data.path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield process
    finally:
        process.terminate()
        process.wait(timeout=stop_timeout)


async def wait_ready(url: str, timeout: float = 600) -> float:
    """Poll the hub's ``/v1/ready`` until it answers; return the seconds waited."""
    started = time.perf_counter()
    async with HubClient(url, retries=0) as client:
        while time.perf_counter() - started < timeout:
            if await client.ready():
                return time.perf_counter() - started
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not become ready")


def memory_of(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in bytes: its resident memory now and at its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def write_docs_section(name: str, heading: str | None, section: str) -> None:
    """Put ``section`` between the ``<!-- name:start -->`` and ``<!-- name:end -->`` markers
    of docs/benchmarks.md, each marker on a line of its own, replacing only what was between
    them. Without the markers, append them with the section, under ``## heading`` if given
    (the file is created if missing)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        title = f"## {heading}\n\n" if heading else ""
        text = text.rstrip("\n") + "\n\n" + title + block + "\n"
    DOCS.write_text(text)


def write_section(name: str, section: str) -> None:
    """Put ``section`` between the ``<!-- NAME:start -->`` and ``<!-- NAME:end -->`` markers of
    docs/benchmarks.md (appended with new markers when they are not there yet)."""
    start_marker, end_marker = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start_marker}\n{section.rstrip()}\n{end_marker}\n"
    text = DOCS.read_text(encoding="utf-8")
    start, end = text.find(start_marker), text.find(end_marker)
    if start != -1 and end > start:
        text = text[:start] + block + text[end + len(end_marker) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    DOCS.write_text(text, encoding="utf-8")
    print(f"wrote {DOCS}", file=sys.stderr)


def command_line(module: str, argv: Sequence[str]) -> str:
    """How this run was started, for the report, with the value of ``--dir`` (a local path) as DIR."""
    shown: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            shown.append("DIR")
            hide_next = False
        elif arg == "--dir":
            shown.append(arg)
            hide_next = True
        elif arg.startswith("--dir="):
            shown.append("--dir=DIR")
        else:
            shown.append(arg)
    return " ".join(["python -m", module, *shown])
