"""Share the teacher's bytes between nodes over torch.distributed: one sender, the other nodes receive.

The sender (global rank 0, which downloads from the source) and the receivers (local rank 0 of every other
node) call ``send`` / ``receive`` together on a gloo group of their own (``leaders_group``), whatever the job's
backend is. Four steps; every message goes between the sender and one receiver (point to point), so a dead
sender is seen by every receiver at once, and a dead receiver by the sender:

1. the sender sends every receiver the file list (name, size, sha256) and a small ``meta`` dict (e.g. the
   manifest's repo, revision and commit), so the receivers never ask the source anything;
2. every receiver announces the byte ranges it misses per file (``Sink.missing``; a warm node: none);
3. the sender streams each receiver exactly its missing ranges, point to point, in file order, in pieces of at
   most ``chunk`` bytes, read once per chunk-aligned window into one of two reused buffers (memory: 2 x chunk
   on each side; a receiver writes and hashes one piece in a thread while the next one arrives). A piece is
   sent once the source's ``ready`` frontier has passed its end, so receivers get a file while the sender is
   still downloading it. Every piece is preceded by a 32-byte header (data / end / abort), so a sender whose
   source fails stops every receiver at once. Receivers with nothing missing take no part in this step;
4. every receiver sends the sender its outcome and stats; the sender sends back one verdict: the lowest failing
   rank's error, raised on every member (same type, message and hint), or the same ``Report`` for every member.

A receiver whose sink fails (disk full) or whose file fails its sha256 keeps draining what the sender sends
(discarding it), so the stream and the exchange still complete and the error reaches every rank. What a sink
wrote stays recorded (``Sink.close``), so the next run resumes it. A member that dies (killed sender, lost
node) breaks the group: every surviving member raises the same ``NetworkError`` (``BROKEN``) at once (TCP
reset) or after the group's timeout (a node that vanished without a reset).

Point to point rather than one broadcast of the union: each receiver takes only what it misses and a warm
node takes nothing, with no subgroup per set of needs; the cost is the sender's egress, which is N x the
missing bytes. For hundreds of nodes the same headers allow a relay (receivers forward pieces along a chain or
tree, as NCCL's ring broadcast does), see ``send``.

NCCL (GPU tensors) is not used here. To carry the data pieces on the job's NCCL group, keep steps 1, 2 and 4 and
the headers on gloo (CPU objects, timeouts, a dead peer seen at once, where NCCL would hang until its watchdog
fires), and move only the piece tensors: the sender copies each window from a pinned host buffer into one
device buffer of ``chunk`` bytes, the receivers ``recv`` into theirs and copy it back to pinned memory for the
sink (one chunk of GPU memory per rank). With many nodes the same window can go to every receiver that misses it
with one ``broadcast`` on a subgroup per set of needs (NCCL pipelines it as a ring or tree).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib
import json
import os
import pickle
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, TextIO

from ._distributed import _outcome, _rebuild
from ._errors import DiskSpaceError, IntegrityError, NetworkError
from ._progress import human_bytes

__all__ = [
    "BROKEN",
    "CHUNK",
    "FileSource",
    "FileSpec",
    "NodeStats",
    "PartialSink",
    "Report",
    "Sink",
    "Source",
    "leaders_group",
    "missing_pieces",
    "receive",
    "send",
]

MiB = 1024 * 1024
CHUNK = 32 * MiB  # largest piece; also the alignment of the sender's read windows
PROGRESS_PAGE = 4096  # progress.json is one padded page, as transfer.py writes it
_DATA, _END, _ABORT = 0, 1, 2
_POLL = 0.05  # seconds between two looks at the source's ready frontier
BROKEN = ("the broadcast of the teacher's files broke off: a rank of the transfer group stopped "
          "(killed, out of memory, or its node failed)")
BROKEN_HINT = "run the job again: every node resumes from the bytes it already wrote"

Range = tuple[int, int]


@dataclass(frozen=True)
class FileSpec:
    name: str
    size: int
    sha256: str  # of the whole file; the receiver's check


@dataclass
class NodeStats:
    rank: int
    role: str  # "sender", "receiver" or "warm" (a receiver that missed nothing)
    bytes: int = 0  # sent (sender: all receivers together) or received over the group
    seconds: float = 0.0  # from the start of send/receive to the end of the data step
    files: dict[str, int] = field(default_factory=dict)  # bytes per file


@dataclass
class Report:
    files: list[FileSpec]
    meta: dict[str, Any]
    nodes: dict[int, NodeStats]  # by global rank: the same on every member
    rank: int

    @property
    def mine(self) -> NodeStats:
        return self.nodes[self.rank]


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


def _torch() -> tuple[ModuleType, ModuleType]:
    return importlib.import_module("torch"), importlib.import_module("torch.distributed")


def leaders_group(dist: ModuleType, group: Any, local_rank: int, timeout: float) -> tuple[Any, list[int]]:
    """The transfer group: global rank 0 and local rank 0 of every node, on gloo. A collective on ``group``
    (every rank calls it, as ``new_group`` wants); returns (group, its global ranks), the group being
    ``GroupMember.NON_GROUP_MEMBER`` on the other ranks."""
    ranks: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, local_rank, group=group)
    members = [r for r, lr in enumerate(ranks) if r == 0 or lr == 0]
    sub = dist.new_group(ranks=members, backend="gloo", timeout=dt.timedelta(seconds=timeout))
    return sub, members


def missing_pieces(ranges: Iterable[Range], chunk: int) -> list[Range]:
    """Ranges cut at every multiple of ``chunk``: each piece lies inside one chunk-aligned window."""
    out: list[Range] = []
    for s, e in ranges:
        while s < e:
            stop = min(e, (s // chunk + 1) * chunk)
            out.append((s, stop))
            s = stop
    return out


def _check_ranges(spec: FileSpec, ranges: Sequence[Range]) -> list[Range]:
    clean = sorted((int(s), int(e)) for s, e in ranges)
    prev = 0
    for s, e in clean:
        if not (prev <= s < e <= spec.size):
            raise ValueError(f"bad missing ranges for {spec.name}: {clean}")
        prev = e
    return clean


class _Line:
    """The receiving node's progress line on stderr (one line every ``every`` seconds, and a last one)."""

    def __init__(self, stream: TextIO | None, rank: int, src: int, total: int, every: float = 2.0) -> None:
        self.stream, self.rank, self.src, self.total, self.every = stream, rank, src, total, every
        self.t0 = self.last = time.monotonic()

    def show(self, done: int, final: bool = False, end: str = "done") -> None:
        now = time.monotonic()
        if self.stream is None or (not final and now - self.last < self.every):
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-6)
        end = end if final else f"{100 * done / max(self.total, 1):.0f}%"
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(f"dinov3-fetcher: rank {self.rank} received {human_bytes(done)} of "
                              f"{human_bytes(self.total)} from rank {self.src} ({human_bytes(rate)}/s) {end}\n")
            self.stream.flush()


class _Broken(Exception):
    """The process group failed under us (a peer gone, a timeout)."""


def _guard(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if _is_transport(exc):
            raise _Broken(str(exc)) from None
        raise


def _is_transport(exc: BaseException) -> bool:
    """An error of the process group itself (a peer gone, a timeout), not of our source or sink."""
    dist_error = getattr(importlib.import_module("torch.distributed"), "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(
        w in str(exc).lower() for w in ("gloo", "connection", "timed out", "timeout", "peer", "socket"))


class _Wire:
    """Point-to-point messages with one peer role on ``group``: small objects (pickled) and headers."""

    def __init__(self, torch: ModuleType, dist: ModuleType, group: Any) -> None:
        self.torch, self.dist, self.group = torch, dist, group

    def isend_obj(self, obj: Any, dst: int) -> list[Any]:
        raw = bytearray(pickle.dumps(obj))
        size = self.torch.tensor([len(raw)], dtype=self.torch.int64)
        payload = self.torch.frombuffer(raw, dtype=self.torch.uint8)
        return [self.dist.isend(size, dst=dst, group=self.group), self.dist.isend(payload, dst=dst, group=self.group)]

    def recv_obj(self, src: int) -> Any:
        size = self.torch.zeros(1, dtype=self.torch.int64)
        _guard(self.dist.recv, size, src=src, group=self.group)
        raw = bytearray(int(size.item()))
        _guard(self.dist.recv, self.torch.frombuffer(raw, dtype=self.torch.uint8), src=src, group=self.group)
        return pickle.loads(bytes(raw))  # peers of one job only: the same trust as torch's all_gather_object

    def head(self, kind: int, idx: int = -1, offset: int = 0, n: int = 0) -> Any:
        return self.torch.tensor([kind, idx, offset, n], dtype=self.torch.int64)


def _isend(wire: _Wire, tensor: Any, r: int, dead: set[int]) -> list[tuple[int, Any]]:
    """Post a send to ``r`` unless it is dead; a send that fails at once marks it dead."""
    if r in dead:
        return []
    try:
        return [(r, wire.dist.isend(tensor, dst=r, group=wire.group))]
    except Exception as exc:
        if not _is_transport(exc):
            raise
        dead.add(r)
        return []


def _send_obj(wire: _Wire, obj: Any, peers: Iterable[int], dead: set[int]) -> None:
    works: list[tuple[int, Any]] = []
    for r in peers:
        if r in dead:
            continue
        try:
            works += [(r, w) for w in wire.isend_obj(obj, r)]
        except Exception as exc:
            if not _is_transport(exc):
                raise
            dead.add(r)
    _wait_all(works, dead)


def _wait_all(works: Iterable[tuple[int, Any]], dead: set[int]) -> None:
    """Wait for sends; a peer whose send fails is dead (it gets nothing more)."""
    for r, work in works:
        try:
            work.wait()
        except Exception as exc:
            if not _is_transport(exc):
                raise
            dead.add(r)


def send(files: Sequence[FileSpec], source: Source, group: Any, *, meta: dict[str, Any] | None = None,
         chunk: int = CHUNK) -> Report:
    """The sender's side (global rank 0 of the job, a member of ``group``). A collective with ``receive``.

    Streams every receiver the ranges it announced, in file order, waiting for ``source.ready`` to pass each
    piece. Returns the Report (the bytes and seconds of every member), or raises on every member the error
    of the lowest failing rank (``source`` failing, a receiver's disk or sha256), or ``NetworkError(BROKEN)``
    if a member died. A relay for many nodes would keep this loop and the headers: the sender sends each
    piece to the first receiver of a chain that needs it, and each receiver forwards it to the next.
    """
    torch, dist = _torch()
    rank = dist.get_rank()
    t0 = time.monotonic()
    files = list(files)
    wire = _Wire(torch, dist, group)
    peers = [r for r in dist.get_process_group_ranks(group) if r != rank]
    dead: set[int] = set()
    header = {"files": [(f.name, f.size, f.sha256) for f in files], "meta": dict(meta or {}), "chunk": chunk}
    _send_obj(wire, header, peers, dead)
    announced: dict[int, dict[str, Any]] = {}
    for r in peers:  # step 2: what each receiver misses
        if r in dead:
            continue
        try:
            announced[r] = wire.recv_obj(r)
        except _Broken:
            dead.add(r)
    stats = NodeStats(rank, "sender")
    report = Report(files, dict(meta or {}), {rank: stats}, rank)
    refused = dead or any(a["error"] is not None for a in announced.values())
    active = sorted(r for r, a in announced.items() if a["error"] is None and any(a["missing"]))
    mine: BaseException | None = None
    if refused:  # a receiver could not say what it misses: nobody takes anything, everybody learns why
        _wait_all([w for r in active for w in _isend(wire, wire.head(_ABORT), r, dead)], dead)
    elif active:
        mine = _stream(wire, files, source, {r: announced[r]["missing"] for r in active}, chunk, stats, dead)
    stats.seconds = time.monotonic() - t0
    # step 4: gather every outcome, decide, tell everyone (all through the sender: a dead sender is seen at once)
    outcomes: dict[int, dict[str, Any]] = {}
    for r in peers:
        if r in dead:
            continue
        try:
            outcomes[r] = wire.recv_obj(r)
        except _Broken:
            dead.add(r)
    errors = [(rank, _outcome(mine, rank))] + [(r, a["error"]) for r, a in sorted(announced.items())]
    errors += [(r, o["error"]) for r, o in sorted(outcomes.items())]
    failure = min(((r, e) for r, e in errors if e is not None), key=lambda x: x[0], default=(None, None))[1]
    if dead:
        failure = {"broken": True}
    nodes = {rank: stats, **{r: o["stats"] for r, o in outcomes.items()}}
    verdict = {"failure": failure, "nodes": nodes}
    _send_obj(wire, verdict, peers, dead)
    return _verdict(verdict, report, mine)


def _verdict(verdict: dict[str, Any], report: Report, mine: BaseException | None) -> Report:
    failure = verdict["failure"]
    if failure is not None:
        if failure.get("broken"):
            raise NetworkError(BROKEN, BROKEN_HINT)
        if mine is not None and failure["rank"] == report.rank:
            raise mine
        raise _rebuild(failure)
    report.nodes = dict(verdict["nodes"])
    return report


def _stream(wire: _Wire, files: list[FileSpec], source: Source, wants: dict[int, list[list[Range]]], chunk: int,
            stats: NodeStats, dead: set[int]) -> BaseException | None:
    """Step 3 on the sender. Returns the source's error (every receiver got an abort header), or None."""
    torch = wire.torch
    size = min(chunk, max((f.size for f in files), default=1)) or 1
    bufs = [bytearray(size) for _ in range(2)]
    views = [memoryview(b) for b in bufs]
    tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in bufs]
    pending: list[tuple[int, Any]] = []  # the sends of the previous window: its buffer is busy until they end
    which, kind, mine = 0, _END, None
    try:
        for idx, spec in enumerate(files):
            pieces = {r: missing_pieces(m[idx], chunk) for r, m in wants.items()}
            for w in sorted({s // chunk for ps in pieces.values() for s, _ in ps}):
                part = {r: [p for p in ps if p[0] // chunk == w] for r, ps in pieces.items() if r not in dead}
                spans = [p for ps in part.values() for p in ps]
                if not spans:
                    continue
                lo, hi = min(p[0] for p in spans), max(p[1] for p in spans)
                while source.ready(spec.name) < hi:
                    time.sleep(_POLL)
                source.readinto(spec.name, lo, views[which][:hi - lo])
                works: list[tuple[int, Any]] = []
                for r, ps in part.items():
                    for s, e in ps:
                        works += _isend(wire, wire.head(_DATA, idx, s, e - s), r, dead)
                        works += _isend(wire, tensors[which][s - lo:e - lo], r, dead)
                        stats.bytes += e - s
                        stats.files[spec.name] = stats.files.get(spec.name, 0) + e - s
                _wait_all(pending, dead)
                pending, which = works, 1 - which
    except BaseException as exc:  # the source failed (or Ctrl-C): every receiver stops at its next header
        mine, kind = exc, _ABORT
    _wait_all(pending, dead)
    _wait_all([w for r in wants for w in _isend(wire, wire.head(kind), r, dead)], dead)
    return mine


def receive(sink: Sink, group: Any, *, src: int = 0, progress: TextIO | None = None) -> Report:
    """A receiver's side (local rank 0 of a node other than the sender's). A collective with ``send``.

    Learns the file list and ``meta`` from the sender, announces ``sink.missing`` for each file, writes what
    it receives into ``sink`` and calls ``sink.complete`` for each file it missed something of, then
    ``sink.close``. A progress line goes to ``progress`` (e.g. sys.stderr) every 2 seconds. Returns the Report
    (files, meta, bytes and seconds of every member), or raises the same error as every member.
    """
    torch, dist = _torch()
    rank = dist.get_rank()
    t0 = time.monotonic()
    wire = _Wire(torch, dist, group)
    stats = NodeStats(rank, "receiver")
    mine: BaseException | None = None
    try:
        header = wire.recv_obj(src)
        files = [FileSpec(n, int(s), str(h)) for n, s, h in header["files"]]
        report = Report(files, dict(header["meta"]), {rank: stats}, rank)
        missing: list[list[Range]] = [[] for _ in files]
        try:
            missing = [_check_ranges(f, sink.missing(f)) for f in files]
        except Exception as exc:
            mine = exc
        for w in wire.isend_obj({"error": _outcome(mine, rank), "missing": missing}, src):
            _guard(w.wait)
        if mine is None and any(missing):
            mine = _take(wire, src, sink, files, missing, stats, progress, int(header.get("chunk", CHUNK)))
        elif mine is None:
            stats.role = "warm"
        try:
            sink.close()
        except Exception as exc:
            mine = mine or exc
        stats.seconds = time.monotonic() - t0
        for w in wire.isend_obj({"error": _outcome(mine, rank), "stats": stats}, src):
            _guard(w.wait)
        verdict = wire.recv_obj(src)
    except _Broken:
        with contextlib.suppress(Exception):
            sink.close()
        raise NetworkError(BROKEN, BROKEN_HINT) from None
    return _verdict(verdict, report, mine)


class _Writer:
    """The receiver's disk side in a thread: writes (and hashes, in the sink) one piece while the next one
    arrives. Two buffers: one being received into, one being written from."""

    def __init__(self, torch: ModuleType, sink: Sink, files: list[FileSpec], left: list[int], size: int) -> None:
        self.torch, self.sink, self.files, self.left = torch, sink, files, left
        self.error: BaseException | None = None
        self.free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(2):
            self.free.put(bytearray(size))
        self.work: queue.Queue[tuple[int, int, int, bytearray] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="dinov3-broadcast-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            idx, offset, n, buf = item
            try:
                if self.error is None:
                    spec = self.files[idx]
                    self.sink.write(spec, offset, memoryview(buf)[:n])
                    self.left[idx] -= n
                    if self.left[idx] == 0:
                        self.sink.complete(spec)
            except BaseException as exc:  # reported at the end; the receiver drains what is still sent
                self.error = exc
            finally:
                self.free.put(buf)

    def buffer(self, n: int) -> bytearray:
        buf = self.free.get()
        return buf if len(buf) >= n else bytearray(n)  # the sender's chunk is larger than ours

    def stop(self) -> None:
        self.work.put(None)
        self.thread.join()


def _take(wire: _Wire, src: int, sink: Sink, files: list[FileSpec], missing: list[list[Range]], stats: NodeStats,
          progress: TextIO | None, chunk: int) -> BaseException | None:
    """Step 3 on a receiver: headers and pieces until the sender's end (or abort). Returns the sink's error."""
    torch, dist = wire.torch, wire.dist
    left = [sum(e - s for s, e in m) for m in missing]
    line = _Line(progress, stats.rank, src, sum(left))
    writer = _Writer(torch, sink, files, left, min(chunk, max(left)))
    head = torch.zeros(4, dtype=torch.int64)
    try:
        while True:
            _guard(dist.recv, head, src=src, group=wire.group)
            kind, idx, offset, n = (int(v) for v in head.tolist())
            if kind != _DATA:
                break
            buf = writer.buffer(n)
            try:
                _guard(dist.recv, torch.frombuffer(buf, dtype=torch.uint8)[:n], src=src, group=wire.group)
            except BaseException:
                writer.free.put(buf)
                raise
            stats.bytes += n
            stats.files[files[idx].name] = stats.files.get(files[idx].name, 0) + n
            line.show(stats.bytes)
            if writer.error is not None:
                writer.free.put(buf)  # drain: the sender goes on, the error is reported at the end
            else:
                writer.work.put((idx, offset, n, buf))
    finally:
        writer.stop()  # what was received is written (and recorded by sink.close) even when the sender died
    line.show(stats.bytes, final=True, end="done" if kind == _END else "stopped (the sender failed)")
    return writer.error


# -- the sender's source and a receiver's sink on plain files ---------------------------------------------


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


def _read_progress(path: Path, spec: FileSpec) -> list[Range] | None:
    try:
        data = json.loads(path.read_bytes())
        if data.get("identity") != spec.sha256 or data.get("size") != spec.size:
            return None
        return _check_ranges(spec, [(int(s), int(e)) for s, e in data["remaining"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class PartialSink:
    """A receiver's copy: per file a folder ``data`` + ``progress.json`` (the missing byte ranges), in the
    format of transfer.py's partial folders (identity = sha256, one padded page), then publish on a match.

    - ``folder(spec)``: the partial folder of a file (default ``partial_root/<sha256>``); the fetcher would
      pass its claim here.
    - ``have(spec)``: does this node already hold the file (default: ``final_root/name`` has its size)?
    - ``complete`` hashes the file (following the received prefix while it arrives, the rest from disk),
      raises IntegrityError on a mismatch (the folder is deleted, as transfer.py does), else moves ``data``
      to ``final_root/name``.
    Progress is rewritten after every ``save_every`` bytes and on ``close``.
    """

    def __init__(self, partial_root: Path, final_root: Path, *, folder: Callable[[FileSpec], Path] | None = None,
                 have: Callable[[FileSpec], bool] | None = None, save_every: int = 64 * MiB) -> None:
        self.partial_root, self.final_root = partial_root, final_root
        self._folder = folder or (lambda spec: self.partial_root / spec.sha256)
        self._have = have
        self.save_every = save_every
        self._open: dict[str, _OpenFile] = {}
        self.published: list[str] = []

    def missing(self, spec: FileSpec) -> list[Range]:
        if self._have(spec) if self._have else _same_size(self.final_root / spec.name, spec.size):
            return []
        folder = self._folder(spec)
        ranges = _read_progress(folder / "progress.json", spec)
        data = folder / "data"
        if ranges is None or not data.exists() or data.stat().st_size < _done_end(ranges, spec.size):
            return [(0, spec.size)] if spec.size else []
        return ranges

    def _file(self, spec: FileSpec) -> _OpenFile:
        f = self._open.get(spec.name)
        if f is None:
            folder = self._folder(spec)
            folder.mkdir(parents=True, exist_ok=True)
            f = self._open[spec.name] = _OpenFile(spec, folder, self.missing(spec))
        return f

    def write(self, spec: FileSpec, offset: int, data: memoryview) -> None:
        f = self._file(spec)
        try:
            f.write(offset, data)
            if f.unsaved >= self.save_every:
                f.save()
        except OSError as exc:
            raise _disk_error(exc, spec, f.folder) from None

    def complete(self, spec: FileSpec) -> None:
        f = self._file(spec)
        try:
            digest = f.digest()
        except OSError as exc:
            raise _disk_error(exc, spec, f.folder) from None
        f.close()
        del self._open[spec.name]
        if digest != spec.sha256:
            shutil.rmtree(f.folder, ignore_errors=True)
            raise IntegrityError(f"{spec.name}: sha256 {digest[:12]}... of the bytes received does not match "
                                 f"{spec.sha256[:12]}...; the file was discarded",
                                 "run again to receive it again; if it repeats, a node's disk or memory is bad")
        dest = self.final_root / spec.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(f.folder / "data", dest)
        shutil.rmtree(f.folder, ignore_errors=True)
        self.published.append(spec.name)

    def close(self) -> None:
        errors = []
        for f in self._open.values():
            try:
                f.save()
            except OSError as exc:
                errors.append(exc)
            f.close()
        self._open.clear()
        if errors:
            raise errors[0]


def _same_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _done_end(remaining: list[Range], size: int) -> int:
    end = size
    for s, e in sorted(remaining, reverse=True):
        if e < end:
            break
        end = min(end, s)
    return end


def _disk_error(exc: OSError, spec: FileSpec, folder: Path) -> OSError:
    import errno

    if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
        return exc
    free = shutil.disk_usage(folder).free
    return DiskSpaceError(f"the disk filled up while receiving {spec.name} ({free} bytes free)",
                          "free space in dino_root and run the job again: the transfer resumes", free=free)


class _OpenFile:
    def __init__(self, spec: FileSpec, folder: Path, remaining: list[Range]) -> None:
        self.spec, self.folder, self.remaining = spec, folder, list(remaining)
        self.fd = os.open(folder / "data", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        self.sha = hashlib.sha256()
        self.hashed = 0  # the sha256 has seen [0, hashed)
        self.unsaved = 0
        self.save()

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
        blob = json.dumps({"identity": self.spec.sha256, "size": self.spec.size,
                           "remaining": [list(r) for r in self.remaining]}).encode()
        path, tmp = self.folder / "progress.json", self.folder / "progress.json.tmp"
        tmp.write_bytes(blob.ljust(PROGRESS_PAGE) if len(blob) <= PROGRESS_PAGE else blob)
        os.replace(tmp, path)
        self.unsaved = 0

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

