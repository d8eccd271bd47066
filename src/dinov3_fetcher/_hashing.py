"""Hashing: sha256 and git blob ids, read straight from the page cache where that is safe.

A download's own partial data is hashed through memory-mapped windows (no copy into a buffer; why:
BENCHMARKS.md). A mapping read past the end of a file, or through an I/O error, kills the process with
SIGBUS, so only files this process owns and checks the size of are mapped; a user's files (``verify``,
``sha256_file``) are read with ``preadv`` into one reused buffer.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

__all__ = ["WINDOW", "Hasher", "git_blob_hasher", "git_blob_id", "hash_file", "hash_range", "read_range", "sha256_file"]

WINDOW = 4 * 1024 * 1024  # bytes mapped (or read) at a time: 3 files hashed at once keep 12 MiB resident


class Hasher(Protocol):
    """Anything hashlib-like that takes bytes."""
    def update(self, data: memoryview, /) -> None: ...


def git_blob_hasher(size: int) -> hashlib._Hash:
    """A sha1 primed with git's blob header: fed the ``size`` bytes of a file, it gives the file's git blob id
    (what the Hub lists for a regular, non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % size)


def git_blob_id(data: bytes) -> str:
    """git's blob id of ``data`` (what the Hub lists for a regular file)."""
    h = git_blob_hasher(len(data))
    h.update(data)
    return h.hexdigest()


def hash_range(fd: int, start: int, end: int, hashers: Sequence[Hasher]) -> int:
    """Feed bytes [start, end) of ``fd`` to each hasher in order; returns where it stopped.

    It stops short of ``end`` only when the file does (it is shorter than ``end``): a mapping past the end of
    a file would kill the process with SIGBUS, so every window is checked against the file's size first.
    """
    pos = start
    while pos < end:
        size = os.fstat(fd).st_size
        stop = min(end, size, pos + WINDOW)
        if stop <= pos:
            return pos
        base = pos - pos % mmap.ALLOCATIONGRANULARITY
        try:
            window = mmap.mmap(fd, stop - base, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=base)
        except (OSError, ValueError):
            return read_range(fd, pos, end, hashers)
        try:
            with memoryview(window) as whole, whole[pos - base:] as mv:
                for h in hashers:
                    h.update(mv)
        finally:
            window.close()
        pos = stop
    return pos


def read_range(fd: int, pos: int, end: int, hashers: Sequence[Hasher],
               on_chunk: Callable[[int], None] | None = None) -> int:
    """``hash_range`` with ``preadv`` into one reused buffer: an I/O error raises OSError."""
    buf = bytearray(WINDOW)
    mv = memoryview(buf)
    while pos < end:
        n = os.preadv(fd, [mv[:min(WINDOW, end - pos)]], pos)
        if n <= 0:
            return pos
        for h in hashers:
            h.update(mv[:n])
        if on_chunk is not None:
            on_chunk(n)
        pos += n
    return pos


def hash_file(path: Path, hashers: Sequence[Hasher], on_chunk: Callable[[int], None] | None = None) -> int:
    """Feed a file's bytes to each hasher in order, read once (``read_range``: ``WINDOW`` blocks into one reused
    buffer, on which hashlib releases the GIL); returns how many bytes were read."""
    with open(path, "rb", buffering=0) as f:
        return read_range(f.fileno(), 0, os.fstat(f.fileno()).st_size, hashers, on_chunk)


def sha256_file(path: Path, progress: Any = None) -> str:
    """sha256 of a file (``hash_file``); ``progress.advance(n)`` is called per block when given."""
    h = hashlib.sha256()
    hash_file(path, [h], progress.advance if progress else None)
    return h.hexdigest()
