"""The state folder's files: atomic writes, and the partial-download format (``data`` + ``progress.json``)."""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
from pathlib import Path

PROGRESS_PAGE = 4096  # progress.json is padded to one page, so that it can be rewritten in place


def atomic_write_bytes(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Write ``data`` to ``path``, in a folder that exists, so that readers see the old content or the new one,
    never a mix. ``sync``: the bytes are on the disk before the name points at them; without, a crash may lose
    the new content (for a note that costs only time when lost)."""
    # Not mkstemp: its 0600 would ignore the umask (a trainer running as another user could not read the file).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sync_file(path: Path) -> None:
    """Flush ``path``'s bytes (and size) to the disk, through a read-only descriptor (a link is not followed)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    """Flush ``path``'s entries (names created, renamed in or out, removed) to the disk. A filesystem that cannot
    sync a folder (EINVAL, ENOTSUP: some network and FUSE filesystems) has nothing more to offer: not an error."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def write_new(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file of ours (mode per the umask): whatever was there, a planted link included,
    is unlinked first, never written through."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


# -- the partial-download format -------------------------------------------------------------------------------
def encode_progress(identity: str, size: int, remaining: list[list[int]]) -> bytes:
    """A progress record: the byte ranges still missing, as one page of JSON padded with spaces (or longer)."""
    return json.dumps({"identity": identity, "size": size, "remaining": remaining}).encode().ljust(PROGRESS_PAGE)


def read_progress(folder: Path, identity: str, size: int) -> list[tuple[int, int]] | None:
    """The ranges a partial folder still misses, or None when it cannot be resumed: no or another record,
    ranges out of bounds, or a data file shorter than the bytes its record calls done (truncated)."""
    try:
        data = json.loads((folder / "progress.json").read_bytes())
        if data.get("identity") != identity or data.get("size") != size:
            return None
        ranges = sorted((int(s), int(e)) for s, e in data["remaining"])
        if any(not 0 <= s < e <= size for s, e in ranges):
            return None
        if (folder / "data").stat().st_size < _done_end(ranges, size):
            return None
        return ranges
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def copy_partial(src: Path, dst: Path, identity: str, size: int) -> bool:
    """Copy another host's partial download (the ranges its record calls done) into a fresh folder ``dst``;
    False if it cannot be resumed. Its record is read before its data: what it calls done is on disk."""
    ranges = read_progress(src, identity, size)
    if ranges is None:
        return False
    tmp = dst.with_name(f"{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fd = os.open(src / "data", os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fin, open(tmp / "data", "xb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        write_new(tmp / "progress.json", encode_progress(identity, size, [list(r) for r in ranges]))
        os.rename(tmp, dst)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def own_entries(folder: Path) -> Path:
    """A claimed partial folder whose files are ours: a link planted in it is removed (never written
    through), and with a linked data file its progress record is dropped too (it no longer describes it)."""
    if (folder / "heartbeat").is_symlink():
        (folder / "heartbeat").unlink()
    if (folder / "data").is_symlink():
        (folder / "data").unlink()
        (folder / "progress.json").unlink(missing_ok=True)
    for name in ("progress.json", "progress.json.tmp"):
        if (folder / name).is_symlink():
            (folder / name).unlink()
    return folder


def _done_end(remaining: list[tuple[int, int]], size: int) -> int:
    """Where the last byte a progress record calls done ends: the data file must be at least this long."""
    end = size
    for s, e in sorted(remaining, reverse=True):
        if e < end:
            break  # a done gap between this range and the ones after it
        end = min(end, s)
    return end


def remaining(folder: Path, identity: str, size: int) -> list[tuple[int, int]]:
    """The ranges a partial folder still misses: its record's, else the whole file."""
    ranges = read_progress(folder, identity, size)
    return ranges if ranges is not None else ([(0, size)] if size else [])


def missing_bytes(folder: Path, identity: str, size: int) -> int:
    """Bytes of the file a partial folder still misses."""
    return sum(e - s for s, e in remaining(folder, identity, size))


_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def open_data(folder: Path) -> int:
    """A partial folder's ``data``, for reading and writing: created per the umask (0o666, as every other file),
    never through a planted link."""
    return os.open(folder / "data", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _O_CLOEXEC, 0o666)


def save_progress(folder: Path, identity: str, size: int, ranges: list[list[int]], fd: int | None) -> int | None:
    """Record the missing ``ranges`` in ``progress.json``. With ``fd`` (what the previous call returned) the one
    page is rewritten in place with one pwrite, which a SIGKILL cannot tear, which never waits for the disk as
    a rename over a file can, and which needs no new block on a full disk; else a new file is renamed over.
    Returns the fd for the next call (None when the record is longer than a page)."""
    blob = encode_progress(identity, size, ranges)
    if fd is not None and len(blob) == PROGRESS_PAGE:
        os.pwrite(fd, blob, 0)
        return fd
    path, tmp = folder / "progress.json", folder / "progress.json.tmp"
    write_new(tmp, blob)
    os.replace(tmp, path)
    if fd is not None:
        os.close(fd)
    return os.open(path, os.O_WRONLY | os.O_NOFOLLOW | _O_CLOEXEC) if len(blob) == PROGRESS_PAGE else None
