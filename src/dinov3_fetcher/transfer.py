"""Bytes: a resumable, verified download of one file, over several Range connections when the server allows.

The partial data of a file lives in ``partial/<content hash>/`` (``data`` + ``progress.json``, the byte
ranges still missing). A fetcher *claims* that folder by renaming it to ``<hash>.<host>.<pid>``, so two
fetchers never write into the same file even where file locks silently fail; a claim whose process is gone
(killed) is adopted by the next run, which resumes it. Progress is recorded after every ``SAVE_EVERY`` bytes
written (and at least once a second), so a SIGKILL costs at most that plus one block per connection; it is
not fsynced (a SIGKILL keeps the page cache; after a power loss the sha256 check catches stale data).
The sha256 (and, for regular files, the git blob sha1) is computed by a thread that follows the contiguous
written prefix, so verification overlaps the transfer.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from . import env
from .errors import DiskSpaceError, FetcherError, FetchInterrupted, IntegrityError, NetworkError
from .hashing import WINDOW, git_blob_hasher, hash_range
from .http import Connection, HttpPool, Response, etag_value
from .progress import Progress
from .state import owner_gone, owner_tag

__all__ = ["FILES_AT_ONCE", "Settings", "Target", "Transfer"]

MiB = 1024 * 1024
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
SAVE_EVERY = 4 * MiB  # progress.json is rewritten after this many new bytes (all connections together)
PROGRESS_PAGE = 4096  # progress.json is padded to one page, so that it can be rewritten in place
WRITE_CHUNK = 32 * 1024  # bytes per pwrite (see _Job.write)
FILES_AT_ONCE = 2  # weight files downloaded together: one file's sha256 tail overlaps the next transfer




@dataclass(frozen=True)
class Settings:
    """Transfer knobs; each has an environment variable (see the README)."""

    connections: int = 8  # DINOV3_FETCHER_CONNECTIONS: Range connections per large file
    min_split: int = 16 * MiB  # never split a file into pieces smaller than this
    block: int = 1 * MiB  # read/write block
    timeout: float = 30.0  # DINOV3_FETCHER_TIMEOUT (or HF_HUB_DOWNLOAD_TIMEOUT): seconds without a byte
    retries: int = 5  # DINOV3_FETCHER_RETRIES: attempts in a row without progress
    backoff: float = 1.0  # DINOV3_FETCHER_BACKOFF: first wait, doubled per retry, capped at 8x

    @classmethod
    def from_env(cls) -> Settings:
        timeout = env.number("DINOV3_FETCHER_TIMEOUT", env.number("HF_HUB_DOWNLOAD_TIMEOUT", cls.timeout))
        return cls(
            connections=max(1, int(env.number("DINOV3_FETCHER_CONNECTIONS", cls.connections))),
            timeout=timeout,
            retries=max(0, int(env.number("DINOV3_FETCHER_RETRIES", cls.retries))),
            backoff=max(0.0, env.number("DINOV3_FETCHER_BACKOFF", cls.backoff)),
        )


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    size: int
    identity: str  # content address used to name the partial folder
    sha256: str | None = None  # expected sha256 (LFS files)
    git_oid: str | None = None  # expected git blob sha1 (regular files)


@dataclass
class Done:
    path: Path  # the verified data file, still inside the claimed partial folder
    sha256: str
    fetched: int  # bytes received over the network for this file
    resumed_from: int  # bytes already on disk when this run started


@dataclass
class _Segment:
    pos: int
    end: int
    busy: bool = False


class _Retry(Exception):
    def __init__(self, why: str, wait: float | None = None) -> None:
        super().__init__(why)
        self.wait = wait


def missing_bytes(folder: Path, size: int | None = None) -> int:
    """Bytes a partial folder still misses (huge when unreadable, or when it records another ``size``)."""
    try:
        data = json.loads((folder / "progress.json").read_bytes())
        if size is not None and data["size"] != size:
            return 1 << 62
        return sum(e - s for s, e in data["remaining"])
    except (OSError, ValueError, KeyError, TypeError):
        return 1 << 62


def _done_end(remaining: list[tuple[int, int]], size: int) -> int:
    """Where the last byte a progress record calls done ends: the data file must be at least this long."""
    end = size
    for s, e in sorted(remaining, reverse=True):
        if e < end:
            break  # a done gap between this range and the ones after it
        end = min(end, s)
    return end


def _abandoned(p: Path, identity: str) -> bool:
    """A claim folder whose owner is gone: a dead pid on this host, or no progress for 2 min elsewhere."""
    return owner_gone(p.name[len(identity) + 1:], p / "progress.json", 120)


def resumable(partial_root: Path, identity: str) -> list[Path]:
    """The partial folders of this content that a claim may take: ours, the public one, a gone fetcher's."""
    mine = f"{identity}.{owner_tag()}"
    return [p for p in (partial_root / identity, *partial_root.glob(f"{identity}.*"))
            if p.is_dir() and (p.name in (identity, mine) or _abandoned(p, identity))]


def abandoned_or_unclaimed(p: Path) -> bool:
    """Is this partial folder free to delete: unclaimed, or claimed by a process that is gone?"""
    identity = p.name.split(".", 1)[0]
    return p.name == identity or _abandoned(p, identity)


class _Job:
    """One file's download: segments, workers, hasher, progress record."""

    def __init__(self, transfer: Transfer, target: Target, folder: Path) -> None:
        self.t, self.target, self.folder = transfer, target, folder
        self.data_path = folder / "data"
        self.lock = threading.Condition()
        self.fetched = 0
        self.error: BaseException | None = None
        self.whole_file = False
        self.inflight: list[int] = []  # offsets of pwrites under way (the hasher stays below them)
        self.unsaved = 0  # bytes written since progress.json was last rewritten
        self.saved_at = time.monotonic()
        self.save_lock = threading.Lock()
        self.write_lock = threading.Lock()  # see write()
        self.progress_fd: int | None = None  # progress.json, open for in-place rewrites
        self.piece = 0  # with several connections: the size of the in-order pieces handed out (see take)
        size = target.size
        remaining = self._load_remaining()
        if remaining is None:
            remaining = [(0, size)] if size else []
        self.resumed_from = size - sum(e - s for s, e in remaining)
        self.segments: list[_Segment] = [_Segment(s, e) for s, e in remaining]
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self.fd = os.open(self.data_path, flags, 0o644)

    def _load_remaining(self) -> list[tuple[int, int]] | None:
        try:
            data = json.loads((self.folder / "progress.json").read_bytes())
            if data.get("identity") != self.target.identity or data.get("size") != self.target.size:
                return None
            ranges = sorted((int(s), int(e)) for s, e in data["remaining"])
            if not self.data_path.exists() or any(not 0 <= s < e <= self.target.size for s, e in ranges):
                return None
            if self.data_path.stat().st_size < _done_end(ranges, self.target.size):
                return None  # the data file lacks bytes its record calls done (truncated): start over
            return ranges
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, wait: bool = True) -> None:
        """Record the missing ranges in progress.json: one page of JSON padded with spaces.

        The first save writes it atomically (temp + rename); later ones rewrite the page in place with one
        pwrite, which a SIGKILL cannot tear and which, unlike a rename over a file (ext4's auto_da_alloc
        flush), never waits for the disk while the data file is being written back: renames took up to 30 ms
        at 600 MB/s, long enough to break the resume bound. A record that outgrows the page goes back to
        temp + rename. ``wait=False`` (a worker's periodic save) returns at once if another thread is saving.
        """
        if not self.save_lock.acquire(blocking=wait):
            return
        try:
            self._save()
        except OSError as exc:
            raise self.disk_full(exc) from None
        finally:
            self.save_lock.release()

    def _save(self) -> None:
        with self.lock:
            remaining = sorted([s.pos, s.end] for s in self.segments if s.pos < s.end)
            self.unsaved, self.saved_at = 0, time.monotonic()
        blob = json.dumps({"identity": self.target.identity, "size": self.target.size,
                           "remaining": remaining}).encode().ljust(PROGRESS_PAGE)
        if self.progress_fd is not None and len(blob) == PROGRESS_PAGE:
            os.pwrite(self.progress_fd, blob, 0)
            return
        path, tmp = self.folder / "progress.json", self.folder / "progress.json.tmp"
        with open(tmp, "wb") as f:
            f.write(blob)
        os.replace(tmp, path)
        if self.progress_fd is not None:
            os.close(self.progress_fd)
            self.progress_fd = None
        if len(blob) == PROGRESS_PAGE:
            self.progress_fd = os.open(path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))

    def frontier(self) -> int:
        """Every byte below this is on disk for good: the hasher may read it, nobody writes it again."""
        open_pos = [s.pos for s in self.segments if s.pos < s.end] + self.inflight
        return min(open_pos) if open_pos else self.target.size

    # -- work distribution --------------------------------------------------------------------------
    def take(self) -> _Segment | None:
        with self.lock:
            if self.error is not None or self.t.cancel.is_set():
                return None
            self.segments = [s for s in self.segments if s.busy or s.pos < s.end]
            idle = [s for s in self.segments if not s.busy and s.pos < s.end]
            if idle:
                seg = min(idle, key=lambda s: s.pos)
                if self.piece and seg.end - seg.pos >= self.piece * 3 // 2 and not self.whole_file:
                    # Hand the file out front to back, one piece at a time: the written prefix (which the
                    # hasher follows) then grows at the speed of all connections, not of the first one, so
                    # the sha256 is done moments after the last byte instead of one 7/8-file pass later.
                    rest = _Segment(seg.pos + self.piece, seg.end)
                    seg.end = rest.pos
                    self.segments.append(rest)
                seg.busy = True
                return seg
            if self.whole_file:
                return None
            busy = [s for s in self.segments if s.busy and s.end - s.pos >= 2 * self.t.settings.min_split]
            if not busy:
                return None
            victim = max(busy, key=lambda s: s.end - s.pos)
            mid = victim.pos + (victim.end - victim.pos) // 2
            seg = _Segment(mid, victim.end, busy=True)
            victim.end = mid
            self.segments.append(seg)
            return seg

    def worker(self) -> None:
        buf = bytearray(self.t.settings.block)
        try:
            while (seg := self.take()) is not None:
                try:
                    self.fetch_segment(seg, buf)
                finally:
                    with self.lock:
                        seg.busy = False
                        self.lock.notify_all()
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc
                self.lock.notify_all()

    def fetch_segment(self, seg: _Segment, buf: bytearray) -> None:
        failures, backoff = 0, self.t.settings.backoff
        while seg.pos < seg.end:
            if self.t.cancel.is_set() or self.error is not None:
                return
            start = seg.pos
            try:
                self.stream(seg, buf)
                if seg.pos >= seg.end or seg.pos > start:
                    continue  # done, or cut short by a split / a whole-file switch: the loop decides
                raise _Retry("the answer ended without progress")
            except _Retry as r:
                failures = 1 if seg.pos > start else failures + 1
                if failures > self.t.settings.retries:
                    raise NetworkError(
                        f"downloading {self.target.name} from {self.t.pool.display_host(self.target.url)} failed "
                        f"{failures} times in a row ({r})",
                        "check the link to HF_ENDPOINT, then run the same command again: it resumes from the "
                        f"{seg_done(self)} bytes already on disk",
                    ) from None
                time.sleep(r.wait if r.wait is not None else backoff)
                backoff = min(backoff * 2, self.t.settings.backoff * 8)

    def stream(self, seg: _Segment, buf: bytearray) -> None:
        size = self.target.size
        headers = {} if (seg.pos == 0 and seg.end == size) else {"Range": f"bytes={seg.pos}-{seg.end - 1}"}
        try:
            url, conn, resp = self.t.open(self.target, headers)
        except (TimeoutError, OSError, http.client.HTTPException) as exc:  # refused, DNS, TLS, no headers
            if isinstance(exc, FetcherError):
                raise
            where = "".join(f" ({n})" for n in getattr(exc, "__notes__", ()))
            raise _Retry(f"{type(exc).__name__}: {exc}{where}") from None
        try:
            self.check_response(resp, seg, headers)
            offset = seg.pos if resp.status == 206 else 0
            if resp.status == 200 and headers and not self.become_whole_file(seg):
                return
            self.copy(resp, seg, buf, offset)
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            if isinstance(exc, FetcherError):  # our own errors are final (some are OSErrors too)
                raise
            raise _Retry(f"{type(exc).__name__}: {exc}") from None
        finally:
            self.t.pool.finish(url, conn, resp)

    def check_response(self, resp: Response, seg: _Segment, headers: dict[str, str]) -> None:
        if resp.status in (200, 206):
            etag = etag_value(resp.getheader("ETag"))
            want = self.target.sha256
            if want and len(etag) == 64 and etag != want:
                self.fail_integrity(f"the server sent a different file (ETag {etag[:12]}..., expected {want[:12]}...)")
            if resp.status == 206:
                cr = resp.getheader("Content-Range") or ""
                if not cr.startswith(f"bytes {seg.pos}-"):
                    raise _Retry(f"unexpected Content-Range {cr!r}")
            return
        body = resp.read(64 * 1024) if resp.status < 500 else b""
        if resp.status == 416:
            raise _Retry("range not satisfiable")
        if resp.status in _RETRYABLE_STATUS:
            raise _Retry(f"HTTP {resp.status}", _retry_after(resp))
        if resp.status == 403 and self.t.forget_location(self.target):
            raise _Retry("HTTP 403 from a signed URL (expired?)", 0)
        self.t.raise_status(resp.status, dict(resp.getheaders()), body, self.target.url)

    def become_whole_file(self, seg: _Segment) -> bool:
        """The server ignored Range: this worker restreams the whole file, every other piece is dropped.

        The restream resumes at the frontier: bytes below it are on disk (and maybe hashed already) and are
        read past, never rewritten, or a mirror's different bytes there would be published unverified.
        True for the worker that owns the restream (also on its retries), False for any other.
        """
        with self.lock:
            if self.whole_file:
                return self.segments == [seg]
            self.whole_file = True
            start = self.frontier()
            for s in self.segments:
                if s is not seg:
                    s.end = s.pos
            seg.pos, seg.end = start, self.target.size
            self.segments = [seg]
            self.lock.notify_all()
            return True

    def copy(self, resp: Response, seg: _Segment, buf: bytearray, offset: int) -> None:
        mv = memoryview(buf)
        while True:
            with self.lock:
                want = min(len(buf), seg.end - offset)
            if want <= 0:
                if offset == self.target.size and resp.read(1):
                    self.fail_integrity(f"the server sent more than the {self.target.size} bytes the Hub listed")
                return
            if self.t.cancel.is_set() or self.error is not None:
                return
            n = resp.readinto(mv[:want])
            if not n:
                raise _Retry(f"connection closed at byte {offset} of {self.target.size}")
            with self.lock:
                if self.t.cancel.is_set() or self.error is not None:
                    return  # stopped while this read was under way: the folder may be someone else's by now
                # Write only [seg.pos, seg.end): a whole-file restream reads past what is on disk, and a
                # piece split off (or dropped by a whole-file switch) while this read was under way is
                # another worker's now. The write is registered so that the hasher waits for it.
                lo, hi = max(offset, seg.pos), min(offset + n, seg.end)
                if hi > lo:
                    self.inflight.append(lo)
            if hi > lo:
                try:
                    self.write(mv[lo - offset:hi - offset], lo)
                finally:
                    with self.lock:
                        self.inflight.remove(lo)
            offset += n
            with self.lock:
                self.fetched += n
                if hi > seg.pos:
                    self.unsaved += hi - seg.pos
                    seg.pos = hi
                due = self.unsaved >= SAVE_EVERY or time.monotonic() - self.saved_at >= 1.0
                self.lock.notify_all()
            self.t.progress.advance(max(hi - lo, 0))
            if due:
                self.save(wait=False)

    def write(self, data: memoryview, offset: int) -> None:
        """pwrite all of ``data``, one connection at a time, ``WRITE_CHUNK`` bytes per call.

        One at a time: the kernel serializes buffered writes to one file anyway (the inode lock), but its
        waiters spin on that lock while the owner copies, and with 8 connections on 2 cores the spinning ate
        the CPU the copy needed. Here a waiting thread sleeps instead. Cold 1.2 GB fetch, 8 alternating
        rounds: median 2.46 s (sys time up to 3.3 s) without this lock, 1.72 s with it, curl 2.05 s.

        In small pieces: the page cache sizes its folios by the write, and a 1 MiB write takes order-8 folios
        straight from the buddy allocator, where a VM that hands free memory back to its host (virtio-balloon
        free page reporting, as on this machine) makes the first touch of each page slow. Measured after a
        curl run had freed 1.2 GB: sharded fetch 2.67-3.55 s with 1 MiB writes (sys 2.6-3.9 s), 1.80-1.95 s
        with 32 KiB (sys ~1.25 s; curl writes 16 KiB), 2.05-2.66 s with 16 KiB (more calls).
        """
        with self.write_lock:
            while data:
                try:
                    written = os.pwrite(self.fd, data[:WRITE_CHUNK], offset)
                except OSError as exc:
                    raise self.disk_full(exc) from None
                data, offset = data[written:], offset + written

    def disk_full(self, exc: OSError) -> OSError:
        """ENOSPC/EDQUOT as our DiskSpaceError (exit 9, partial kept); any other OSError as it is."""
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return exc
        free = shutil.disk_usage(self.folder).free
        return DiskSpaceError(f"the disk filled up while writing {self.target.name} ({free} bytes free)",
                              f"free space in {self.t.dino_root} and run again: the download resumes", free=free)

    def fail_integrity(self, why: str) -> NoReturn:
        raise IntegrityError(f"{self.target.name}: {why}; the file was discarded",
                             "run again to re-download it; if it repeats, HF_ENDPOINT serves corrupt data")

    # -- verification -------------------------------------------------------------------------------
    def hash_all(self) -> str:
        """Hash the file in order, following the written prefix; returns the sha256 once all is verified."""
        size = self.target.size
        sha = hashlib.sha256()
        git = git_blob_hasher(size) if self.target.git_oid else None
        hashers = [sha] if git is None else [sha, git]
        pos = 0
        while pos < size:
            with self.lock:
                while (limit := self.frontier()) <= pos and self.error is None and not self.t.cancel.is_set():
                    self.lock.wait(0.5)
                if self.error is not None or self.t.cancel.is_set():
                    return ""
            reached = hash_range(self.fd, pos, min(limit, pos + WINDOW), hashers)
            if reached == pos:  # the data file is shorter than its progress record: it cannot be trusted
                self.fail_integrity(f"the partial data ends at byte {pos}, before what its progress record says")
            pos = reached
        digest = sha.hexdigest()
        if self.target.sha256 and digest != self.target.sha256:
            self.fail_integrity(f"sha256 {digest[:12]}... does not match the Hub's {self.target.sha256[:12]}...")
        if git is not None and git.hexdigest() != self.target.git_oid:
            self.fail_integrity(f"git blob id {git.hexdigest()[:12]}... does not match the Hub's "
                                f"{(self.target.git_oid or '')[:12]}...")
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        return digest


@dataclass
class Transfer:
    """Downloads files into dino_root's partial folder; one instance per fetch."""

    settings: Settings
    pool: HttpPool
    partial_root: Path
    dino_root: Path
    progress: Progress
    raise_status: Callable[[int, dict[str, str], bytes, str], NoReturn]
    cancel: threading.Event = field(default_factory=threading.Event)
    _locations: dict[str, str] = field(default_factory=dict)

    def open(self, target: Target, headers: dict[str, str]) -> tuple[str, Connection, Response]:
        url = self._locations.get(target.url, target.url)
        final, conn, resp = self.pool.get(url, headers)
        if final != url:
            self._locations[target.url] = final
        return final, conn, resp

    def forget_location(self, target: Target) -> bool:
        return self._locations.pop(target.url, None) is not None

    def claim(self, identity: str) -> Path:
        """Take the best resumable partial folder for this content, or start an empty one."""
        mine = self.partial_root / f"{identity}.{owner_tag()}"
        if mine.is_dir():
            return mine
        adopted = False
        for c in sorted(resumable(self.partial_root, identity), key=missing_bytes):
            try:
                if not adopted:
                    os.rename(c, mine)
                    adopted = True
                else:
                    trash = c.with_name(f"{c.name}.trash{os.getpid()}")
                    os.rename(c, trash)
                    shutil.rmtree(trash, ignore_errors=True)
            except OSError:
                continue
        mine.mkdir(parents=True, exist_ok=True)
        return mine

    def release(self, folder: Path, identity: str) -> None:
        """Hand a partial folder back under its public name so that any later run may resume it."""
        with contextlib.suppress(OSError):
            os.rename(folder, self.partial_root / identity)

    def download(self, target: Target) -> Done:
        """Fetch ``target`` (resuming what is on disk) and verify it.

        Raises:
            IntegrityError: size or hash mismatch (the partial data is deleted).
            NetworkError: the retries ran out (the partial data is kept).
            DiskSpaceError: the disk filled up (the partial data is kept).
            FetchInterrupted: Ctrl-C / SIGTERM (the partial data is kept).
        """
        folder = self.claim(target.identity)
        job = _Job(self, target, folder)
        keep, orphans = True, False
        try:
            self.progress.start_file(target.name, target.size, job.resumed_from)
            n_workers = min(self.settings.connections, max(1, target.size // self.settings.min_split))
            job.piece = self.settings.min_split if n_workers > 1 else 0
            workers = [threading.Thread(target=job.worker, daemon=True, name=f"fetch-{i}") for i in range(n_workers)]
            if job.segments:
                for w in workers:
                    w.start()
            try:
                digest = job.hash_all()
            except BaseException as exc:
                with job.lock:
                    job.error = job.error or exc
                    job.lock.notify_all()
                raise
            finally:
                # On an error or Ctrl-C, a worker stuck in a stalled read must not hold up the exit for the
                # whole read timeout: give the workers 2 s, then leave them (daemon threads) and their fds open.
                deadline = time.monotonic() + 2.0
                for w in workers:
                    while w.is_alive() and ((job.error is None and not self.cancel.is_set())
                                            or time.monotonic() < deadline):
                        w.join(0.2)
                orphans = any(w.is_alive() for w in workers)
            if job.error is not None:
                raise job.error
            if self.cancel.is_set():
                raise FetchInterrupted("interrupted", "run the same command again: it resumes")
            self.progress.end_file(target.name)
            return Done(job.data_path, digest, job.fetched, job.resumed_from)
        except IntegrityError:
            keep = False
            raise
        except KeyboardInterrupt:
            self.cancel.set()
            raise
        finally:
            if not orphans:
                os.close(job.fd)
            if keep:
                job.save()
                if sys.exc_info()[0] is not None:
                    self.release(folder, target.identity)
            else:
                shutil.rmtree(folder, ignore_errors=True)
            if job.progress_fd is not None and not orphans:
                os.close(job.progress_fd)

    def finish(self, done: Done, dest: Path) -> None:
        """Move a verified file to ``dest`` and drop its (now empty) partial folder."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(done.path, dest)
        shutil.rmtree(done.path.parent, ignore_errors=True)


def seg_done(job: _Job) -> int:
    with job.lock:
        return job.target.size - sum(s.end - s.pos for s in job.segments if s.pos < s.end)


def _retry_after(resp: Response) -> float | None:
    value = resp.getheader("Retry-After")
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), 120.0)
    except ValueError:
        return None
