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
wrote stays recorded (``Sink.close``), so the next run resumes it, unless the sender's own source failed its
sha256 (``IntegrityError``): its abort header then says ``_DROP`` and each sink drops its unfinished files.
A member that dies (killed sender, lost node) breaks the group: every surviving member raises the same
``NetworkError`` (``BROKEN``) at once (TCP reset) or after the group's timeout (a node that vanished without a
reset).

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
import queue
import threading
import time
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, TextIO

from ._broadcast_files import FileSource, PartialSink
from ._broadcast_wire import (
    _ABORT,
    _DATA,
    _DROP,
    _END,
    _POLL,
    BROKEN,
    BROKEN_HINT,
    CHUNK,
    FileSpec,
    NodeStats,
    Range,
    Report,
    Sink,
    Source,
    _Broken,
    _check_ranges,
    _guard,
    _isend,
    _Line,
    _send_obj,
    _torch,
    _verdict,
    _wait_all,
    _Wire,
    leaders_group,
    missing_pieces,
)
from ._distributed import _outcome
from ._errors import IntegrityError, NetworkError

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


def send(files: Sequence[FileSpec], source: Source, group: Any, *, meta: dict[str, Any] | None = None,
         chunk: int = CHUNK, finish: Callable[[], None] | None = None) -> Report:
    """The sender's side (global rank 0 of the job, a member of ``group``). A collective with ``receive``.

    Streams every receiver the ranges it announced, in file order, waiting for ``source.ready`` to pass each
    piece. ``finish``, if given, runs after the data step (e.g. waits for the download that ``source``
    follows): what it raises is the sender's error. Returns the Report (the bytes and seconds of every
    member), or raises on every member the error of the lowest failing rank (``source`` failing, a
    receiver's disk or sha256), or ``NetworkError(BROKEN)`` if a member died. A relay for many nodes would
    keep this loop and the headers: the sender sends each piece to the first receiver of a chain that needs
    it, and each receiver forwards it to the next.
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
    if finish is not None:
        try:
            finish()
        except BaseException as exc:
            mine = mine or exc
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




def _stream(wire: _Wire, files: list[FileSpec], source: Source, wants: dict[int, list[list[Range]]], chunk: int,
            stats: NodeStats, dead: set[int]) -> BaseException | None:
    """Step 3 on the sender. Returns the source's error (every receiver got an abort header), or None."""
    torch = wire.torch
    size = min(chunk, max((f.size for f in files), default=1)) or 1
    bufs = [bytearray(size) for _ in range(2)]
    views = [memoryview(b) for b in bufs]
    tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in bufs]
    pending: list[tuple[int, Any]] = []  # the sends of the previous window: its buffer is busy until they end
    which, kind, mine, drop = 0, _END, None, -1
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
        if isinstance(exc, IntegrityError):  # the source's bytes were wrong: the receivers drop what they hold
            drop = _DROP
    _wait_all(pending, dead)
    _wait_all([w for r in wants for w in _isend(wire, wire.head(kind, drop), r, dead)], dead)
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
    if kind == _ABORT and idx == _DROP and (drop := getattr(sink, "drop", None)) is not None:
        drop()  # rank 0's copy failed its sha256: what this node holds of unfinished files may be as wrong
    return writer.error

