"""The broadcast's ends: what a sender reads (``Source``) and a receiver writes (``Sink``), and both on plain
files: ``FileSource`` and ``PartialSink`` (partial folders in the fetcher's format, hashed while the bytes
arrive). The fetcher's own ends are built on them (``feed.FetchingSource``, ``node.StateSink``)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .._errors import IntegrityError
from .._state import on_disk, open_data, remaining, save_progress
from .wire import FileSpec, MiB, Range, check_ranges

__all__ = ["FileSource", "OpenFile", "PartialSink", "Sink", "Source", "same_size"]


class Source(Protocol):
    """The sender's bytes: a file may still be growing (being downloaded) while it is sent."""

    def ready(self, name: str) -> int:
        """Bytes of ``name`` that may be sent: every byte below this is final (written, or verified).
        Raise the download's error if it failed; it is then raised on every rank."""

    def readinto(self, name: str, offset: int, buf: memoryview) -> None:
        """Fill ``buf`` with the bytes of ``name`` from ``offset`` (all of them are below ``ready``)."""


class Sink(Protocol):
    """A receiver's own copy, e.g. the fetcher's partial folder of each file."""

    def missing(self, spec: FileSpec) -> list[Range]:
        """The byte ranges of ``spec`` this node lacks: sorted, disjoint, inside [0, size); [] if it holds it."""

    def write(self, spec: FileSpec, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` and record it as done (may be batched until ``close``)."""

    def complete(self, spec: FileSpec) -> None:
        """Every missing byte of ``spec`` was written: verify it (raise IntegrityError) and stage it."""

    def close(self) -> None:
        """Record what was written, whatever happened before: the next run resumes from it."""

    # Optional: ``drop(name)``, called when the sender's source failed its sha256 (the abort says so): forget
    # that file (every file not completed when ``name`` is None), its bytes may be as wrong as the source's
    # (``PartialSink.drop``).


class FileSource:
    """Files on disk (``paths``), sendable up to ``ready(name)`` (default: the whole file)."""

    def __init__(self, paths: dict[str, Path], ready: Callable[[str], int] | None = None) -> None:
        self.paths = paths
        self._ready = ready
        self._fds: dict[str, int] = {}

    def ready(self, name: str) -> int:
        if self._ready is not None:
            return self._ready(name)
        return self.paths[name].stat().st_size

    def readinto(self, name: str, offset: int, buf: memoryview) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = self._fds[name] = os.open(self.paths[name], os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        while buf:
            n = os.preadv(fd, [buf], offset)
            if n <= 0:
                raise IntegrityError(f"{name} ends at byte {offset}, before its ready frontier", "run again")
            buf, offset = buf[n:], offset + n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class PartialSink:
    """A receiver's copy: per file a folder ``data`` + ``progress.json`` (the missing byte ranges), in the
    format of transfer.py's partial folders (identity = sha256, one padded page), then publish on a match.

    - ``folder(spec)``: the partial folder of a file (default ``partial_root/<sha256>``); the fetcher passes
      its claim here.
    - ``missing``: nothing of a file ``final_root/name`` holds at its size, else what the partial folder lacks.
    - ``complete`` hashes the file (following the received prefix while it arrives, the rest from disk),
      raises IntegrityError on a mismatch (the folder is deleted, as transfer.py does), else moves ``data``
      to ``final_root/name``.
    Progress is rewritten after every ``save_every`` bytes and on ``close``.
    """

    def __init__(self, partial_root: Path, final_root: Path, *, folder: Callable[[FileSpec], Path] | None = None,
                 save_every: int = 64 * MiB) -> None:
        self.partial_root, self.final_root = partial_root, final_root
        self._folder = folder or (lambda spec: self.partial_root / spec.sha256)
        self.save_every = save_every
        self._open: dict[str, OpenFile] = {}

    def missing(self, spec: FileSpec) -> list[Range]:
        if same_size(self.final_root / spec.name, spec.size):
            return []
        return check_ranges(spec, remaining(self._folder(spec), spec.sha256, spec.size))

    def _file(self, spec: FileSpec) -> OpenFile:
        f = self._open.get(spec.name)
        if f is None:
            folder = self._folder(spec)
            with self.receiving(spec):
                folder.mkdir(parents=True, exist_ok=True)
            f = self._open[spec.name] = self._start(spec, folder, self.missing(spec))
        return f

    def _start(self, spec: FileSpec, folder: Path, ranges: list[Range]) -> OpenFile:
        """A file's partial folder opened for writing: its data file and progress record (the disk may be
        full)."""
        with self.receiving(spec):
            return OpenFile(spec, folder, ranges)

    def receiving(self, spec: FileSpec) -> contextlib.AbstractContextManager[None]:
        """Around the system calls that write ``spec``, and nothing else: ``_state.on_disk``, its disk-full
        message naming the file being received."""
        return on_disk(self.final_root, f"receiving {spec.name}",
                       "free space in dino_root and run the job again: the transfer resumes")

    def write(self, spec: FileSpec, offset: int, data: memoryview) -> None:
        f = self._file(spec)
        with self.receiving(spec):
            f.write(offset, data)
            if f.unsaved >= self.save_every:
                f.save()

    def complete(self, spec: FileSpec) -> None:
        f = self._file(spec)
        with self.receiving(spec):
            digest = f.digest()
        f.close()
        del self._open[spec.name]
        if digest != spec.sha256:
            self._discard(f.folder)
            raise IntegrityError(f"{spec.name}: sha256 {digest[:12]}... of the bytes received{self.where} does not "
                                 f"match the {spec.sha256[:12]}... sent; the file was discarded",
                                 "run again to receive it again; if it repeats, a node's disk or memory is bad")
        self._place(spec, f.folder)

    def drop(self, name: str | None = None) -> None:
        """The sender's bytes of ``name`` were wrong (its sha256 failed mid-way): discard what this node holds of
        it, if it is not completed; ``name`` None: of every file not completed."""
        for f in [f for n, f in self._open.items() if name is None or n == name]:
            f.close()
            self._discard(f.folder)
            del self._open[f.spec.name]

    # -- where the files go: a subclass (the fetcher's own sink, ``node.StateSink``) overrides these -----------
    where = ""  # words naming this node in messages

    def _place(self, spec: FileSpec, folder: Path) -> None:
        """Move a verified file out of its partial folder: here, to ``final_root/name``."""
        dest = self.final_root / spec.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(folder / "data", dest)
        shutil.rmtree(folder, ignore_errors=True)

    def _discard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def _unfinished(self) -> None:
        """After ``close`` saved every open file's progress: what to do with unfinished folders (nothing here)."""

    def close(self) -> None:
        errors = []
        for f in self._open.values():
            try:
                with self.receiving(f.spec):
                    f.save()
            except Exception as exc:  # the others are still recorded
                errors.append(exc)
            f.close()
        self._open.clear()
        self._unfinished()
        if errors:
            raise errors[0]


def same_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


class OpenFile:
    def __init__(self, spec: FileSpec, folder: Path, remaining: list[Range]) -> None:
        self.spec, self.folder, self.remaining = spec, folder, list(remaining)
        self.fd = open_data(folder)
        self.sha = hashlib.sha256()
        self.hashed = 0  # the sha256 has seen [0, hashed)
        self.unsaved = 0
        self.progress_fd: int | None = None  # progress.json, rewritten in place after the first save
        try:
            self.save()
        except BaseException:
            os.close(self.fd)
            raise

    def _present_below(self, end: int) -> bool:
        return all(e <= self.hashed or s >= end for s, e in self.remaining)

    def _hash_disk(self, end: int) -> None:
        buf = bytearray(4 * MiB)
        while self.hashed < end:
            n = os.preadv(self.fd, [memoryview(buf)[:min(len(buf), end - self.hashed)]], self.hashed)
            if n <= 0:
                raise OSError(f"{self.spec.name}: partial data ends at byte {self.hashed}")
            self.sha.update(memoryview(buf)[:n])
            self.hashed += n

    def write(self, offset: int, data: memoryview) -> None:
        view, pos = data, offset
        while view:  # 1 MiB per call: a 32 MiB pwrite was 5x slower here (747 MB/s, page cache folio sizes)
            n = os.pwrite(self.fd, view[:MiB], pos)
            view, pos = view[n:], pos + n
        end = offset + len(data)
        cut: list[Range] = []
        for s, e in self.remaining:  # [offset, end) is done now
            if e <= offset or s >= end:
                cut.append((s, e))
                continue
            if s < offset:
                cut.append((s, offset))
            if e > end:
                cut.append((end, e))
        self.remaining = cut
        self.unsaved += len(data)
        if offset > self.hashed and self._present_below(offset):
            self._hash_disk(offset)  # the bytes a partial already held, once, before the first new ones
        if offset == self.hashed:
            self.sha.update(data)
            self.hashed = end

    def digest(self) -> str:
        self._hash_disk(self.spec.size)
        if os.fstat(self.fd).st_size != self.spec.size:
            os.ftruncate(self.fd, self.spec.size)
        return self.sha.hexdigest()

    def save(self) -> None:
        # in place after the first save, as _job's: no new block, so a disk the data just filled up still gets
        # what was written recorded
        self.progress_fd = save_progress(self.folder, self.spec.sha256, self.spec.size,
                                         [list(r) for r in self.remaining], self.progress_fd)
        self.unsaved = 0

    def close(self) -> None:
        for fd in (self.fd, self.progress_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.progress_fd = None

