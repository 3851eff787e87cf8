"""Large index segments kept in files and memory-mapped read-only.

A large segment (the sorted codes and the arrays of the engine built over
them) is written once into a directory of ``.npy`` files and then only ever
read through ``mmap``. That gives three things:

* the workers of one hub share one copy of a segment in the page cache
  instead of holding one each;
* a merge writes the new segment into its files with ``write()`` rather than
  building it in anonymous memory, so while it runs the hub holds the old
  segment plus the build's temporaries, not two segments;
* a restart maps the newest segment instead of reading and rebuilding it.

Layout, under the index directory::

    <collection>.<type>.json          which segment is current, its position, checksums
    <collection>.<type>.<id>/         one built segment: codes.npy and the engine's arrays
    .build-<collection>.<type>.<id>/  a segment being written (removed if found at load)

A segment directory is complete before the ``.json`` names it (each file is
fsynced, the directory renamed into place and fsynced). The metadata is
replaced atomically and carries a SHA-256 of every file, so a torn write,
a crash between the steps or a stale pair is detected at load and the
segment ignored (the index is then built from the store). Directories the
metadata no longer names are deleted after it moves on; a process still
mapping one keeps its pages until it lets go (unlinked files live on while
mapped).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import numpy as np
import numpy.typing as npt

from ..durable import OWNER_ONLY_FILE, fsync_directory, make_private_directory, write_atomically

SEGMENT_FORMAT = 3
CODES = "codes"
log = logging.getLogger("hashfed.index")


@dataclass(frozen=True)
class Segment:
    """A built segment, mapped read-only: the sorted unique codes and the engine's arrays."""

    name: str
    codes: npt.NDArray[np.uint8]
    arrays: Mapping[str, npt.NDArray[np.generic]]
    checksums: Mapping[str, str]
    path: Path
    """The segment's directory."""


@dataclass(frozen=True)
class SavedSegment:
    """The segment a collection's snapshot names, and the log position its codes reflect."""

    position: int
    segment: Segment


class ArrayWriter:
    """One ``.npy`` file written front to back in chunks (never held in memory whole)."""

    def __init__(self, path: Path, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = shape
        self._expected = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        self._written = 0
        self._sha = hashlib.sha256()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, OWNER_ONLY_FILE)
        self._file = os.fdopen(fd, "wb")
        header = io.BytesIO()
        fields = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(header, fields)
        self._file.write(header.getvalue())
        self._sha.update(header.getvalue())

    def write(self, chunk: npt.ArrayLike) -> None:
        data = np.ascontiguousarray(chunk, dtype=self.dtype)
        if data.size == 0:
            return
        raw = memoryview(data.reshape(-1).data).cast("B")
        if self._written + len(raw) > self._expected:
            raise ValueError(f"{self.path.name}: more data than its shape {self.shape} holds")
        self._file.write(raw)
        self._sha.update(raw)
        self._written += len(raw)

    def close(self) -> str:
        """Flush and fsync; the file's SHA-256."""
        if self._written != self._expected:
            self._file.close()
            raise ValueError(f"{self.path.name}: {self._written} bytes written, {self._expected} expected")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._sha.hexdigest()

    def abandon(self) -> None:
        self._file.close()


class RowReader:
    """Rows ``[start, stop)`` of a 2-d ``.npy`` file, read with ``pread``.

    A build reads the codes it wrote this way rather than through a mapping,
    so they do not count towards the process's resident memory while the old
    segment is still mapped (they are in the page cache either way).
    """

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as handle:
            if np.lib.format.read_magic(handle) != (1, 0):
                raise ValueError(f"{path.name} is not a version 1.0 .npy file")
            shape, _, dtype = np.lib.format.read_array_header_1_0(handle)
            self._offset = handle.tell()
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape: tuple[int, ...] = tuple(shape)
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __call__(self, start: int, stop: int) -> npt.NDArray[np.generic]:
        with self.opened() as read:
            return read(start, stop)

    @contextmanager
    def opened(self) -> Iterator[Callable[[int, int], npt.NDArray[np.generic]]]:
        """The reader of rows ``[start, stop)`` over one open descriptor, for many reads in a row."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            yield lambda start, stop: self._read(fd, start, stop)
        finally:
            os.close(fd)

    def _read(self, fd: int, start: int, stop: int) -> npt.NDArray[np.generic]:
        stop = min(stop, self.shape[0])
        count = max(0, stop - start)
        raw = bytearray(count * self._row_bytes)
        view = memoryview(raw)
        done = 0
        while done < len(raw):
            read = os.preadv(fd, [view[done:]], self._offset + start * self._row_bytes + done)
            if read == 0:
                raise EOFError(f"{self.path.name} ends before row {stop}")
            done += read
        return np.frombuffer(raw, dtype=self.dtype).reshape(count, *self.shape[1:])


class UnmappedRows:
    """Rows of codes in a segment's sorted codes file, found with ``pread`` rather than the mapping.

    Finding even a few hundred codes by binary search in a mapped file maps
    nearly all of it: each probe lands on another page, and the kernel maps
    the cached pages around every fault. While a new segment takes over from
    an old one (a merge replaying the updates made meanwhile, a worker
    adopting a segment another published), the old one is still mapped and
    resident, so doing that through the new mapping held both at once. This
    reads one key in :data:`FENCE_ROWS` once (sequentially, on first use),
    then the block of rows each code falls in (spans of blocks when there
    are many); the new mapping stays untouched until lookups start using it.
    """

    FENCE_ROWS = 256
    FEW_BLOCKS = 2048
    """Up to this many blocks a look-up reads block by block; beyond, :data:`SPAN_BLOCKS` at a time."""
    SPAN_BLOCKS = 256

    def __init__(self, segment: Segment) -> None:
        self._reader = RowReader(segment.path / f"{CODES}.npy")
        self._width = segment.codes.shape[1]
        self._fence: npt.NDArray[np.void] | None = None

    def _keys(self, rows: npt.NDArray[np.generic]) -> npt.NDArray[np.void]:
        return np.ascontiguousarray(rows).view(f"V{self._width}").ravel()

    def fence(self) -> npt.NDArray[np.void]:
        """Every :data:`FENCE_ROWS`-th key, from row 0 (read on first use)."""
        if self._fence is None:
            step = self.FENCE_ROWS * self.SPAN_BLOCKS
            # Copies, so each chunk read is freed before the next one is.
            parts = [
                self._keys(self._reader(begin, begin + step))[:: self.FENCE_ROWS].copy()
                for begin in range(0, len(self._reader), step)
            ]
            self._fence = np.concatenate(parts) if parts else np.empty(0, f"V{self._width}")
        return self._fence

    def rows(self, codes: npt.NDArray[np.uint8]) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
        """Row of each code (where it is or would go), and whether it is there at all."""
        wanted = self._keys(codes)
        rows = np.zeros(len(wanted), dtype=np.intp)
        present = np.zeros(len(wanted), dtype=np.bool_)
        fence = self.fence()
        if len(fence) == 0 or len(wanted) == 0:
            return rows, present
        blocks = np.maximum(np.searchsorted(fence, wanted, side="right") - 1, 0)
        # Many codes: read a few large spans rather than a block per code (the
        # loop costs microseconds a read; a whole 10M-code file reads in 0.2 s).
        distinct = len(np.unique(blocks))
        per_read = self.FENCE_ROWS * (1 if distinct <= self.FEW_BLOCKS else self.SPAN_BLOCKS)
        spans = blocks * self.FENCE_ROWS // per_read
        order = np.argsort(spans, kind="stable")
        starts = np.flatnonzero(np.diff(spans[order], prepend=-1))
        ends = [*starts[1:].tolist(), len(order)]
        with self._reader.opened() as read:
            for begin, end in zip(starts.tolist(), ends, strict=True):
                which = order[begin:end]
                first = int(spans[which[0]]) * per_read
                keys = self._keys(read(first, first + per_read))
                at = np.minimum(np.searchsorted(keys, wanted[which]), len(keys) - 1)
                rows[which] = first + at
                present[which] = keys[at] == wanted[which]
        return rows, present


class SegmentBuilder:
    """A segment directory being written; :meth:`finish` makes it whole and maps it."""

    def __init__(self, directory: Path, stem: str) -> None:
        make_private_directory(directory)
        self._directory = directory
        self.name = f"{stem}.{secrets.token_hex(6)}"
        self._path = directory / f".build-{self.name}"
        self._path.mkdir(mode=0o700)
        self._checksums: dict[str, str] = {}
        self._open: dict[str, ArrayWriter] = {}

    def __enter__(self) -> SegmentBuilder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is not None:
            self.abandon()

    def stream(self, name: str, dtype: npt.DTypeLike, shape: tuple[int, ...]) -> ArrayWriter:
        """A writer for array ``name``; call :meth:`done` with it once every chunk is written."""
        writer = ArrayWriter(self._path / f"{name}.npy", dtype, shape)
        self._open[name] = writer
        return writer

    def done(self, name: str) -> None:
        self._checksums[name] = self._open.pop(name).close()

    def put(self, name: str, array: npt.NDArray[np.generic]) -> None:
        """Write a whole array at once (small ones, or engines built in memory)."""
        writer = self.stream(name, array.dtype, array.shape)
        writer.write(array)
        self.done(name)

    def rows(self, name: str) -> RowReader:
        """Read back an array already written, a few rows at a time, without mapping it."""
        return RowReader(self._path / f"{name}.npy")

    def finish(self) -> Segment:
        """Make the directory durable under its final name and map every array."""
        if self._open:
            raise ValueError(f"arrays left unfinished: {sorted(self._open)}")
        fsync_directory(self._path)
        final = self._directory / self.name
        os.replace(self._path, final)
        fsync_directory(self._directory)
        return _map(final, self._checksums)

    def abandon(self) -> None:
        for writer in self._open.values():
            writer.abandon()
        self._open.clear()
        shutil.rmtree(self._path, ignore_errors=True)


def _map(path: Path, checksums: Mapping[str, str]) -> Segment:
    # Plain ndarray views of the maps (the map stays open as their base): a
    # np.memmap would run Python code for every slice and take of a search.
    arrays = {
        name: np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False).view(np.ndarray)
        for name in checksums
    }
    codes = arrays.pop(CODES)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(f"{path.name}: the codes are not a uint8[n, width] array")
    return Segment(path.name, codes, arrays, dict(checksums), path)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


class SnapshotFiles:
    """The index directory: each collection's current segment per type, published and loaded."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()

    def _stem(self, collection: str, signal: str) -> str:
        return f"{quote(collection, safe='')}.{signal}"

    def meta_path(self, collection: str, signal: str) -> Path:
        return self.directory / f"{self._stem(collection, signal)}.json"

    def builder(self, collection: str, signal: str) -> SegmentBuilder:
        return SegmentBuilder(self.directory, self._stem(collection, signal))

    def _meta(self, path: Path) -> dict[str, object] | None:
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def publish(self, collection: str, signal: str, position: int, segment: Segment) -> bool:
        """Name ``segment`` as the collection's current one at ``position``; False if a newer one is.

        Segment directories no longer named are removed.
        """
        meta = _sealed(
            {
                "format": SEGMENT_FORMAT,
                "collection": collection,
                "signal": signal,
                "position": position,
                "segment": segment.name,
                "count": len(segment.codes),
                "files": dict(sorted(segment.checksums.items())),
            }
        )
        meta_path = self.meta_path(collection, signal)
        with self._lock:
            current = self._meta(meta_path)
            on_disk = current.get("position") if current else None
            if isinstance(on_disk, int) and on_disk > position:
                self._discard(collection, signal, keep=str(current.get("segment")) if current else "")
                return False
            write_atomically(meta_path, json.dumps(meta))
            self._discard(collection, signal, keep=segment.name)
        return True

    def _discard(self, collection: str, signal: str, keep: str) -> None:
        """Remove the finished segment directories of one (collection, type) but ``keep``."""
        stem = self._stem(collection, signal)
        for path in self.directory.glob(f"{stem}.*"):
            if path.is_dir() and path.name != keep and path.name.count(".") == stem.count(".") + 1:
                shutil.rmtree(path, ignore_errors=True)

    def version(self, collection: str, signal: str) -> str | None:
        """The name of the segment currently published (cheap: followers poll it)."""
        meta = self._meta(self.meta_path(collection, signal))
        name = meta.get("segment") if meta else None
        return name if isinstance(name, str) else None

    def load(self, collection: str, signal: str, width: int) -> SavedSegment | None:
        """The published segment, mapped, or None if there is none or it is unusable.

        Another process may publish a newer segment (and delete this one)
        while it is being read: then the newer one is read instead.
        """
        for _ in range(3):
            meta = self._meta(self.meta_path(collection, signal))
            if meta is None:
                return None
            try:
                return self._load(collection, signal, width, meta)
            except (OSError, ValueError, EOFError) as exc:
                if self._meta(self.meta_path(collection, signal)) == meta:
                    log.warning(
                        "ignoring the unusable index snapshot of %s (%s): %s", collection, signal, exc
                    )
                    return None
        return None

    def _load(self, collection: str, signal: str, width: int, meta: dict[str, object]) -> SavedSegment:
        stem = self._stem(collection, signal)
        files = meta.get("files")
        name = meta.get("segment")
        position = meta.get("position")
        if (
            meta.get("checksum") != _sealed(meta).get("checksum")
            or (meta.get("format"), meta.get("collection"), meta.get("signal"))
            != (SEGMENT_FORMAT, collection, signal)
            or not isinstance(files, dict)
            or CODES not in files
            or not isinstance(name, str)
            or not name.startswith(f"{stem}.")
            or not isinstance(position, int)
        ):
            raise ValueError("its metadata is damaged or stale")
        path = self.directory / name
        for file, checksum in files.items():
            if _file_sha256(path / f"{file}.npy") != checksum:
                raise ValueError(f"{file}.npy does not match its checksum")
        segment = _map(path, {str(file): str(checksum) for file, checksum in files.items()})
        if segment.codes.shape[1] != width or len(segment.codes) != meta.get("count"):
            raise ValueError(f"it holds {len(segment.codes)} codes of {segment.codes.shape[1]} bytes")
        return SavedSegment(position, segment)

    def remove_unfinished(self) -> None:
        """Delete what a killed build or publication left behind (call before this process builds any)."""
        if not self.directory.exists():
            return
        for stale in self.directory.glob(".*.json.*.tmp"):
            stale.unlink(missing_ok=True)
        for path in self.directory.glob(".build-*"):
            shutil.rmtree(path, ignore_errors=True)


def _sealed(meta: dict[str, object]) -> dict[str, object]:
    """``meta`` with a ``checksum`` over every other field (the files' own SHA-256 among them)."""
    fields = {key: value for key, value in meta.items() if key != "checksum"}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return {**fields, "checksum": hashlib.sha256(canonical).hexdigest()}
