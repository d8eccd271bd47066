"""Hashing a file's bytes straight from the page cache.

``hashlib`` reads a memory-mapped window of the file in place, so the bytes are not copied into a buffer
first. On a 1.2 GB file that copy cost a quarter of the sha256 time (measured: 0.88-0.97 s with ``preadv``
into a reused 8 MiB buffer, 0.69-0.70 s from 8 MiB mmap windows, openssl 0.90 s). Each window is unmapped
before the next, so the resident set stays one window larger whatever the file size. A filesystem that
cannot mmap gets ``read_range`` (``preadv``) instead.

Only for files this process owns and checks the size of (a download's partial data): reading a mapping
past the end of the file, or through an I/O error, kills the process with SIGBUS instead of raising. Files
a user or another process may change (``verify``) go through ``read_range``.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Sequence
from typing import Protocol

__all__ = ["WINDOW", "Hasher", "git_blob_hasher", "git_blob_id", "hash_range", "read_range"]

WINDOW = 8 * 1024 * 1024


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> None: ...


def git_blob_hasher(size: int) -> hashlib._Hash:
    """A sha1 primed with git's blob header: fed the ``size`` bytes of a file, it gives the file's git blob id
    (what the Hub lists for a regular, non-LFS file)."""
    return hashlib.sha1(b"blob %d\0" % size)


def git_blob_id(data: bytes) -> str:
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
