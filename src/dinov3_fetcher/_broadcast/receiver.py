"""A receiver's side of the broadcast (local rank 0 of a node other than rank 0's): see the package's docstring."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from .._errors import NetworkError
from .._progress import human_bytes
from .._ranks import NodeStats, outcome
from .ends import Sink
from .relay import Forward, Piece, Pool, relay
from .wire import (
    ABORT,
    BROKEN,
    BROKEN_HINT,
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

__all__ = ["Stop", "receive"]


class Stop:
    """An interrupt of a receiver (its Ctrl-C), set from another thread than the one running ``receive`` (the
    caller's main thread, where Python raises KeyboardInterrupt). Before this member has announced what it
    misses, it announces the interrupt as its error; after, the sender is told at once (it stops the chain at
    its next piece, and every member raises this member's error); after its outcome went out, the caller
    takes it to the job's next exchange."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.error: BaseException | None = None
        self._tell: Callable[[BaseException], None] | None = None

    def set(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error
            error, tell = self.error, self._tell
        if tell is not None:
            with contextlib.suppress(Exception):  # the sender is gone: ``receive`` sees it too
                tell(error)

    def arm(self, tell: Callable[[BaseException], None] | None) -> BaseException | None:
        """From now on ``set`` calls ``tell`` (None: nothing more); returns the interrupt already set, if any."""
        with self.lock:
            self._tell = tell
            return self.error


def receive(sink: Sink, group: Any, *, src: int = 0, progress: TextIO | None = None,
            listed: Callable[[list[FileSpec], dict[str, Any]], None] | None = None,
            stop: Stop | None = None) -> Report:
    """A receiver's side (the leader of a node other than the sender's). A collective with ``send``.

    Learns the file list and ``meta`` from the sender (told to ``listed``, before any ``sink.missing``),
    announces ``sink.missing`` for each file, learns the chain; if it is a member, receives pieces from the
    member before it (the sender, for the first), writes the parts it misses into ``sink`` (``sink.complete``
    for each file once all its missing bytes are written) and passes pieces on to the member after it; then
    ``sink.close``. A progress line goes to ``progress`` (e.g. sys.stderr) every 2 seconds. ``stop``: this
    member's interrupt, set from another thread (see ``Stop``). Returns the Report (files, meta, bytes and
    seconds of every member), or raises the same error as every member.
    """
    torch, dist = torch_modules()
    rank = dist.get_rank()
    t0 = time.monotonic()
    wire = Wire(torch, dist, group)
    stats = NodeStats(rank, "receiver")
    mine: BaseException | None = None
    told: list[BaseException | None] = []  # the error this member told the sender, once told
    telling = threading.Lock()

    def tell(broken: bool, error: BaseException | None) -> None:
        """This member's outcome, once: early when its next member is found gone, or when it is interrupted."""
        with telling:
            if not told:
                told.append(error)
                stats.seconds = time.monotonic() - t0
                for w in wire.isend_obj({"error": outcome(error, rank), "broken": broken, "stats": stats}, src):
                    guard(w.wait)

    try:
        header = wire.recv_obj(src)
        files = [FileSpec(n, int(s), str(h)) for n, s, h in header["files"]]
        report = Report(files, dict(header["meta"]), {rank: stats}, rank)
        missing: list[list[Range]] = [[] for _ in files]
        try:
            if listed is not None:
                listed(files, dict(header["meta"]))
            missing = [check_ranges(f, sink.missing(f)) for f in files]
        except Exception as exc:
            mine = exc
        if stop is not None and stop.error is not None:
            mine = stop.error  # interrupted before it said what it misses: nobody sends anything
            missing = [[] for _ in files]
        for w in wire.isend_obj({"error": outcome(mine, rank), "missing": missing}, src):
            guard(w.wait)
        try:  # from here to the end of the data step, an interrupt is told to the sender at once (Stop)
            if stop is not None and (interrupted := stop.arm(lambda error: tell(False, error))) is not None:
                tell(False, interrupted)
            chain: list[int] = wire.recv_obj(src)["chain"]
            broken = False
            if rank in chain:
                at = chain.index(rank)
                prev = chain[at - 1] if at else src
                after = chain[at + 1] if at + 1 < len(chain) else None
                mine, broken = _receive_in_chain(wire, prev, after, at, sink, files, missing, stats, progress,
                                                 int(header["piece"]), lambda: tell(True, None))
            elif mine is None:
                stats.role = "warm"
            try:
                sink.close()
            except Exception as exc:
                mine = mine or exc
        finally:  # then no more: this member's outcome goes out next (or the group broke)
            if stop is not None:
                stop.arm(None)
        if stop is not None:
            mine = stop.error or mine
        tell(broken, mine)
        if told[0] is not None:  # what the sender was told, if it was told early: every member raises it
            mine = told[0]
        decided = wire.recv_obj(src)
    except Broken:
        with contextlib.suppress(Exception):
            sink.close()
        raise NetworkError(BROKEN, BROKEN_HINT) from None
    return verdict(decided, report, mine)


class _Writer:
    """The member's disk side in a thread: writes (and hashes, in the sink) the parts of the pieces this node
    misses while the next pieces arrive. After an error it writes nothing more (the pieces still go on along the
    chain, and the error is reported at the end)."""

    def __init__(self, sink: Sink, files: list[FileSpec], left: list[int], pool: Pool) -> None:
        self.sink, self.files, self.left, self.pool = sink, files, left, pool
        self.error: BaseException | None = None
        self.work: queue.Queue[tuple[int, int, Piece, list[Range]] | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="dinov3-broadcast-writer", daemon=True)
        self.thread.start()

    def put(self, idx: int, offset: int, piece: Piece, parts: list[Range]) -> None:
        self.pool.hold(piece)
        self.work.put((idx, offset, piece, parts))

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            idx, offset, piece, parts = item
            try:
                if self.error is None:
                    spec = self.files[idx]
                    for s, e in parts:
                        self.sink.write(spec, s, piece.view[s - offset:e - offset])
                        self.left[idx] -= e - s
                    if self.left[idx] == 0:
                        self.sink.complete(spec)
            except BaseException as exc:  # reported at the end
                self.error = exc
            finally:
                self.pool.release(piece)

    def stop(self) -> None:
        self.work.put(None)
        self.thread.join()


def _receive_in_chain(wire: Wire, prev: int, after: int | None, at: int, sink: Sink, files: list[FileSpec],
                      missing: list[list[Range]], stats: NodeStats, progress: TextIO | None, size: int,
                      on_broken: Callable[[], None]) -> tuple[BaseException | None, bool]:
    """Step 3 on a member of the chain. Returns the sink's error, and whether a neighbour was gone."""
    left = [sum(e - s for s, e in m) for m in missing]
    line = Line(progress, stats.rank, prev, sum(left))
    pool = Pool(wire.torch, size)
    forward = Forward(wire, after, pool, stats) if after is not None else None
    writer = _Writer(sink, files, left, pool)
    taken = [0]

    def take(idx: int, offset: int, piece: Piece, parts: list[Range]) -> None:
        n = sum(e - s for s, e in parts)
        stats.files[files[idx].name] = stats.files.get(files[idx].name, 0) + n
        taken[0] += n
        line.show(taken[0])
        writer.put(idx, offset, piece, parts)

    try:
        kind, idx, bad, broken = relay(wire, prev, forward, at, missing, pool, stats, take, on_broken)
    finally:
        writer.stop()  # what was received is written (and recorded by sink.close) even when a neighbour died
    line.show(taken[0], final=True, end="done" if kind == END else "stopped")
    if kind == ABORT and idx == DROP and (drop := getattr(sink, "drop", None)) is not None:
        drop(files[bad].name if 0 <= bad < len(files) else None)  # rank 0's copy of that file failed its sha256:
        # what this node holds of it may be as wrong (of every unfinished file, when rank 0 did not say which)
    return writer.error, broken


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
