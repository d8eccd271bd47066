"""One file's download: the pieces still missing, the workers that fetch them, and the hasher that follows.

Workers take pieces front to back, each over its own pooled connection and while it holds a slot of the
fetch's stream budget (_budget: how many streams run, and how long a piece is); the ranges still missing are
recorded after every ``SAVE_EVERY`` bytes written (and at least once a second), so a SIGKILL costs at most
that plus one block per connection. A thread follows the contiguous written prefix with sha256 (and the git
blob sha1 for small files), so verification ends moments after the last byte. Why each number is what it
is: BENCHMARKS.md ("Why the transfer looks as it does").
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from ._errors import ConfigError, IntegrityError, NetworkError, disk_error
from ._hashing import WINDOW, git_blob_hasher, hash_range
from ._http import Answer, HttpPool, Redirects, RequestError, etag_value, is_part
from ._net import refusal
from ._retry import RetryPolicy, TryAgain
from ._state import on_disk, open_data, remaining, save_progress

if TYPE_CHECKING:
    from ._budget import Budget, Slot
    from ._progress import Progress

__all__ = ["SAVE_EVERY", "WRITE_CHUNK", "FetchContext", "Job", "Target"]

MiB = 1024 * 1024
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}
SAVE_EVERY = 4 * MiB  # progress.json is rewritten after this many new bytes (all connections together)
WRITE_CHUNK = 32 * 1024  # bytes per pwrite (see Job.write)
STEAL_MIN = 1 * MiB  # the smallest half of a busy piece an idle stream takes over at a file's end
RESOLVED_PIECES = 8  # where every request is a resolve (see next_segment): pieces this many times the usual
SYNC_EVERY = 16 * MiB  # hashed bytes between two writebacks of a file while it downloads (see hash_all)


@dataclass(frozen=True)
class Target:
    """A file to download: where, its size, and the hashes its bytes must have."""

    name: str
    url: str
    size: int
    identity: str  # content address used to name the partial folder
    sha256: str | None = None  # expected sha256 (LFS files)
    git_oid: str | None = None  # expected git blob sha1 (regular files)


class Stop(threading.Event):
    """A fetch's cancel: once set, every download stops. ``set`` also wakes each download under way (its hasher
    waits on the job's lock) and ends its body reads (``Job.cut_reads``), so that no stop waits for a poll or for
    a stalled server's next byte."""

    def __init__(self) -> None:
        super().__init__()
        self._jobs: set[Job] = set()
        self._guard = threading.Lock()

    def watch(self, job: Job) -> None:
        """Stop ``job`` too when set (at once, when it is set already)."""
        with self._guard:
            self._jobs.add(job)
        if self.is_set():
            job.cut_reads()

    def forget(self, job: Job) -> None:
        with self._guard:
            self._jobs.discard(job)

    def set(self) -> None:
        super().set()
        with self._guard:
            jobs = list(self._jobs)
        for job in jobs:
            job.cut_reads()


@dataclass(frozen=True)
class FetchContext:
    """What one file's download needs from the fetch it belongs to, shared by all its files' downloads."""

    pool: HttpPool
    redirects: Redirects  # where each file's URL redirects, remembered
    budget: Budget  # the fetch's streams, and the size of a piece
    progress: Progress
    cancel: Stop  # set: every download stops at once
    retry: RetryPolicy
    min_split: int  # never split a file into pieces smaller than this
    endpoint_var: str  # the variable that points at the source, named in error hints
    raise_status: Callable[[int, dict[str, str], bytes, str], NoReturn]  # the source's reading of a failed answer
    root: Path  # dino_root, named in the disk-full hint


@dataclass
class _Segment:
    pos: int
    end: int
    busy: bool = False


class Job:
    """One file's download: segments, workers, hasher, progress record."""

    def __init__(self, fetch: FetchContext, target: Target, folder: Path) -> None:
        self.fetch, self.target, self.folder = fetch, target, folder
        self.data_path = folder / "data"
        self.lock = threading.Condition()
        self.fetched = 0
        self.error: BaseException | None = None
        self.whole_file = False
        self.no_ranges = False  # the server refuses ranged requests from a fresh URL: the whole file, no Range
        self.inflight: list[int] = []  # offsets of pwrites under way (the hasher stays below them)
        self.reading: set[Answer] = set()  # the answers the workers read now (``cut_reads``)
        self.unsaved = 0  # bytes written since progress.json was last rewritten
        self.saved_at = time.monotonic()
        self.save_lock = threading.Lock()
        self.write_lock = threading.Lock()  # see write()
        self.progress_fd: int | None = None  # progress.json, open for in-place rewrites
        self.piece_size = 0  # with several connections: the size of the in-order pieces (see next_segment)
        self.streams = 1  # the most streams the file may have at once (its workers)
        self.hashed = 0  # [0, hashed) is on disk for good and hashed (hash_all): what a broadcast may send
        self.ticket = fetch.budget.ticket()  # its place in line for the fetch's streams (Budget.acquire)
        missing = remaining(folder, target.identity, target.size)
        self.resumed_from = target.size - sum(e - s for s, e in missing)
        self.segments: list[_Segment] = [_Segment(s, e) for s, e in missing]
        with on_disk(fetch.root):
            self.fd = open_data(folder)

    def save(self, wait: bool = True) -> None:
        """Record the missing ranges in progress.json: the first time atomically (temp + rename), then by
        rewriting its one page in place with one pwrite, which a SIGKILL cannot tear and which never waits for
        the disk as a rename over a file can (BENCHMARKS.md). ``wait=False`` (a worker's periodic save)
        returns at once if another thread is saving."""
        if not self.save_lock.acquire(blocking=wait):
            return
        try:
            self._save()
        except OSError as exc:
            raise self.disk_error(exc) from None
        finally:
            self.save_lock.release()

    def _save(self) -> None:
        with self.lock:
            ranges = sorted([s.pos, s.end] for s in self.segments if s.pos < s.end)
            self.unsaved, self.saved_at = 0, time.monotonic()
        self.progress_fd = save_progress(self.folder, self.target.identity, self.target.size, ranges,
                                         self.progress_fd)

    def on_disk(self) -> int:
        """Bytes of the file already on disk."""
        with self.lock:
            return self.target.size - sum(s.end - s.pos for s in self.segments if s.pos < s.end)

    def frontier(self) -> int:
        """Every byte below this is on disk for good: the hasher may read it, nobody writes it again."""
        open_pos = [s.pos for s in self.segments if s.pos < s.end] + self.inflight
        return min(open_pos) if open_pos else self.target.size

    # -- work distribution --------------------------------------------------------------------------
    def next_segment(self) -> _Segment | None:
        """The next piece for a worker: the first idle range, or half of the largest busy one; None when done."""
        with self.lock:
            if self.error is not None or self.fetch.cancel.is_set():
                return None
            self.segments = [s for s in self.segments if s.busy or s.pos < s.end]
            idle = [s for s in self.segments if not s.busy and s.pos < s.end]
            if idle:
                seg = min(idle, key=lambda s: s.pos)
                piece = self.piece() if self.piece_size else 0
                under_way = [s.end - s.pos for s in self.segments if s.busy]
                streams = 1 + len(under_way)
                if not self.fetch.redirects.per_request(self.target.url):  # there each piece is a resolve: fewer
                    streams = max(streams, min(self.streams, self.fetch.budget.limit))
                share = -(-(sum(s.end - s.pos for s in idle) + sum(under_way)) // streams)
                if piece and share < piece:
                    # The file's end: a piece no bigger than each of its streams' share of all that is left
                    # (handed out or not), so that they end about together instead of the last pieces splitting
                    # busy ones (a split closes the busy stream's connection, and what the server had sent past
                    # the split is served twice). Its streams: those busy and this one, or as many as it may
                    # have, if more (a file that starts while others take most streams gets theirs as they
                    # end: pieces sized for its first few streams would still run when the rest is done).
                    # While another file waits for streams, the shares are spread as pieces are (Budget.piece):
                    # this file's streams then end at different times, each going on to the next file, instead
                    # of all idling the same round trip; the fetch's last bytes are shared out exactly.
                    if not self.fetch.budget.alone(self.ticket):
                        share = int(share * self.fetch.budget.spread())
                    piece = max(self.steal_min(), share)
                if piece and seg.end - seg.pos >= piece * 3 // 2 and not self.whole_file:
                    # Hand the file out front to back, one piece at a time: the written prefix (which the
                    # hasher follows) then grows at the speed of all connections, not of the first one, so
                    # the sha256 is done moments after the last byte instead of one 7/8-file pass later.
                    # A piece lasts a few dozen round trips (Budget.piece): the round trip a connection
                    # idles between two pieces is a small part of it.
                    rest = _Segment(seg.pos + piece, seg.end)
                    seg.end = rest.pos
                    self.segments.append(rest)
                seg.busy = True
                return seg
            if self.whole_file:
                return None
            busy = self.splittable()
            if not busy:
                return None
            victim = max(busy, key=lambda s: s.end - s.pos)
            mid = victim.pos + (victim.end - victim.pos) // 2
            seg = _Segment(mid, victim.end, busy=True)
            victim.end = mid
            self.segments.append(seg)
            return seg

    def has_work(self) -> bool:
        """Would ``next_segment`` hand out a piece now (without taking it)?"""
        with self.lock:
            if self.error is not None or self.fetch.cancel.is_set():
                return False
            if any(not s.busy and s.pos < s.end for s in self.segments):
                return True
            return not self.whole_file and bool(self.splittable())

    def splittable(self) -> list[_Segment]:
        """The busy pieces an idle stream may take the second half of (under the lock): where a split can save
        time (``Budget.split_cost``), halves worth a steal (``steal_min``) that reach beyond what the busy
        stream's server may already have sent past its reads. The busy stream reads on up to the split and
        closes its connection there, and what was sent beyond is served twice: on a link where a piece lasts
        tens of milliseconds and the socket buffers hold megabytes, a split of a 16 MiB piece saved nothing and
        served most of its second half twice; on a far link (8 MB/s per connection, 150 ms) a split still
        shares out seconds of one stream, so that the streams end together."""
        cost = self.fetch.budget.split_cost()
        if cost is None:
            return []
        least = max(self.steal_min(), cost)
        return [s for s in self.segments if s.busy and (s.end - s.pos) // 2 >= least]

    def piece(self) -> int:
        """The size of the next piece (``Budget.piece``). Where every request of the file is resolved afresh
        (signatures bound to one request or one range: the Xet bridge), each piece is a ``resolve`` the Hub
        counts against the address's rate limit (3,000 per 5 minutes anonymous, 5,000 with an account): pieces
        ``RESOLVED_PIECES`` times longer, so that 8 nodes fetching a 7B at once behind one address stay within
        the limit (BENCHMARKS.md)."""
        if self.fetch.redirects.per_request(self.target.url):
            n = RESOLVED_PIECES
            return self.fetch.budget.piece(n * self.piece_size, 2 * n * self.piece_size, rtts_times=n)
        return self.fetch.budget.piece(self.piece_size, 4 * self.piece_size)

    def steal_min(self) -> int:
        """A busy piece is split in two when each half is at least this (see Budget.steal); where every request
        is a resolve, the smallest piece the file is cut into."""
        if self.fetch.redirects.per_request(self.target.url):
            return self.fetch.min_split
        return self.fetch.budget.steal(STEAL_MIN, self.fetch.min_split, self.ticket)

    def worker(self) -> None:
        """A stream's loop: a slot of the fetch's budget, then pieces over it until there is none (or the budget
        shrank); the first error stops the job. A file of one read (config, preprocessor, index, README) is one
        short request beside the streams: it takes no slot, or it would wait for the weights' streams to end."""
        budget = self.fetch.budget
        try:
            if self.target.size <= budget.block:
                self._pieces(budget.aside(self.target.size))
                return
            while (slot := budget.acquire(lambda: not self.has_work(), self.ticket)) is not None:
                self._pieces(slot)
        except BaseException as exc:
            with self.lock:
                if self.error is None:
                    self.error = exc
                self.lock.notify_all()

    def _pieces(self, slot: Slot) -> None:
        """Pieces over ``slot`` until there is none, or the budget sheds it; then the slot goes back."""
        try:
            while not slot.shed() and (seg := self.next_segment()) is not None:
                try:
                    self.fetch_segment(seg, slot)
                finally:
                    with self.lock:
                        seg.busy = False
                        self.lock.notify_all()
        finally:
            slot.release()

    def fetch_segment(self, seg: _Segment, slot: Slot) -> None:
        """Fetch one piece, retrying with backoff while attempts in a row make no progress. A stream the budget
        sheds ends after its piece (``worker``), not in the middle of it: the bytes the server had already sent
        on a connection closed mid-answer (its socket buffers, what was in flight: megabytes each on a fast
        link) would be served twice."""
        tries = self.fetch.retry.tries()
        while seg.pos < seg.end:
            if self.fetch.cancel.is_set() or self.error is not None:
                return
            start = seg.pos
            try:
                self.stream(seg, slot)
                if seg.pos >= seg.end or seg.pos > start:
                    continue  # done, or cut short by a split / a whole-file switch: the loop decides
                raise TryAgain("the answer ended without progress")
            except TryAgain as r:
                if self.fetch.cancel.is_set() or self.error is not None:
                    return  # stopped (a cancel, another stream's error; ``cut_reads``): no failure of this piece
                if not tries.failed(wait=r.wait, progressed=seg.pos > start):
                    raise NetworkError(
                        f"downloading {self.target.name} from {self.fetch.pool.display_host(self.target.url)} failed "
                        f"{tries.failures} times in a row ({r})",
                        f"check the link to {self.fetch.endpoint_var}, then run the same command again: it resumes "
                        f"from the {self.on_disk()} bytes already on disk",
                    ) from None

    def stream(self, seg: _Segment, slot: Slot) -> None:
        """One GET of the piece (a Range request unless it is the whole file), copied to disk."""
        size = self.target.size
        whole = (seg.pos == 0 and seg.end == size) or self.no_ranges
        headers = {} if whole else {"Range": f"bytes={seg.pos}-{seg.end - 1}"}
        try:
            answer = self.fetch.redirects.get(self.fetch.pool, self.target.url, headers)
        except RequestError as exc:  # refused, DNS, TLS, no headers
            raise TryAgain(str(exc)) from None
        with self.lock:
            self.reading.add(answer)
            stopped = self.fetch.cancel.is_set() or self.error is not None  # ``cut_reads`` may have run already
        try:
            if stopped:
                return
            self.fetch.budget.first_byte(answer.seconds_per_trip())
            self.check_response(answer, seg, headers)
            resp = answer.resp
            ranged = is_part(resp, self.target.size)
            offset = seg.pos if ranged else 0
            if not ranged and headers and not self.become_whole_file(seg):
                return
            self.copy(answer, seg, slot, offset)
        except RequestError as exc:  # the connection failed while the body was read
            raise TryAgain(str(exc)) from None
        finally:
            with self.lock:
                self.reading.discard(answer)
            self.fetch.pool.finish(answer)

    def cut_reads(self) -> None:
        """The job is stopping (an error, a cancel): end every body read under way now, so that no worker waits
        for a stalled server to send its next byte (or for the read timeout), and wake the hasher. A request still
        waiting for its answer's headers is not cut: ``Transfer.download`` gives it 2 s, then leaves it."""
        with self.lock:
            for answer in self.reading:
                answer.cut()
            self.lock.notify_all()

    def check_response(self, answer: Answer, seg: _Segment, headers: dict[str, str]) -> None:
        """Raise what a non-200/206 answer means: a retry (429, 5xx, an expired signed URL) or the source's error."""
        resp = answer.resp
        if resp.status in (200, 206):
            etag = etag_value(resp.getheader("ETag"))
            want = self.target.sha256
            # Only the endpoint's own answer says its ETag is the sha256; a redirect target's is opaque (the Xet
            # bridge sends its Xet hash there): the sha256 computed from the bytes decides.
            if want and len(etag) == 64 and etag != want and answer.url == self.target.url:
                self.fail_integrity(f"the server sent a different file (ETag {etag[:12]}..., expected {want[:12]}...)")
            if is_part(resp, self.target.size):  # a 206, or a 200 that says which range it is (ModelScope's storage)
                cr = resp.getheader("Content-Range") or ""
                self.check_total(cr.rpartition("/")[2])
                if not cr.startswith(f"bytes {seg.pos}-"):
                    raise TryAgain(f"unexpected Content-Range {cr!r}")
            elif resp.status == 200 and not resp.chunked:
                self.check_total(resp.getheader("Content-Length") or "")
            return
        body = answer.read(64 * 1024) if resp.status < 500 else b""
        if resp.status == 416:
            self.check_total((resp.getheader("Content-Range") or "").rpartition("/")[2])
        # A remembered location refused: stale (expired, or signed for another range), whichever stream is the
        # first to say so; every stream that used it retries through a fresh resolve, none concludes "no ranges".
        if resp.status in (403, 416) and (self.fetch.redirects.forget(self.target.url) or answer.remembered):
            raise TryAgain(f"HTTP {resp.status} from a signed URL used again (expired, or bound to another range)", 0)
        if resp.status in (403, 416) and headers:
            # A fresh location refuses this range (a CDN that takes no ranged requests): one connection streams
            # the whole file, reading past what is on disk. A genuine refusal comes back without a Range too.
            if self.become_whole_file(seg):
                self.no_ranges = True
                raise TryAgain(f"HTTP {resp.status} for a ranged request: the whole file on one connection", 0)
            raise TryAgain("another connection restreams the whole file", 0)
        if resp.status in _RETRYABLE_STATUS:
            raise TryAgain(f"HTTP {resp.status}", self.fetch.retry.retry_after(resp.getheader("Retry-After")))
        if (refused := refusal(resp.status, answer.url, self.target.url, body, self.target.name)) is not None:
            raise refused  # a proxy's 407, or the storage host's refusal of a signed link: not the source's answer
        self.fetch.raise_status(resp.status, dict(resp.getheaders()), body, self.target.url)

    def check_total(self, total: str) -> None:
        """The server's size of the whole file (from Content-Range or a full answer's Content-Length) must be the
        listed one: a listing that promises more (or less) than the server has is an integrity error, not a
        network error to retry forever."""
        if total.strip().isdigit() and int(total) != self.target.size:
            self.fail_integrity(f"the server has {int(total)} bytes of it, the listing says {self.target.size}")

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

    def copy(self, answer: Answer, seg: _Segment, slot: Slot, offset: int) -> None:
        """Read the body into the slot's buffer and write what belongs to the piece, recording progress (and what
        the connection's socket holds: ``splittable``). RequestError when the connection fails."""
        buf = slot.buf
        mv = memoryview(buf)
        budget, cancel, progress = self.fetch.budget, self.fetch.cancel, self.fetch.progress
        while True:
            with self.lock:
                want = min(len(buf), budget.read_size(), seg.end - offset)
            if want <= 0:
                if offset == self.target.size and answer.read(1):
                    self.fail_integrity(f"the server sent more than the {self.target.size} bytes the listing gives")
                return
            if cancel.is_set() or self.error is not None:
                return
            n = answer.readinto(mv[:want])
            if not n:
                raise TryAgain(f"connection closed at byte {offset} of {self.target.size}")
            with self.lock:
                if cancel.is_set() or self.error is not None:
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
            progress.advance(max(hi - lo, 0))
            budget.add(n, answer.receive_queue() if n == want else 0)  # a short read emptied the socket
            if due:
                self.save(wait=False)

    def write(self, data: memoryview, offset: int) -> None:
        """pwrite all of ``data``, one connection at a time (waiters sleep instead of spinning on the inode
        lock), ``WRITE_CHUNK`` bytes per call (small page-cache folios); both measured in BENCHMARKS.md."""
        with self.write_lock:
            while data:
                try:
                    written = os.pwrite(self.fd, data[:WRITE_CHUNK], offset)
                except OSError as exc:
                    raise self.disk_error(exc) from None
                data, offset = data[written:], offset + written

    def disk_error(self, exc: OSError) -> OSError | ConfigError:
        """What an OSError of this file's writes means (``_errors.disk_error``): a full disk is exit 9 and the
        partial is kept."""
        return disk_error(exc, self.fetch.root, f"writing {self.target.name}",
                          f"free space in {self.fetch.root} and run again: the download resumes")

    def fail_integrity(self, why: str) -> NoReturn:
        """Raise IntegrityError: the bytes are not the listed file (the partial is discarded)."""
        raise IntegrityError(f"{self.target.name}: {why}; the file was discarded", "run again to re-download it; "
                             f"if it repeats, {self.fetch.endpoint_var} serves corrupt data", file=self.target.name)

    # -- verification -------------------------------------------------------------------------------
    def hash_all(self) -> str:
        """Hash the file in order, following the written prefix; returns the sha256 once all is verified."""
        size = self.target.size
        sha = hashlib.sha256()
        git = git_blob_hasher(size) if self.target.git_oid else None
        hashers = [sha] if git is None else [sha, git]
        pos = 0
        flusher = _Flusher(self.fd)
        try:
            while pos < size:
                with self.lock:
                    while (limit := self.frontier()) <= pos and self.error is None and not self.fetch.cancel.is_set():
                        self.lock.wait(0.5)
                    if self.error is not None or self.fetch.cancel.is_set():
                        return ""
                reached = hash_range(self.fd, pos, min(limit, pos + WINDOW), hashers)
                if reached == pos:  # the data file is shorter than its progress record: it cannot be trusted
                    self.fail_integrity(f"the partial data ends at byte {pos}, before what its progress record says")
                pos = self.hashed = reached
                flusher.behind(pos)
        finally:
            flusher.join()
        digest = sha.hexdigest()
        if self.target.sha256 and digest != self.target.sha256:
            self.fail_integrity(f"sha256 {digest[:12]}... does not match the listing's {self.target.sha256[:12]}...")
        if git is not None and git.hexdigest() != self.target.git_oid:
            self.fail_integrity(f"git blob id {git.hexdigest()[:12]}... does not match the listing's "
                                f"{(self.target.git_oid or '')[:12]}...")
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            flusher.finish()
        except OSError as exc:
            raise self.disk_error(exc) from None
        return digest


class _Flusher:
    """Writes a file's verified prefix back to the disk while the rest still arrives (``fdatasync`` in a thread of
    its own, every ``SYNC_EVERY`` bytes), so that the sync a publish makes before it names the file (crash
    consistency) finds little left to write: on 1.2 GB that sync took 0.34-0.40 s after the last byte."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.synced = 0  # bytes below this were written back (by the last sync that ended)
        self.thread: threading.Thread | None = None
        self.error: OSError | None = None

    def behind(self, pos: int) -> None:
        """``pos`` bytes are hashed: write them back in the background, unless a writeback runs or little is new."""
        if pos - self.synced < SYNC_EVERY or (self.thread is not None and self.thread.is_alive()):
            return
        self.thread = threading.Thread(target=self._sync, args=(pos,), daemon=True, name="writeback")
        self.thread.start()

    def _sync(self, pos: int) -> None:
        try:
            os.fdatasync(self.fd)
            self.synced = pos
        except OSError as exc:  # reported by finish (a full disk can first show here, at writeback)
            self.error = exc

    def join(self) -> None:
        """Wait for the writeback under way, if any: on every way out of the hashing, before the file is closed."""
        if self.thread is not None:
            self.thread.join()

    def finish(self) -> None:
        """The whole file is verified and ``join`` has returned: what is not written back yet, now; OSError if a
        writeback failed."""
        if self.error is not None:
            raise self.error
        os.fdatasync(self.fd)
