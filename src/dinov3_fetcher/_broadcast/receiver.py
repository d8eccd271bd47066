"""A receiver's side of the broadcast (local rank 0 of a node other than rank 0's): see the package's docstring."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from types import ModuleType
from typing import Any, TextIO

from .._errors import NetworkError
from .._progress import human_bytes
from .._ranks import NodeStats, outcome
from .ends import Sink
from .wire import (
    ABORT,
    BROKEN,
    BROKEN_HINT,
    CHUNK,
    DATA,
    DROP,
    END,
    Broken,
    FileSpec,
    Range,
    Report,
    Wire,
    check_ranges,
    guard,
    torch_modules,
    verdict,
)

__all__ = ["receive"]


def receive(sink: Sink, group: Any, *, src: int = 0, progress: TextIO | None = None) -> Report:
    """A receiver's side (local rank 0 of a node other than the sender's). A collective with ``send``.

    Learns the file list and ``meta`` from the sender, announces ``sink.missing`` for each file, writes what
    it receives into ``sink`` and calls ``sink.complete`` for each file it missed something of, then
    ``sink.close``. A progress line goes to ``progress`` (e.g. sys.stderr) every 2 seconds. Returns the Report
    (files, meta, bytes and seconds of every member), or raises the same error as every member.
    """
    torch, dist = torch_modules()
    rank = dist.get_rank()
    t0 = time.monotonic()
    wire = Wire(torch, dist, group)
    stats = NodeStats(rank, "receiver")
    mine: BaseException | None = None
    try:
        header = wire.recv_obj(src)
        files = [FileSpec(n, int(s), str(h)) for n, s, h in header["files"]]
        report = Report(files, dict(header["meta"]), {rank: stats}, rank)
        missing: list[list[Range]] = [[] for _ in files]
        try:
            missing = [check_ranges(f, sink.missing(f)) for f in files]
        except Exception as exc:
            mine = exc
        for w in wire.isend_obj({"error": outcome(mine, rank), "missing": missing}, src):
            guard(w.wait)
        if mine is None and any(missing):
            mine = _take(wire, src, sink, files, missing, stats, progress, int(header.get("chunk", CHUNK)))
        elif mine is None:
            stats.role = "warm"
        try:
            sink.close()
        except Exception as exc:
            mine = mine or exc
        stats.seconds = time.monotonic() - t0
        for w in wire.isend_obj({"error": outcome(mine, rank), "stats": stats}, src):
            guard(w.wait)
        decided = wire.recv_obj(src)
    except Broken:
        with contextlib.suppress(Exception):
            sink.close()
        raise NetworkError(BROKEN, BROKEN_HINT) from None
    return verdict(decided, report, mine)


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


def _take(wire: Wire, src: int, sink: Sink, files: list[FileSpec], missing: list[list[Range]], stats: NodeStats,
          progress: TextIO | None, chunk: int) -> BaseException | None:
    """Step 3 on a receiver: headers and pieces until the sender's end (or abort). Returns the sink's error."""
    torch, dist = wire.torch, wire.dist
    left = [sum(e - s for s, e in m) for m in missing]
    line = Line(progress, stats.rank, src, sum(left))
    writer = _Writer(torch, sink, files, left, min(chunk, max(left)))
    head = torch.zeros(4, dtype=torch.int64)
    try:
        while True:
            guard(dist.recv, head, src=src, group=wire.group)
            kind, idx, offset, n = (int(v) for v in head.tolist())
            if kind != DATA:
                break
            buf = writer.buffer(n)
            try:
                guard(dist.recv, torch.frombuffer(buf, dtype=torch.uint8)[:n], src=src, group=wire.group)
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
    line.show(stats.bytes, final=True, end="done" if kind == END else "stopped (the sender failed)")
    if kind == ABORT and idx == DROP and (drop := getattr(sink, "drop", None)) is not None:
        drop()  # rank 0's copy failed its sha256: what this node holds of unfinished files may be as wrong
    return writer.error


class Line:
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
